"""Token filters at read time: one vectorised mask per file (TokenFilter in options.py says what).

A file's mask is computed once, on the reading thread, when the file is loaded: the consumer's
batches then gather the kept tokens only, at the cost of an unfiltered read (docs/benchmarks.md).
The NaN/Inf and norm filters use the norms a file stores (format version 5, vault/norms.py), and
compute the same norms from the states of older files: the same tokens are kept either way.
The mask is a pure function of the file and the filter, so windows, batches and resumes are the
same with filters as the vault would give if rewritten without those tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from activault.errors import NotFoundError
from activault.reading.options import TokenFilter
from activault.reading.splits import Split
from activault.reading.stream import LoadedFile, Prefix
from activault.storage import locate
from activault.vault import records
from activault.vault.norms import token_norms
from activault.vault.stats import check_histogram, finite_rows, merge_all

# The order drops are counted in: a token goes to the first filter that drops it. The held-out
# split first: the filters' counts are then those of the split's own tokens.
FILTERS = ("split", "positions", "first", "ids", "nonfinite", "norm")


@dataclass
class FilteredFile(LoadedFile):
    """A LoadedFile with the tokens its filter keeps: indices into its flattened tokens."""

    kept: np.ndarray | None = None  # [kept] int64, ascending; None: every token
    dropped: dict[str, int] = field(default_factory=dict)  # per filter of FILTERS


def document_ranks(positions: np.ndarray) -> np.ndarray:
    """[n] int64: each token's index among its document's stored tokens (`positions: [n]`, a file's
    tokens flattened in storage order, -1 for padding).

    Stored tokens of one document have increasing positions (with gaps where cleaning left tokens
    out), and a document split by packing continues at the next row's start; a token whose
    position is not above the previous token's starts a document. A file's first tokens may
    continue the previous file's last document: they do when their first position is above the
    smallest position the file's other documents start at (1 when there is none: 0 is a start
    without cleaning, 1 after `clean_added_tokens`), and are then ranked as if every position
    since that start had been stored. Assumes a file's documents start at the same position (the
    same cleaning): a document that starts higher, right after one that ended lower, reads as
    its continuation.
    """
    n = positions.size
    if n == 0:
        return np.zeros(0, np.int64)
    p = positions.astype(np.int64, copy=False)
    start = np.empty(n, bool)
    start[0] = True
    np.less_equal(p[1:], p[:-1], out=start[1:])
    idx = np.arange(n)
    rank = idx - np.maximum.accumulate(np.where(start, idx, 0))
    firsts = p[start][1:]
    firsts = firsts[firsts >= 0]
    p0 = int(firsts.min()) if firsts.size else 1
    if p[0] > p0:  # continues the previous file's document
        end = int(np.argmax(start[1:])) + 1 if start[1:].any() else n
        rank[:end] += int(p[0]) - p0
    return rank


class TokenMask:
    """The mask of one filter over files of given hooks. Args: `limits`: per hook, the L2 norm
    above which a token is dropped (None: no norm filter), from `norm_limits`; `split`: the side
    of a held-out split kept (ReadOptions.held_out)."""

    def __init__(self, spec: TokenFilter, limits: Sequence[float | None] = (), split: Split | None = None):
        self.spec, self.split = spec, split
        self.limits = list(limits)
        self._ids = np.fromiter(spec.drop_ids, np.int64) if spec.drop_ids else None

    def keep(
        self,
        states: Sequence[torch.Tensor],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        side: np.ndarray | None = None,
        norms: Sequence[torch.Tensor | None] = (),
    ) -> tuple[np.ndarray, dict[str, int]]:
        """([n] bool kept, drops per filter) of a file's tokens (`states`: per hook [..., d]; `side`:
        [n] bool, the tokens in the split read, from `Split.keep`; `norms`: per hook, the file's
        stored norms, None or absent where it has none)."""
        p = positions.reshape(-1).numpy()  # numpy: no OpenMP team for a large file
        keep = p >= 0
        dropped = dict.fromkeys(FILTERS, 0)
        f = self.spec

        def drop(name: str, bad: np.ndarray) -> None:
            bad &= keep
            dropped[name] += int(np.count_nonzero(bad))
            keep[bad] = False

        if side is not None:
            drop("split", ~side)

        if f.positions_below or f.positions_from is not None:
            bad = p < f.positions_below
            if f.positions_from is not None:
                bad |= p >= f.positions_from
            drop("positions", bad)
        if f.first:
            drop("first", document_ranks(p) < f.first)
        if self._ids is not None:
            drop("ids", np.isin(input_ids.reshape(-1).numpy(), self._ids))
        flat = [s.reshape(p.size, -1) for s in states]
        limits = list(self.limits) + [None] * (len(flat) - len(self.limits))
        if not (f.nonfinite or any(v is not None for v in limits)) or not keep.any():
            return keep, dropped
        # Stored norms, or one pass over the states per hook. A token with a NaN or Inf has a
        # non-finite norm, so only the few tokens whose norm is not finite (or overflowed float32)
        # are looked at again, exactly.
        stored = list(norms) + [None] * (len(flat) - len(norms))
        found = [
            _norms(s, n) if f.nonfinite or v is not None else None for s, n, v in zip(flat, stored, limits, strict=True)
        ]
        if f.nonfinite:
            bad = np.zeros(p.size, bool)
            for s, nrm in zip(flat, found, strict=True):
                assert nrm is not None
                suspect = np.flatnonzero(~np.isfinite(nrm))
                if suspect.size:
                    bad[suspect[~finite_rows(s[torch.from_numpy(suspect)])]] = True
            drop("nonfinite", bad)
        for nrm, limit in zip(found, limits, strict=True):
            if limit is not None and nrm is not None:
                drop("norm", nrm > np.float64(limit))  # in float64: the limit is not rounded
        return keep, dropped

    def apply(self, item: LoadedFile, url: str = "") -> FilteredFile:
        """`item` with its kept tokens (computed on the reading thread); `url` names the file in
        the split's refusal of a file without provenance."""
        side = None
        if self.split is not None:
            docs = None if item.documents is None else item.documents.reshape(-1).numpy()
            side = self.split.keep(item.file.name, docs, url or item.file.name)
        keep, dropped = self.keep(item.states, item.input_ids, item.positions, side, item.norms)
        kept = None if keep.all() else np.flatnonzero(keep)
        # Without the norms: they are views of the fetched bytes, which a compressed file lets go of.
        held = {f.name: getattr(item, f.name) for f in fields(LoadedFile) if f.name != "norms"}
        return FilteredFile(**held, kept=kept, dropped=dropped)


def _norms(states: torch.Tensor, stored: torch.Tensor | None) -> np.ndarray:
    """[n] float32: the file's stored norms of a hook's `states: [n, d]`, else computed from them."""
    return (stored if stored is not None else token_norms(states)).reshape(-1).numpy()


def norm_limits(prefixes: Sequence[Prefix], spec: TokenFilter, hooks: int) -> list[float | None]:
    """Per hook, the L2 norm above which `spec` drops a token: `max_norm`, or `max_norm_ratio`
    times the hook's median norm over every source (its statistics' histogram), the lower."""
    if spec.max_norm_ratio is None:
        return [spec.max_norm] * hooks if spec.max_norm is not None else []
    out: list[float | None] = []
    for h in range(hooks):
        parts = []
        for prefix in prefixes:
            url = prefix.store.url(prefix.folders[h])
            found = records.read_statistics(prefix.store, prefix.folders[h])
            if found is None:
                raise NotFoundError(
                    f"{url}/statistics.json does not exist; the norm filter (max_norm_ratio) needs the "
                    f"run's median norm from it ({records.REMERGE})"
                )
            parts.append(check_histogram(found.running(), url))
        stats = merge_all(parts)
        assert stats is not None
        limit = spec.max_norm_ratio * stats.median_norm()
        out.append(limit if spec.max_norm is None else min(limit, spec.max_norm))
    return out


def special_token_ids(run_uri: str) -> frozenset[int]:
    """BOS and the special tokens of the run's tokenizer (what `clean_added_tokens` cleans), from
    the tokenizer cfg.json names, if it is available on this machine (nothing is downloaded)."""
    store, key = locate(run_uri)
    rec = records.read_run(store, key, original_ok=True)
    if rec is None:
        raise NotFoundError(f"{store.url(records.cfg_key(key))} does not exist: {run_uri} is not a run folder")
    name = rec.tokenizer or rec.model.get("name")
    if not name:
        raise NotFoundError(
            f"{run_uri}'s cfg.json names no tokenizer: pass the token ids yourself, TokenFilter(drop_ids={{...}})"
        )
    from transformers import AutoTokenizer  # lazily: heavy, and only this helper needs it

    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise NotFoundError(
            f"the tokenizer of run {run_uri}, {name!r}, is not on this machine ({str(e).splitlines()[0]}): "
            f"download it once (`huggingface-cli download {name}`), or pass the token ids yourself, "
            "TokenFilter(drop_ids={...})"
        ) from None
    ids = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return frozenset(int(i) for i in ids if i is not None)
