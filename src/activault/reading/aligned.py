"""Several runs' activations for the same tokens (runs collected with `data_config.align_to`):
a crosscoder's or a model diff's batches, `{run: {hook: states}}`.

One RCache per run reads the same file names in the same order; each file's token ids and
positions are checked to agree across runs before it is yielded (a FormatError naming the file
otherwise), and a shuffle uses the same permutation in every run (it is seeded by the seed, the
epoch and the file's name, which the runs share): token batches take each file's kept tokens in a
stratified order, as TokenLoader's windows (window.py `stratified`). A token filter's or split's masks are joined
(a token dropped in one run is dropped in all), so the runs stay aligned; `state_dict()` resumes
at the exact file, or token with `batch_tokens`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from activault.errors import ConfigError, FormatError
from activault.reading.filters import norm_limits
from activault.reading.options import ReadOptions, keywords, read_options
from activault.reading.order import mix_seed
from activault.reading.rcache import RCache, check_state
from activault.reading.stream import Source
from activault.reading.window import STRATIFIED, stratified

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from activault.reading.options import ReadArgs

NOT_ALIGNED = (
    "the runs do not hold the same tokens in this file: read together only runs collected with "
    "data_config.align_to naming one of them (such a run holds the reference's tokens file for file)"
)
IDS = ("input_ids", "positions", "documents")


class AlignedLoader:
    """Megabatches `{run: {hook: states [rows, seq, d]}}` of several aligned runs, the same tokens in each.

    `state_dict()` / `load_state_dict()` resume exactly (at the file; with `batch_tokens` at the
    token), per rank; a state of other runs, hooks or options is refused, naming the field.

    Args:
        runs: run folders (local paths or `s3://bucket/run`), each yielded under the name given here.
        hooks: the hooks read from every run (each run must have them all).
        return_ids: also yield `"input_ids"` (int64), `"positions"` and `"documents"` (as RCache's),
            the shared tokens: `{"states": {run: {hook: states}}, "input_ids", ...}`; with a
            `token_filter` or `split`, megabatches also carry `"keep"` ([rows, seq] bool, kept in
            every run).
        shuffle: permute tokens within each megabatch, by the same permutation in every run; with
            `batch_tokens`, each file's kept tokens stratified (a batch takes at most one token of
            each `file tokens / batch_tokens` neighbours, so few pairs of one document).
        batch_tokens: yield token batches `[batch_tokens, d]` instead (padding and filtered tokens
            dropped, an epoch's last batch shorter), cut from the megabatches in order.
        options, **read: ReadOptions fields, as RCache takes them (`seed`, `rank`, `world_size`,
            `token_filter`, `split`, ...); `skip_bad_files` is refused: a file skipped in one run
            only would misalign the rest.
    """

    def __init__(
        self,
        runs: Sequence[Source],
        hooks: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        return_ids: bool = False,
        shuffle: bool = False,
        batch_tokens: int | None = None,
        options: ReadOptions | None = None,
        **read: Unpack[ReadArgs],
    ):
        names = [str(r) for r in runs]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"runs={names!r}: name two or more different runs to read aligned")
        opts, _ = read_options("AlignedLoader", options, read, own=keywords(AlignedLoader.__init__, "runs", "options"))
        if opts.skip_bad_files:
            raise ConfigError(
                "skip_bad_files=True is not accepted by AlignedLoader: a file skipped in one run only "
                "would pair every later file with another's tokens; repair the bad file instead"
            )
        if batch_tokens is not None and (isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int)):
            raise ConfigError(f"batch_tokens={batch_tokens!r} is not accepted: use a whole number >= 1, or None")
        if batch_tokens is not None and batch_tokens < 1:
            raise ConfigError(f"batch_tokens={batch_tokens!r} is not accepted: use a whole number >= 1, or None")
        self.runs = names
        self.hooks = list(hooks)
        self.shuffle, self.batch_tokens = shuffle, batch_tokens
        spec, split = opts.tokens, opts.held_out
        # Megabatches stay whole: a filter's drops are the "keep" mask, yielded with the ids.
        self.return_ids = return_ids or (batch_tokens is None and (spec.active or split is not None))
        self.readers = [
            # Token batches order each file's kept tokens themselves (`_tokens`), from storage order.
            RCache(
                r, hooks=self.hooks, device=device, return_ids=True, shuffle=shuffle and not batch_tokens, options=opts
            )
            for r in runs
        ]
        # What decides which tokens are kept: a resumed loader's offsets count the same tokens.
        self._kept = {
            "token_filter": spec.describe(),
            "split": None if split is None else split.describe(),
            "norm_limits": [norm_limits(r.files.catalog.prefixes, spec, len(self.hooks)) for r in self.readers],
        }
        self.epoch = 0
        self._file = 0  # the next file (megabatches), or the file of the next token (batch_tokens)
        self._offset = 0  # that file's kept tokens already yielded (batch_tokens)

    def __len__(self) -> int:
        """Files per epoch (every run's)."""
        return len(self.readers[0])

    def _order(self) -> list[str]:
        """This epoch's file names, the same in every run; else a FormatError naming the first difference."""
        orders = [[f.name for f in r.files.order(r.epoch)] for r in self.readers]
        for run, order in zip(self.runs[1:], orders[1:], strict=True):
            if order != orders[0]:
                first = next((a for a, b in zip(orders[0], order, strict=False) if a != b), None)
                missing = first or (orders[0][len(order)] if len(orders[0]) > len(order) else order[len(orders[0])])
                raise FormatError(
                    f"runs {self.runs[0]} and {run} do not hold the same files ({len(orders[0])} and "
                    f"{len(order)}; the first that differs is {missing}): aligned runs hold the same "
                    "file names; collect the missing machine's files, or read only the files both hold"
                )
        return orders[0]

    def _url(self, run: int, name: str) -> str:
        files = self.readers[run].files
        return files.catalog.prefixes[0].url(0, name)

    def _check(self, items: list[dict[str, Any]], name: str) -> None:
        """Every run's ids and positions equal the first run's: else a FormatError naming the file."""
        first = items[0]
        for i, item in enumerate(items[1:], 1):
            for key in ("input_ids", "positions"):
                a, b = first[key], item[key]
                if a.shape != b.shape or not torch.equal(a, b):
                    where = (a != b).nonzero()[0].tolist() if a.shape == b.shape else None
                    detail = (
                        f"row {where[0]}, column {where[1]}: {int(a[tuple(where)])} in {self._url(0, name)}, "
                        f"{int(b[tuple(where)])} here"
                        if where
                        else f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
                    )
                    raise FormatError(
                        f"{self._url(i, name)}: its {key} differ from the first run's ({detail}); {NOT_ALIGNED}"
                    )

    def _files(self) -> Generator[tuple[int, str, dict[str, Any]], None, None]:
        """(index in this epoch's order, name, megabatch) of each file from the loader's position on."""
        for r in self.readers:
            r.load_state_dict({**r.state_dict(), "epoch": self.epoch, "file_index": self._file})
        order = self._order()
        iters = [iter(r) for r in self.readers]
        try:
            for items in zip(*iters, strict=True):
                index = self.readers[0].current_file_index - 1
                self._check(list(items), order[index])
                mb = {
                    "states": {run: item["states"] for run, item in zip(self.runs, items, strict=True)},
                    **{k: items[0][k] for k in IDS},
                }
                if "keep" in items[0]:  # each run's filter (norms differ by run): kept only where all keep
                    mb["keep"] = torch.stack([item["keep"] for item in items]).all(0)
                yield index, order[index], mb
        finally:
            for it in iters:
                it.close()  # type: ignore[attr-defined]  # RCache iterates with generators

    def _megabatches(self) -> Iterator[dict[str, Any]]:
        for index, _, mb in self._files():
            self._file = index + 1
            yield mb
        self.epoch, self._file = self.epoch + 1, 0

    def _tokens(self) -> Iterator[dict[str, Any]]:
        """Token batches of `batch_tokens`, padding dropped, a remainder carried to the next file."""
        n = self.batch_tokens
        assert n is not None
        held: list[dict[str, Any]] = []  # flat pieces not yet yielded: states, ids, their file and start
        count, skip = 0, self._offset
        for index, name, mb in self._files():
            kept = (mb["keep"] if "keep" in mb else mb["positions"] >= 0).reshape(-1).nonzero().reshape(-1)
            if self.shuffle:  # one order for every run: seeded by what they share
                seed = mix_seed(self.readers[0].seed, self.epoch, "tokens", name)
                kept = kept[torch.from_numpy(stratified(len(kept), n, seed)).to(kept.device)]
            if skip:  # resumed mid-file: its first `skip` kept tokens were yielded before
                if skip >= len(kept):
                    raise ConfigError(
                        f"AlignedLoader state: field 'offset' is {skip}, not a whole number 0..{max(len(kept) - 1, 0)} "
                        f"(file {index} of epoch {self.epoch} keeps {len(kept)} tokens): the state was saved by a "
                        "loader of other files, or with other filters"
                    )
                kept = kept[skip:]
            held.append(
                {
                    "states": {
                        run: {h: s.reshape(-1, s.shape[-1])[kept] for h, s in hooks.items()}
                        for run, hooks in mb["states"].items()
                    },
                    **{k: None if mb[k] is None else mb[k].reshape(-1)[kept] for k in IDS},
                    "file": index,
                    "start": skip,
                }
            )
            count += len(kept)
            skip = 0
            while count >= n:
                batch, held = _cut(held, n)
                count -= n
                # The position of the next token: what state_dict() resumes from.
                self._file, self._offset = (held[0]["file"], held[0]["start"]) if held else (index + 1, 0)
                yield batch
        self.epoch, self._file, self._offset = self.epoch + 1, 0, 0
        if count:
            yield _cut(held, count)[0]

    def __iter__(self) -> Iterator[Any]:
        items = self._tokens() if self.batch_tokens is not None else self._megabatches()
        for item in items:
            yield item if self.return_ids else item["states"]

    # -- position --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the next item starts (epoch, file, kept tokens of it already yielded), and what it depends on."""
        first = self.readers[0]
        return {
            "epoch": self.epoch,
            "file_index": self._file,
            "offset": self._offset,
            "runs": list(self.runs),
            "hooks": list(self.hooks),
            "seed": first.seed,
            "rank": first.rank,
            "world_size": first.world_size,
            "shuffle": self.shuffle,
            "batch_tokens": self.batch_tokens,
            # How token batches order a file's tokens (absent from states saved by their uniform shuffle).
            "shuffle_order": STRATIFIED if self.shuffle and self.batch_tokens is not None else None,
            **self._kept,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` (from `state_dict()` of a loader of the same runs, hooks and
        options) was saved: a field that differs is a ConfigError naming it and the fix."""
        state = check_state(state, "AlignedLoader", {"epoch": (0, 2**63 - 1), "file_index": (0, None)})
        mine = self.state_dict()
        for key in ("runs", "hooks", "seed", "rank", "world_size", "shuffle", "batch_tokens", *self._kept):
            if key not in state:
                raise ConfigError(f"not an AlignedLoader state_dict: no {key}")
            if state[key] != mine[key]:
                raise ConfigError(
                    f"state was saved with {key}={state[key]!r}, this loader has {mine[key]!r}: {_fix(key, state[key])}"
                )
        epoch, files = int(state["epoch"]), len(self)
        check_state(state, "AlignedLoader", {"file_index": (0, files)})
        # Megabatches are whole; and at the epoch's end no token is left: only offset 0 can follow.
        whole = self.batch_tokens is None or int(state["file_index"]) == files
        check_state(state, "AlignedLoader", {"offset": (0, 0 if whole else 2**63 - 1)})
        saved = state.get("shuffle_order")
        if saved != mine["shuffle_order"] and state["offset"]:
            raise ConfigError(
                f"state was saved mid-file by a loader that shuffled each file's tokens with "
                f"{saved or 'a uniform permutation'}; this one uses {STRATIFIED!r}, so the rest of that file would "
                "repeat and skip tokens: resume from a state saved at a file boundary (offset 0), or with the "
                "activault that saved it"
            )
        self.epoch, self._file, self._offset = epoch, int(state["file_index"]), int(state["offset"])

    def finalize(self) -> None:
        """Stop every run's background reading (also done on leaving `with`)."""
        for r in self.readers:
            r.finalize()

    def __enter__(self) -> AlignedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()


def _fix(key: str, saved: object) -> str:
    """How to resume a state whose `key` differs from the loader's."""
    if key == "norm_limits":  # max_norm_ratio x each run's median norm, from its statistics
        return (
            "the runs' statistics changed since (machines merged in), so resuming would drop other tokens "
            "than the saved loader did: start a new loader (no load_state_dict) to read with the new statistics"
        )
    what = {
        "runs": "the same runs, named as then and in the same order",
        "split": "the same split, test_fraction and split_seed",
        "token_filter": "the same token_filter",
    }.get(key, f"{key}={saved!r}")
    return f"make the loader with {what} to resume it"


def _cut(held: list[dict[str, Any]], n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first `n` tokens of the pieces `held`, and what remains of them."""
    taken, rest, need = [], [], n
    for piece in held:
        size = len(piece["input_ids"])
        if need >= size:
            taken.append(piece)
            need -= size
        elif need > 0:
            taken.append(_slice(piece, 0, need))
            rest.append(_slice(piece, need, size))
            need = 0
        else:
            rest.append(piece)
    out = {
        "states": {
            run: {h: torch.cat([p["states"][run][h] for p in taken]) for h in hooks}
            for run, hooks in taken[0]["states"].items()
        },
        **{k: None if taken[0][k] is None else torch.cat([p[k] for p in taken]) for k in IDS},
    }
    return out, rest


def _slice(piece: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    return {
        "states": {run: {h: s[a:b] for h, s in hooks.items()} for run, hooks in piece["states"].items()},
        **{k: None if piece[k] is None else piece[k][a:b] for k in IDS},
        "file": piece["file"],
        "start": piece["start"] + a,
    }
