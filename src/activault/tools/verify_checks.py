"""What verify checks in a run's files: one file's header, token ids and positions (ranged reads),
or with `deep` its whole bytes (checksums, norms, NaN/Inf, provenance within it); then the files of
a hook against each other and metadata.json, and each machine's provenance order across its files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import xxhash

from activault import dtypes
from activault.errors import FormatError
from activault.storage import Store
from activault.storage.base import REREADS, ObjectChanged, ObjectHandle, join
from activault.tools.inspection import nonfinite_tokens
from activault.vault.megabatch import (
    HEAD_READ,
    Cursor,
    Header,
    Megabatch,
    check_provenance,
    check_shuffled_provenance,
    decode,
    header_length,
    padding_values,
    parse_header,
)
from activault.vault.norms import check_norms
from activault.vault.records import REBUILD, HookMetadata, file_repair, parse_file_name


@dataclass
class FileCheck:
    """What one file holds, as far as verify read it."""

    hook: str
    name: str
    problems: list[str] = field(default_factory=list)
    header: Header | None = None
    tokens: bytes | None = None  # digest of input_ids and positions, compared across hooks
    real: int = 0  # non-padding tokens
    checksummed: bool = False  # (deep) its checksums were checked
    nonfinite: int = 0  # (deep) tokens with NaN or Inf
    span: tuple[Cursor, Cursor, bool] | None = None  # (deep) first and last real (document, position), padded


@dataclass
class Verification:
    """verify's findings: problems (the run is not sound) and notes (worth knowing)."""

    run: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hooks: int = 0
    files: int = 0
    tokens: int = 0
    bytes: int = 0
    machines: list[int] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)  # machines still collecting, or not started
    original: bool = False  # a vault of the original Activault


def check_file(
    store: Store,
    run: str,
    hook: str,
    name: str,
    size: int,
    deep: bool,
    d_model: int | None = None,
    shuffled: bool = False,
) -> FileCheck:
    """One file: its header (and `d_model`, cfg.json's width of the hook, if known); `deep`: its bytes.

    Everything is read from one version of the file (`Store.open`): a file replaced meanwhile
    (recompress) is checked old or new, and read again where the old one is gone (S3).
    """
    key = join(run, hook, name)
    for attempt in range(1, REREADS + 1):
        check = FileCheck(hook, name)
        try:
            with store.open(key, size if attempt == 1 else None) as obj:  # then: its size as it is now
                return _check_version(obj, store.url(run), check, deep, d_model, shuffled)
        except ObjectChanged:
            continue
    check.problems.append(
        f"{hook}/{name}: replaced {REREADS} times while verify read it: run verify again once "
        "whatever rewrites the run (recompress, a collect) is done"
    )
    return check


def _fetch_header(obj: ObjectHandle) -> Header:
    """A version's validated header from one small read (two for a header over HEAD_READ)."""
    if obj.size < 8:
        raise FormatError(f"{obj.url}: truncated file ({obj.size} bytes, not even a header length)")
    head = obj.read(0, min(obj.size, HEAD_READ))
    n = header_length(head[:8], obj.url)
    if head.nbytes < n <= obj.size:
        head = obj.read(0, n)
    return parse_header(head, obj.url, obj.size)


def _check_version(
    obj: ObjectHandle, run_url: str, check: FileCheck, deep: bool, d_model: int | None, shuffled: bool = False
) -> FileCheck:
    """`_check_file` of one version of the file; `shuffled`: cfg.json says the run is a shuffle."""
    hook, name = check.hook, check.name
    try:
        check.header = h = _fetch_header(obj)
        if d_model is not None and h.d_model != d_model:
            # cfg.json says what the hook produced: a header that disagrees is the broken part, and
            # nothing is decoded (or allocated) from it.
            check.problems.append(
                f"{hook}/{name}: its header says states are [{h.rows}, {h.seq_len}, {h.d_model}] "
                f"{dtypes.name(h.dtype)}, cfg.json's hook_dims give this hook d = {d_model}: the file's "
                f"header is damaged or edited, not the run's records; {file_repair(run_url, name)}"
            )
            deep = False
        if deep:
            mb = decode(obj.read(0, obj.size), obj.url, h, verify_checksums=True)
            check.checksummed = bool(h.checksums)
            check.nonfinite = nonfinite_tokens(mb.states)
            check.span = _span(mb, obj.url, shuffled)
            if mb.norms is not None:
                try:
                    check_norms(mb.states, mb.norms, obj.url, run_url)
                except FormatError as e:  # the data is intact: its own advice, not a re-collection
                    check.problems.append(f"{hook}/{name}: {str(e).split(': ', 1)[-1]}")
            if held := padding_values(mb.states, mb.tensors["positions"]):
                check.problems.append(
                    f"{hook}/{name}: {held} padding token(s) (position -1) hold non-zero states, where the "
                    "format stores zeros (an `activault import` of an earlier version kept a cache's values "
                    "there); readers leave padding out, so no batch is affected. Rewrite the files with a "
                    f"lossless conversion, which stores zeros there: `activault recompress {run_url} "
                    "--compression zstd` (for a run stored with zstd: `none`, then `zstd` again)"
                )
            ids, pos = (
                bytes(mb.tensors["input_ids"].numpy()),
                bytes(mb.tensors["positions"].numpy()),
            )
        else:
            ids, pos = (bytes(obj.read(*h.byte_range(t))) for t in ("input_ids", "positions"))
    except FormatError as e:
        check.problems.append(f"{hook}/{name}: {str(e).split(': ', 1)[-1]}; {file_repair(run_url, name)}")
        return check
    fmeta = h.metadata
    if fmeta.get("hook", hook) != hook:
        check.problems.append(f"{hook}/{name}: its header says hook {fmeta.get('hook')!r}")
    check.tokens = xxhash.xxh3_128_digest(ids + pos)
    check.real = int((torch.frombuffer(bytearray(pos), dtype=torch.int32) >= 0).sum())
    return check


def _span(mb: Megabatch, url: str, shuffled: bool = False) -> tuple[Cursor, Cursor, bool] | None:
    """A file's provenance, checked within it (FormatError), as its first and last real tokens.
    A shuffled run's files have no order: only whether the file is padded counts (first = last)."""
    docs, pos = mb.documents, mb.positions
    if docs is None or pos is None:
        return None  # written before provenance
    if shuffled:
        return (-1, -1), (-1, -1), check_shuffled_provenance(docs, pos, url)
    last = check_provenance(docs, pos, url)
    real = (docs >= 0).reshape(-1).nonzero()
    if last is None:
        return None
    i = int(real[0])
    return (int(docs.reshape(-1)[i]), int(pos.reshape(-1)[i])), last, bool((docs < 0).any())


def provenance_order(checks: list[FileCheck], run_url: str, shuffled: bool = False) -> list[str]:
    """(deep) Each machine's files continue its document stream: ordinals never decrease from one
    file to the next, a document's positions keep increasing, and only its last file is padded
    (a shuffled run's: only the last file is padded)."""
    problems = []
    prev: dict[tuple[str, int], tuple[str, Cursor, bool]] = {}
    for c in sorted(checks, key=lambda c: (c.hook, c.name)):
        m = parse_file_name(c.name)
        if c.span is None or m is None:
            continue
        first, last, padded = c.span
        before = prev.get((c.hook, m[0]))
        if before is not None and (before[2] or (not shuffled and first <= before[1])):
            why = (
                "follows a padded file"
                if before[2]
                else f"starts at (document, position) {first}, not after {before[1]}"
            )
            problems.append(
                f"{c.hook}/{c.name}: provenance {why} of {before[0]}: the machine's files are out of order or "
                f"damaged; {file_repair(run_url, c.name)}"
            )
        prev[(c.hook, m[0])] = (c.name, last, padded)
    return problems


def _spec(h: Header) -> tuple[int, int, str]:
    return h.seq_len, h.d_model, dtypes.name(h.dtype)


def against_metadata(hook: str, meta: HookMetadata | None, checks: list[FileCheck], run_url: str) -> list[str]:
    """Files that differ from most files of their hook; metadata.json when it is what differs.

    Files already found damaged (a checksum, cfg.json's hook_dims) never speak for the hook.
    """
    headers = [(c.name, c.header) for c in checks if c.header is not None and not c.problems]
    if not headers:
        return []
    common = Counter(_spec(h) for _, h in headers).most_common(1)[0][0]
    seq, d, dtype = common
    problems = [
        f"{hook}/{n}: states are [rows, {h.seq_len}, {h.d_model}] {dtypes.name(h.dtype)}, most files of "
        f"this hook [rows, {seq}, {d}] {dtype}: it does not belong here; {file_repair(run_url, n)}"
        for n, h in headers
        if _spec(h) != common
    ]
    if meta is None:
        return problems
    if (meta.seq_length, meta.d_model, meta.dtype) != common:
        problems.append(
            f"{hook}/metadata.json says [rows, {meta.seq_length}, {meta.d_model}] {meta.dtype}, the files "
            f"hold [rows, {seq}, {d}] {dtype}: metadata.json is out of date, not the files; {REBUILD}"
        )
        return problems
    problems += [
        f"{hook}/{n}: {h.rows} rows, more than metadata.json's rows_per_file {meta.rows_per_file}; "
        f"{file_repair(run_url, n)}"
        for n, h in headers
        if h.rows > meta.rows_per_file and _spec(h) == common
    ]
    return problems


def integrity_notes(checks: list[FileCheck], hooks: list[str], deep: bool) -> list[str]:
    if not deep:
        return ["checksums and NaN/Inf not checked: `activault verify --deep` reads every file whole"]
    read = [c for c in checks if c.header is not None and not c.problems]
    notes = [f"checksums verified in {sum(c.checksummed for c in read)} of {len(read)} readable files"]
    unsummed = sum(not c.checksummed for c in read)
    if unsummed:
        notes.append(
            f"{unsummed} file(s) have no checksums (format version 1, written before "
            "checksums): their bytes could not be checked"
        )
    for h in hooks:
        bad = [c for c in read if c.hook == h and c.nonfinite]
        if bad:
            notes.append(
                f"{h}: {sum(c.nonfinite for c in bad):,} token(s) with NaN or Inf in "
                f"{len(bad)} file(s), e.g. {bad[0].name}"
            )
    return notes
