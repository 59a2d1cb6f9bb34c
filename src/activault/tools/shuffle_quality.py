"""`shuffle_quality`: how well a reader mixes, as the fraction of pairs within a batch from the same
document (or file), against the rate of an ideal uniform shuffle of the same tokens (docs/guide.md,
"Shuffle quality, measured")."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from activault.errors import ConfigError, FormatError
from activault.reading.listing import Catalog
from activault.reading.stream import Source
from activault.reading.tokens import TokenLoader
from activault.reading.window import same_source_pairs, uniform_same_source_pairs
from activault.storage import Store
from activault.vault.megabatch import decode
from activault.vault.records import parse_file_name


@dataclass
class Quality:
    """Same-source pair rate of a reader's batches against an ideal uniform shuffle of the same tokens."""

    by: Literal["document", "file"]
    batches: int
    tokens: int
    rate: float  # mean over the batches of `same_source_pairs`
    ideal: float  # an ideal uniform shuffle's rate (`uniform_same_source_pairs`; a mixture's: each run's)
    unmatched: int = 0  # batch tokens whose stored bytes occur in several sources (left out)

    @property
    def ratio(self) -> float:
        return self.rate / self.ideal if self.ideal > 0 else math.inf


def _keys(states: Sequence[torch.Tensor], ids: torch.Tensor, pos: torch.Tensor) -> np.ndarray:
    """Each token's stored bytes (every hook's state, id, position) as one numpy void value."""
    n = int(ids.numel())
    parts = [s.reshape(n, -1).contiguous().view(torch.uint8).numpy() for s in states]
    parts += [
        ids.reshape(n, 1).to(torch.int32).view(torch.uint8).numpy(),
        pos.reshape(n, 1).to(torch.int32).view(torch.uint8).numpy(),
    ]
    rows = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return rows.view(np.dtype((np.void, rows.shape[1]))).reshape(n)


def _sources(catalog: Catalog, by: str, drop_below: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, source ids from 0) of each file's delivered tokens, in name order: a document starts
    where positions restart (a position that does not follow the previous token's), or each file is one."""
    doc, prev, machine = -1, -2, None
    for fi, f in enumerate(sorted((r for block in catalog.blocks for r in block), key=lambda r: (r.source, r.name))):
        prefix = catalog.prefixes[f.source]
        mbs = [
            decode(prefix.store.get(prefix.key(h, f.name)), prefix.url(h, f.name)) for h in range(len(prefix.folders))
        ]
        pos = mbs[0].positions
        if pos is None:
            raise FormatError(f"{prefix.url(0, f.name)} has no positions: shuffle quality needs them")
        p = pos.reshape(-1).numpy().astype(np.int64)
        parsed = parse_file_name(f.name)
        if by == "file":
            src = np.full(p.size, fi)
        else:
            if parsed is None or (f.source, parsed[0]) != machine:
                prev = -2  # a new machine's stream: no document continues into it
            machine = None if parsed is None else (f.source, parsed[0])
            before = np.concatenate([[prev], p[:-1]])
            starts = (p >= 0) & (p != before + 1)
            src = doc + np.cumsum(starts)
            doc, prev = int(src[-1]) if src.size else doc, int(p[-1]) if p.size else prev
        keep = p >= max(drop_below, 0)
        keys = _keys([m.states for m in mbs], mbs[0].input_ids, pos)
        yield keys[keep], src[keep]


def _references(loader: TokenLoader, reference: Source | Sequence[Source] | None) -> list[Catalog]:
    """The catalog of each run whose documents the loader's tokens are matched to."""
    runs = loader.run_files
    if reference is None:
        return [r.catalog for r in runs]
    if loader.weights is None:
        return [Catalog(reference, hooks=loader.hooks)]
    if isinstance(reference, str | Path | Store) or len(reference) != len(runs):
        raise ConfigError(
            f"reference={reference!r}: a mixture of {len(runs)} runs needs a list of {len(runs)} references, "
            "one per run (a source, or a list of its prefixes), in the order of weights"
        )
    return [Catalog(r, hooks=loader.hooks) for r in reference]


def shuffle_quality(
    loader: TokenLoader,
    batches: int,
    reference: Source | Sequence[Source] | None = None,
    by: Literal["document", "file"] = "document",
) -> Quality:
    """The fraction of pairs within each of the loader's first `batches` batches that come from the
    same document (or file), averaged, and the rate of an ideal uniform shuffle of the same tokens.

    Tokens are matched to their source by their stored bytes, so the loader must deliver them as
    stored (`return_ids=True`, no normalisation or dtype). Documents are those of `reference`
    (default the loader's own files): give the source run for a run written by `activault shuffle`,
    and for a mixture (weights=) one reference per run. A mixture's ideal is a uniform shuffle of
    each run at the batch's share of it: sum over runs of n_i (n_i - 1) x run i's ideal, over n (n - 1).
    """
    if not loader.return_ids or loader.dtype is not None:
        raise ConfigError(
            "shuffle_quality needs the tokens as stored: make the TokenLoader with return_ids=True and "
            "without center, norm_target or dtype"
        )
    if batches < 1:
        raise ConfigError(f"batches={batches}: pass a whole number >= 1")
    catalogs = _references(loader, reference)
    seen: list[np.ndarray] = []
    for i, batch in enumerate(loader):
        st = batch["states"]
        states = [st[h] for h in loader.hooks or []] if isinstance(st, dict) else [st]
        seen.append(_keys(states, batch["input_ids"], batch["positions"]))
        if i + 1 == batches:
            break
    wanted = np.unique(np.concatenate(seen))
    where: dict[bytes, int] = {}  # a token's stored bytes -> its source (ids unique over the runs)
    ambiguous: set[bytes] = set()
    run_of: list[int] = []  # each source's run
    counts: list[list[int]] = [[] for _ in catalogs]  # each run's tokens per source
    for run, catalog in enumerate(catalogs):
        base = len(run_of)
        for keys, local in _sources(catalog, by, loader.drop_below):
            src = local + base
            ids, n = np.unique(src, return_counts=True)
            for s, c in zip(ids.tolist(), n.tolist(), strict=True):
                while len(run_of) <= s:
                    run_of.append(run)
                    counts[run].append(0)
                counts[run][s - base] += c
            hit = np.isin(keys, wanted)
            for k, s in zip(keys[hit].tolist(), src[hit].tolist(), strict=True):
                if where.setdefault(k, s) != s:
                    ambiguous.add(k)
    uniform = np.array([uniform_same_source_pairs(np.array(c)) for c in counts])
    rates, ideals, unmatched, tokens = [], [], 0, 0
    for keys in seen:
        found = np.array([where[k] for k in keys.tolist() if k in where and k not in ambiguous], np.int64)
        unmatched += keys.size - found.size
        tokens += keys.size
        rates.append(same_source_pairs(found))
        per_run = np.bincount(np.array(run_of, np.int64)[found], minlength=len(catalogs)).astype(np.float64)
        pairs = found.size * (found.size - 1)
        ideals.append(float((per_run * (per_run - 1) * uniform).sum() / pairs) if pairs else 0.0)
    return Quality(by, len(seen), tokens, float(np.mean(rates)), float(np.mean(ideals)), unmatched)
