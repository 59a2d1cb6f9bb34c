"""`collect --repair`: which of a machine's counted files are damaged or missing, and the batches
that collect exactly those again.

Collection is deterministic (same config, data and seed: the same bytes), so a damaged copy is
collected again rather than restored. The scan reads every copy the progress record counts, whole,
as `verify --deep` does. Then, before anything is written, the machine's data is packed again (no
forward pass) and every file's tokens are compared with an intact copy, and the end with the
progress record's cursor: data that changed since the run was collected is refused instead of
written under the old names. Only then does the model run, over the damaged files' batches alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from activault.errors import DataError, FormatError, NotFoundError
from activault.storage import Store
from activault.storage.base import join
from activault.vault.megabatch import decode
from activault.vault.records import HookMetadata, file_name

if TYPE_CHECKING:
    from activault.collection.packing import Batch

log = logging.getLogger(__name__)

SCAN_THREADS = 4  # whole files read at once (memory: 4 files)
CHANGED = (
    "the data source, the tokenizer or the data settings changed since the run was collected, so "
    "collecting again would not give the same bytes. Nothing was written; restore the data and "
    "tokenizer the run was collected with, then repair again"
)


@dataclass
class Damage:
    """What the scan of one machine's counted files found."""

    files: int  # files the progress record counts
    broken: dict[int, list[str]] = field(default_factory=dict)  # file index -> hooks whose copy is bad
    problems: list[str] = field(default_factory=list)  # one line per bad copy
    tokens: dict[int, bytes] = field(default_factory=dict)  # file index -> token digest of an intact copy

    @property
    def last(self) -> int:
        """The last file to collect again (-1: none)."""
        return max(self.broken, default=-1)


def token_digest(input_ids: torch.Tensor, positions: torch.Tensor) -> bytes:
    """One digest of a file's tokens: ids and positions, [rows, seq] int32 each."""
    h = xxhash.xxh3_128()
    for t in (input_ids, positions):
        h.update(t.to(torch.int32).contiguous().numpy().tobytes())
    return h.digest()


def _check_copy(
    store: Store, run: str, hook: str, meta: HookMetadata, machine: int, k: int
) -> tuple[str | None, bytes | None]:
    """(problem, None) for a damaged or missing copy of file k, else (None, its token digest)."""
    key = join(run, hook, file_name(machine, k))
    url = store.url(key)
    try:
        mb = decode(store.get(key), url, verify_checksums=True)
    except NotFoundError:
        return f"{hook}/{file_name(machine, k)}: missing", None
    except FormatError as e:
        return f"{hook}/{file_name(machine, k)}: {str(e).removeprefix(url + ': ')}", None
    want = {"run_name": run, "hook": hook, "machine": str(machine), "file_index": str(k)}
    said = {name: mb.metadata.get(name) for name in want}
    if said != want:  # another file under this name
        return f"{hook}/{file_name(machine, k)}: its header says {said}, not {want}", None
    odd = meta.disagreement(mb.header) if mb.header is not None else "no header"
    if odd is not None or mb.positions is None:
        return f"{hook}/{file_name(machine, k)}: {odd or 'no positions'}", None
    return None, token_digest(mb.input_ids, mb.positions)


def scan(store: Store, run: str, metadata: Mapping[str, HookMetadata], machine: int, files: int) -> Damage:
    """Read every copy of machine `machine`'s files 0..files-1 in every hook; which are bad."""
    damage = Damage(files)
    jobs = [(k, h) for k in range(files) for h in metadata]
    with ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="activault-repair") as pool:
        found = pool.map(lambda job: _check_copy(store, run, job[1], metadata[job[1]], machine, job[0]), jobs)
        for (k, h), (problem, digest) in zip(jobs, found, strict=True):
            if problem is not None:
                damage.broken.setdefault(k, []).append(h)
                damage.problems.append(problem)
            elif digest is not None:
                damage.tokens.setdefault(k, digest)
    return damage


def file_batches(
    batches: Iterator[Batch], last: int, batches_per_upload: int, n_batches: int, rows_per_file: int
) -> Iterator[tuple[int, list[Batch]]]:
    """(k, file k's batches) for k = 0..last, grouped as the collection grouped them."""
    for k in range(last + 1):
        group: list[Batch] = []
        for _ in range(min(batches_per_upload, n_batches - k * batches_per_upload)):
            batch = next(batches, None)
            if batch is None:
                break
            group.append(batch)
        if not group:
            return
        yield k, group
        if sum(b.input_ids.shape[0] for b in group) < rows_per_file:
            return  # the data ran out: this partial file was the machine's last


def stored_tokens(batch: Batch, seq_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a file stores of a batch: (ids, positions) [B, seq_length] and the forward positions
    they come from, [B*seq_length] (cleaned tokens are forwarded, not stored)."""
    B = batch.input_ids.shape[0]
    flat = batch.keep.reshape(-1).nonzero().squeeze(1)
    ids = batch.input_ids.reshape(-1)[flat].view(B, seq_length)
    return ids, batch.doc_positions.reshape(-1)[flat].view(B, seq_length), flat


def check_data(
    files: Iterator[tuple[int, list[Batch]]],
    damage: Damage,
    data_state: Mapping[str, Any] | None,
    seq_length: int,
    where: str,
) -> None:
    """Before anything is written: the data packed again gives every counted file's tokens (where an
    intact copy tells them) and ends at the record's cursor; DataError if it does not."""
    from activault.collection.packing import DataState

    done, state = 0, None
    for k, group in files:
        parts = [stored_tokens(b, seq_length) for b in group]
        ids = torch.cat([p[0] for p in parts]).to(torch.int32)
        pos = torch.cat([p[1] for p in parts]).to(torch.int32)
        check_tokens(damage, k, token_digest(ids, pos), where)
        done, state = k + 1, group[-1].state
    if done < damage.files or (data_state and state != DataState.from_dict(data_state)):
        raise DataError(
            f"{where}: the data packed again ends elsewhere than the progress record's cursor (after "
            f"{done} of its {damage.files} files): {CHANGED}"
        )


def check_tokens(damage: Damage, k: int, digest: bytes, where: str) -> None:
    """File k packed again must hold the tokens of its intact copies; DataError if not."""
    stored = damage.tokens.get(k)
    if stored is not None and stored != digest:
        raise DataError(f"{where}: file {k} packed again holds other tokens than its stored copies: {CHANGED}")


def summary(damage: Damage) -> str:
    """One line: what the scan found."""
    if not damage.broken:
        return f"nothing to repair: all {damage.files} counted files are intact in every hook"
    copies = sum(len(h) for h in damage.broken.values())
    return (
        f"{copies} damaged or missing copies in {len(damage.broken)} of {damage.files} counted files "
        f"({sorted(damage.broken)}): collecting them again"
    )
