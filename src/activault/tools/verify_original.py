"""verify of a vault written by the original Activault (vault/original.py): no headers, positions,
checksums, progress or exact statistics, so its records are checked, its `.pt` files are named
alike in every hook and, with `deep`, each is loaded (no pickled code runs) and checked against
metadata.json. Nothing here can rebuild its files: every repair is a restore.
"""

from __future__ import annotations

import torch
import xxhash

from activault import dtypes
from activault.errors import FormatError
from activault.storage import Store
from activault.storage.base import join
from activault.tools.inspection import foreign, list_dir, nonfinite_tokens
from activault.tools.verify_checks import Verification
from activault.vault import original as orig
from activault.vault.megabatch import decode, megabatch_files
from activault.vault.records import HookMetadata, read_metadata, read_original_statistics

RESTORE = "restore it from a copy of the vault (activault cannot rebuild the original's files)"


def verify_original(store: Store, run: str, hooks: list[str], dirs: list[str], deep: bool, out: Verification) -> None:
    """An original vault into `out`: its records parse, every hook holds the same `.pt` files; `deep`
    loads them."""
    out.original, inexact = True, False
    names: dict[str, dict[str, int]] = {}
    metas: dict[str, HookMetadata | None] = {}
    for h in hooks:
        if h not in dirs:
            out.problems.append(f"{h}: hook folder is missing; {RESTORE}")
            continue
        folder = join(run, h)
        names[h] = megabatch_files(f for f in list_dir(store, folder)[1] if foreign(f) is None)
        metas[h] = None
        try:
            metas[h] = meta = read_metadata(store, folder)
            stats = read_original_statistics(store, folder)
        except FormatError as e:
            out.problems.append(str(e))
            continue
        inexact |= stats is not None
        if meta is None:
            out.notes.append(f"{h}: metadata.json is missing: the files' shape is the first file's")
        elif stats is not None and len(stats.mean) != meta.d_model:
            out.problems.append(
                f"{h}: statistics.json has {len(stats.mean)} means, metadata.json says d_in {meta.d_model}"
            )
    every = sorted(set().union(*names.values())) if names else []
    for h, fs in names.items():
        if missing := [n for n in every if n not in fs]:
            listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            out.problems.append(f"{h}: {len(missing)} file(s) missing that other hooks have: {listed}; {RESTORE}")
    if deep:
        _load_original(store, run, names, metas, out)
    else:
        out.notes.append("the original's .pt files have no header or checksums: `activault verify --deep` loads each")
    if inexact:
        out.notes.append(f"statistics.json holds {orig.NOT_EXACT}")
    out.hooks, out.files = len(hooks), len(every)
    out.bytes = sum(sum(fs.values()) for fs in names.values())


def _load_original(
    store: Store, run: str, names: dict[str, dict[str, int]], metas: dict[str, HookMetadata | None], out: Verification
) -> None:
    """Each `.pt` file loaded: its states agree with metadata.json, its ids with the other hooks'."""
    ids: dict[str, tuple[str, bytes]] = {}
    for h, fs in names.items():
        meta, nonfinite = metas.get(h), 0
        for n in sorted(fs):
            key = join(run, h, n)
            try:
                mb = decode(store.get(key), store.url(key))
            except FormatError as e:
                out.problems.append(f"{h}/{n}: {str(e).split(': ', 1)[-1]}; {RESTORE}")
                continue
            rows, seq, d = mb.states.shape
            if meta is not None and (
                (seq, d, dtypes.name(mb.states.dtype)) != (meta.seq_length, meta.d_model, meta.dtype)
                or rows > meta.rows_per_file
            ):
                out.problems.append(
                    f"{h}/{n}: states are [{rows}, {seq}, {d}] {dtypes.name(mb.states.dtype)}, metadata.json says "
                    f"[rows <= {meta.rows_per_file}, {meta.seq_length}, {meta.d_model}] {meta.dtype}"
                )
            nonfinite += nonfinite_tokens(mb.states)
            digest = xxhash.xxh3_128_digest(mb.input_ids.to(torch.int64).contiguous().numpy().tobytes())
            first = ids.setdefault(n, (h, digest))
            if first[1] != digest:
                out.problems.append(
                    f"{h}/{n}: token ids differ from {first[0]}/{n}: these hooks do not hold the same tokens"
                )
            elif first[0] == h:
                out.tokens += rows * seq
        if nonfinite:
            out.notes.append(f"{h}: {nonfinite:,} token(s) with NaN or Inf")
