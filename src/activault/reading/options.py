"""How a reader reads its sources: one frozen, validated `ReadOptions`, from the public constructors
(RCache, TokenLoader, ActivationDataset, the integrations) down to FileStream and the Catalog.

The constructors keep their keyword arguments: `read_options` turns them into a ReadOptions in one
place (keywords override the fields of an `options=ReadOptions(...)`), and names a mistyped one.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypedDict

from activault.errors import ConfigError
from activault.reading.splits import SPLITS, Split
from activault.storage import check_store_options


def invalid(name: str, value: Any, accepted: str) -> ConfigError:
    """The one error of a bad option value: its name, the value, and what is accepted."""
    return ConfigError(f"{name}={value!r} is not accepted: {name} must be {accepted}")


def whole(name: str, value: Any, minimum: int = 1, accepted: str = "") -> int:
    """`value` as an int, if it is a whole number (never a bool, float or str) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise invalid(name, value, accepted or f"a whole number >= {minimum}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """`value`, if it is True or False (a string such as "false" would count as True)."""
    if not isinstance(value, bool):
        raise invalid(name, value, "True or False")
    return value


def positive(name: str, value: Any) -> float:
    """`value` as a float, if it is a finite number > 0 (not a bool or str)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise invalid(name, value, "a finite number > 0")
    return float(value)


def _ids(value: Any) -> frozenset[int]:
    accepted = "a set of token ids (whole numbers >= 0)"
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise invalid("drop_ids", value, accepted)
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
    if bad:
        raise invalid("drop_ids", bad[0], accepted)
    return frozenset(int(v) for v in value)


@dataclass(frozen=True)
class TokenFilter:
    """Stored tokens a TokenLoader leaves out of its batches, chosen at read time (the vault is not
    rewritten). Filters compose: a token any of them drops is dropped, for every hook at once (hooks
    stay aligned); the loader counts each filter's drops in `filtered`, a token going to the first
    filter of FILTERS that drops it. Padding (position -1) is always dropped and never counted."""

    positions_below: int = 0
    """Drop tokens whose position in their document's token list is below this. Positions count
    the tokens cleaning left out: after `clean_added_tokens` a document's first stored token is
    at 1 (its BOS at 0 was not stored); `first` counts stored tokens instead."""

    positions_from: int | None = None
    """Drop tokens whose position is this or more (None: no end): [positions_below, positions_from)
    is the position range kept."""

    first: int = 0
    """Drop each document's first `first` stored tokens, whatever cleaning did (filters.py
    `document_ranks` says how a document's stored tokens are found)."""

    drop_ids: frozenset[int] = frozenset()
    """Drop tokens with these ids (e.g. `filters.special_token_ids(run)`: BOS and the run's special
    tokens, from its tokenizer)."""

    nonfinite: bool = False
    """Drop tokens with a NaN or Inf in any hook (`drop_nonfinite` is this)."""

    max_norm_ratio: float | None = None
    """Drop tokens whose L2 norm in some hook exceeds this times the hook's median norm (attention
    sinks), from the norm histogram of `statistics.json` (stats_version 3; within 2.2%)."""

    max_norm: float | None = None
    """Drop tokens whose L2 norm in some hook exceeds this (absolute; needs no statistics)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised once, here
        set_(self, "positions_below", whole("positions_below", self.positions_below, 0))
        if self.positions_from is not None:
            accepted = f"a whole number > positions_below={self.positions_below}, or None (no end)"
            set_(
                self, "positions_from", whole("positions_from", self.positions_from, self.positions_below + 1, accepted)
            )
        set_(self, "first", whole("first", self.first, 0))
        set_(self, "drop_ids", _ids(self.drop_ids))
        flag("nonfinite", self.nonfinite)
        for name in ("max_norm_ratio", "max_norm"):
            if getattr(self, name) is not None:
                set_(self, name, positive(name, getattr(self, name)))

    @property
    def active(self) -> bool:
        """Whether the filter can drop a token (padding aside)."""
        return self != TokenFilter()

    def describe(self) -> dict[str, Any]:
        """The fields set (JSON-ready, ids sorted): what a state_dict records."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}
        if "drop_ids" in out:
            out["drop_ids"] = sorted(out["drop_ids"])
        return out


FILTER_FIELDS = tuple(f.name for f in fields(TokenFilter))


def token_filter(value: Any) -> TokenFilter | None:
    """`value` as a TokenFilter: one already, a dict of its fields (from YAML), or None."""
    if value is None or isinstance(value, TokenFilter):
        return value
    if not isinstance(value, Mapping):
        raise invalid("token_filter", value, "a TokenFilter, a dict of its fields, or None")
    unknown = [k for k in value if k not in FILTER_FIELDS]
    if unknown:
        raise ConfigError(f"token_filter has no field {unknown[0]!r}; a TokenFilter has {', '.join(FILTER_FIELDS)}")
    return TokenFilter(**value)


@dataclass(frozen=True)
class ReadOptions:
    """Which part of the sources a reader reads, in which order, and how (validated on construction)."""

    buffer_size: int = 2
    """Files read ahead while the consumer works on the current one (each is held in memory)."""

    preserve_file_order: bool | None = None
    """False shuffles the file order with the seed and the epoch; None: the reader's default
    (RCache keeps the stored order, TokenLoader shuffles)."""

    seed: int = 0
    """Seeds every shuffle (file order, tokens within a megabatch or window)."""

    rank: int = 0
    """This reader's share: every world_size-th file from `rank` (DDP: disjoint, covering)."""

    world_size: int = 1
    """How many readers share the files (DDP ranks, times DataLoader workers)."""

    skip_bad_files: bool = False
    """Warn about, count (`bad_files`) and skip unreadable files and files some hooks lack,
    instead of raising."""

    store_options: Mapping[str, Any] | None = field(default=None, repr=False, hash=False)
    """For the stores opened from URIs (`open_store`): local `fsync`, `map_reads`; S3 `env`,
    `unsigned` (a public bucket), `max_retries`, `retry_timeout`, `timeout`, ... (not shown by
    repr: `env` may hold credentials)."""

    range_size: int | None = None
    """Bytes per ranged read; None: each file split over the 8 range workers, in ranges of 4 to
    16 MiB (a file of at most 4 MiB in one request); larger than any file: one GET each."""

    verify_checksums: bool = False
    """Check every file's bytes against the checksums in its header (a FormatError names the file
    and tensor); costs a hash pass."""

    recycle: bool = True
    """Read files and gather batches into buffers handed out again once nothing uses them; False:
    a new buffer each time, page faults included (what bench/read.py's `-fresh` readers measure)."""

    drop_nonfinite: bool = False
    """Leave out of token batches (TokenLoader, and the integrations built on it) every token with
    a NaN or Inf in any hook's states: dropped for every hook at once, so hooks stay aligned, and
    counted in the loader's `nonfinite_dropped`. Costs a pass over the states' exponent bits. RCache
    yields whole megabatches and refuses it (mask with `torch.isfinite(states).all(-1)` there).
    The same as `token_filter=TokenFilter(nonfinite=True)`."""

    token_filter: TokenFilter | None = None
    """Tokens left out of token batches (TokenLoader and the integrations built on it), at read
    time: a TokenFilter or a dict of its fields. RCache yields whole megabatches with a `keep`
    mask instead."""

    split: Literal["train", "test"] | None = None
    """"train" or "test": read only the documents of this side of a held-out split (splits.py): a
    document is in test iff a hash of (its machine, its ordinal), seeded with `split_seed`, falls
    below `test_fraction`; the same for every reader, rank and resume. TokenLoader drops the other
    side's tokens (counted in `filtered["split"]`); RCache masks them in `keep`. Needs files with
    provenance (format version 4); None: every document."""

    test_fraction: float = 0.01
    """The fraction of documents in `test` (0 < test_fraction < 1), with `split`."""

    split_seed: int = 0
    """Seeds the split's hash: another seed, another choice of test documents."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised once, here
        set_(self, "buffer_size", whole("buffer_size", self.buffer_size, 1, "a whole number >= 1 (files read ahead)"))
        if self.preserve_file_order is not None and not isinstance(self.preserve_file_order, bool):
            raise invalid("preserve_file_order", self.preserve_file_order, "True, False or None (the reader's default)")
        set_(self, "seed", whole("seed", self.seed, -(2**63), "a whole number"))
        world = whole("world_size", self.world_size, 1, "a whole number >= 1 (readers sharing the files)")
        set_(self, "world_size", world)
        set_(self, "rank", whole("rank", self.rank, 0, f"a whole number in [0, world_size={world})"))
        if self.rank >= world:
            raise invalid("rank", self.rank, f"a whole number in [0, world_size={world})")
        flag("skip_bad_files", self.skip_bad_files)
        flag("verify_checksums", self.verify_checksums)
        flag("recycle", self.recycle)
        flag("drop_nonfinite", self.drop_nonfinite)
        set_(self, "token_filter", token_filter(self.token_filter))
        if self.split is not None and self.split not in SPLITS:
            raise invalid("split", self.split, '"train", "test", or None (every document)')
        f = self.test_fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < float(f) < 1:
            raise invalid(
                "test_fraction", f, "a number between 0 and 1, both excluded (the fraction of documents in test)"
            )
        set_(self, "test_fraction", float(f))
        set_(self, "split_seed", whole("split_seed", self.split_seed, -(2**63), "a whole number"))
        if self.range_size is not None:
            accepted = "a positive number of bytes (a whole number >= 1), or None (the default)"
            set_(self, "range_size", whole("range_size", self.range_size, 1, accepted))
        store = self.store_options if self.store_options is not None else {}
        if not isinstance(store, Mapping):
            raise invalid("store_options", store, "a dict of store options by name (or None)")
        if odd := [k for k in store if not isinstance(k, str)]:  # the values are not shown: `env` holds secrets
            raise ConfigError(f"store_options key {odd[0]!r} is not accepted: store options are named by strings")
        check_store_options(store)
        set_(self, "store_options", dict(store))

    @property
    def held_out(self) -> Split | None:
        """The side of the split read (None: every document)."""
        return None if self.split is None else Split(self.split, self.test_fraction, self.split_seed)

    @property
    def tokens(self) -> TokenFilter:
        """The token filter in effect: `token_filter` with `drop_nonfinite` folded in."""
        f = self.token_filter if self.token_filter is not None else TokenFilter()
        return replace(f, nonfinite=True) if self.drop_nonfinite and not f.nonfinite else f

    def ordered(self, default: bool) -> ReadOptions:
        """These options with `preserve_file_order` set: the reader's `default` where it is None."""
        return self if self.preserve_file_order is not None else replace(self, preserve_file_order=default)


class ReadArgs(TypedDict, total=False):
    """ReadOptions' fields as keyword arguments (the constructors' `**read`, checked by mypy)."""

    buffer_size: int
    preserve_file_order: bool | None
    seed: int
    rank: int
    world_size: int
    skip_bad_files: bool
    store_options: Mapping[str, Any] | None
    range_size: int | None
    verify_checksums: bool
    recycle: bool
    drop_nonfinite: bool
    token_filter: TokenFilter | Mapping[str, Any] | None
    split: Literal["train", "test"] | None
    test_fraction: float
    split_seed: int


FIELDS = tuple(f.name for f in fields(ReadOptions))


def keywords(fn: Callable[..., Any], *skip: str) -> list[str]:
    """The named keyword arguments of `fn` (a constructor's own options), less `skip` and `self`."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind in kinds and p.name not in ("self", *skip)]


def read_options(
    owner: str, options: ReadOptions | None, kwargs: Mapping[str, Any], own: Collection[str] = ()
) -> tuple[ReadOptions, dict[str, Any]]:
    """(ReadOptions, the rest) of a constructor's keyword arguments.

    The reading options among `kwargs` override the fields of `options`; the names in `own` (options
    of the owner, or of the reader it makes) are returned as they are; any other name is an error
    naming it and listing what `owner` accepts.
    """
    if options is not None and not isinstance(options, ReadOptions):
        raise invalid("options", options, "a ReadOptions (or None); or pass the reading options as keywords")
    unknown = [k for k in kwargs if k not in FIELDS and k not in own]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], [*own, *FIELDS], n=1)
        raise ConfigError(
            f"{owner} has no option {', '.join(map(repr, unknown))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; it accepts {', '.join(own) + ', ' if own else ''}options=ReadOptions(...) and the reading "
            f"options {', '.join(FIELDS)}"
        )
    read = {k: v for k, v in kwargs.items() if k in FIELDS}
    base = options if options is not None else ReadOptions()
    return (replace(base, **read) if read else base), {k: v for k, v in kwargs.items() if k not in FIELDS}
