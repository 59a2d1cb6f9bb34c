"""`activault verify`: whether a stored run is complete, consistent and, with `--deep`, intact.

Every record parses; every hook holds the same files; each file's header passes the format's
validator and agrees with metadata.json (when only metadata.json disagrees, it is named, not the
files); token ids and positions are equal across hooks; statistics.json counts the files' tokens
and covers every machine. Only headers, ids and positions are read (ranged reads), unless `deep`:
then every file is read whole, each tensor's bytes are checked against its checksum, and tokens
with NaN or Inf are counted per hook. Each problem names its repair.

A vault of the original Activault (vault/original.py) has no headers, positions, checksums,
progress or exact statistics: its records are checked, its `.pt` files are named alike in every
hook and, with `deep`, each is loaded (no pickled code runs) and checked against metadata.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from activault import dtypes
from activault.errors import FormatError, NotFoundError
from activault.storage import Store, locate
from activault.storage.base import REREADS, ObjectChanged, ObjectHandle, join
from activault.tools.inspection import foreign, list_dir, nonfinite_tokens
from activault.tools.shuffle import shuffled_machines
from activault.tools.verify_records import check_statistics, read_records, unfinished_machines
from activault.units import human_bytes
from activault.vault import original as orig
from activault.vault.megabatch import (
    HEAD_READ,
    Cursor,
    Header,
    Megabatch,
    check_provenance,
    check_shuffled_provenance,
    decode,
    header_length,
    megabatch_files,
    parse_header,
)
from activault.vault.norms import check_norms
from activault.vault.records import (
    REBUILD,
    HookMetadata,
    RunRecord,
    collect_command,
    file_repair,
    metadata_key,
    parse_file_name,
    read_metadata,
    read_original_statistics,
    read_run,
)

DEEP_THREADS = 4  # whole files in flight at once with --deep (memory: 4 files)
RESTORE = "restore it from a copy of the vault (activault cannot rebuild the original's files)"


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


def _check_file(
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


def _provenance_order(checks: list[FileCheck], run_url: str, shuffled: bool = False) -> list[str]:
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


def _against_metadata(hook: str, meta: HookMetadata | None, checks: list[FileCheck], run_url: str) -> list[str]:
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


def _run_record(store: Store, run: str) -> tuple[RunRecord | None, str | None]:
    """cfg.json (the original Activault's too), or why it cannot be read."""
    try:
        return read_run(store, run, original_ok=True), None
    except FormatError as e:
        return None, str(e)


def _hooks(store: Store, run: str, cfg: RunRecord | None, dirs: list[str]) -> list[str]:
    if cfg is not None:
        return list(cfg.hooks)
    if not dirs:
        raise NotFoundError(f"{store.url(run)} holds no run (no cfg.json, no hook folders)")
    return [d for d in dirs if store.exists(metadata_key(join(run, d)))]


def _hook_files(
    store: Store, run: str, hook: str, counted: dict[str, int], out: Verification, claimed: set[str]
) -> dict[str, int]:
    """The hook's megabatch files (name -> size); one too short to be a file that a record counts
    is a problem (it was lost), added to `claimed` so that it is not named as a foreign object too."""
    files = {}
    for e in list_dir(store, join(run, hook))[1]:
        name = e.key.rsplit("/", 1)[-1]
        if foreign(e) is None:
            files.update(megabatch_files([e]))
        elif e.kind == "file" and name in counted:
            claimed.add(e.key)
            out.problems.append(
                f"{hook}/{name}: {e.size} bytes, but machine {counted[name]}'s progress record counts it: the "
                f"file is lost (truncated to nothing); {file_repair(out.run, name)}"
            )
    return files


def verify_run(store: Store, run: str = "", threads: int = 8, deep: bool = False) -> Verification:
    """Problems and notes of a stored run (no problems: it is sound) and a summary; `unfinished`
    names the machines still collecting."""
    out = Verification(store.url(run))
    cfg, damaged = _run_record(store, run)
    dirs, _ = list_dir(store, run)
    hooks = _hooks(store, run, cfg, dirs)
    if damaged:
        out.problems.append(damaged)
    if cfg.original is not None if cfg else orig.is_original_run(store, run):
        if cfg is None and not damaged:
            out.notes.append("cfg.json is missing: the hooks are the folders with a metadata.json")
        return _verify_original(store, run, hooks, dirs, deep, out)
    if cfg is None and not damaged:
        out.problems.append(f"cfg.json is missing; {REBUILD}")
    recs = read_records(store, run, cfg, out.problems)  # before the listing: a file it counts is listed then
    stored = not (cfg and isinstance(data := cfg.config.get("data_config"), dict) and data.get("skip_cache"))
    counted = recs.counted() if stored else {}
    metas: dict[str, HookMetadata | None] = {}
    names: dict[str, dict[str, int]] = {}
    claimed: set[str] = set()
    for h in hooks:
        if h not in dirs:
            out.problems.append(f"{h}: hook folder is missing")
            continue
        try:
            metas[h] = read_metadata(store, join(run, h))
        except FormatError as e:
            metas[h] = None
            out.problems.append(str(e))
        else:
            if metas[h] is None:
                out.problems.append(f"{h}: metadata.json is missing; {REBUILD}")
        names[h] = _hook_files(store, run, h, counted, out, claimed)
    every = sorted(set(counted).union(*names.values())) if names else []
    for h, fs in names.items():
        lost = {k.rsplit("/", 1)[-1] for k in claimed if k.startswith(join(run, h) + "/")}
        missing = [n for n in every if n not in fs and n not in lost and not recs.in_flight(n)]
        if missing:
            out.problems.append(
                f"{h}: {len(missing)} file(s) missing that other hooks or the progress records have: "
                + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "")
                + f"; {file_repair(out.run, missing[0])}"
            )
    jobs = [(h, n) for h in names for n in sorted(names[h])]
    dims = cfg.hook_dims if cfg else {}
    # The run's record, never a file, says whether its files are in collection order.
    try:
        shuffled = cfg is not None and shuffled_machines(cfg) is not None
    except FormatError as e:
        shuffled = True
        out.problems.append(str(e))
    with ThreadPoolExecutor(min(threads, DEEP_THREADS) if deep else threads) as pool:
        checks = list(
            pool.map(
                lambda j: _check_file(store, run, j[0], j[1], names[j[0]][j[1]], deep, dims.get(j[0]), shuffled), jobs
            )
        )
    ref: dict[str, FileCheck] = {}
    for c in checks:
        out.problems += c.problems
        if c.tokens is None:
            continue
        first = ref.setdefault(c.name, c)
        if first.tokens != c.tokens:
            out.problems.append(
                f"{c.hook}/{c.name}: token ids or positions differ from "
                f"{first.hook}/{c.name}; {file_repair(out.run, c.name)}"
            )
    for h in names:
        out.problems += _against_metadata(h, metas.get(h), [c for c in checks if c.hook == h], out.run)
    out.tokens = sum(c.real for c in ref.values())  # the same tokens in every hook count once
    out.machines = sorted({m[0] for n in every if (m := parse_file_name(n))})
    out.unfinished = unfinished_machines(store, run, recs, set(out.machines), out.problems) if cfg else []
    if out.unfinished:
        want = recs.finished()
        total = sum(c.real for n, c in ref.items() if (m := parse_file_name(n)) and m[0] in want)
    else:
        want, total = list(range(cfg.num_runs)) if cfg else out.machines, out.tokens
    out.problems += check_statistics(store, run, list(names), total, want, not out.unfinished)
    out.problems += _provenance_order(checks, out.run, shuffled) if deep else []
    out.notes += _integrity_notes(checks, list(names), deep)
    if cfg is not None and cfg.imported_from is not None:
        out.notes.append(cfg.imported_from.provenance())
    out.problems += foreign_objects(store, run, claimed)
    out.hooks, out.files = len(hooks), len(every)
    out.bytes = sum(sum(fs.values()) for fs in names.values())
    return out


def _verify_original(
    store: Store, run: str, hooks: list[str], dirs: list[str], deep: bool, out: Verification
) -> Verification:
    """An original vault: its records parse, every hook holds the same `.pt` files; `deep` loads them."""
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
    out.problems += foreign_objects(store, run)
    out.hooks, out.files = len(hooks), len(every)
    out.bytes = sum(sum(fs.values()) for fs in names.values())
    return out


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


def _integrity_notes(checks: list[FileCheck], hooks: list[str], deep: bool) -> list[str]:
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


def foreign_objects(store: Store, run: str, claimed: Collection[str] = ()) -> list[str]:
    """The run's objects that activault never writes (links, devices, bad keys, empty megabatches),
    but those in `claimed` (keys named already as a lost file)."""
    out = []
    for e in store.list(run):
        if (why := foreign(e)) is not None and e.key not in claimed:
            rel = e.key[len(run) :].lstrip("/") if run else e.key
            out.append(f"{rel}: foreign object ({why}), skipped; delete it (`rm` in `activault shell`)")
    return out


def store_runs(store: Store, key: str) -> list[str]:
    """The runs directly under `key` if it is a store's root (or a folder of runs), else []."""
    if store.exists(join(key, "cfg.json")):
        return []
    dirs, _ = list_dir(store, key)
    if any(store.exists(join(key, d, "metadata.json")) for d in dirs):
        return []  # a run whose cfg.json is missing
    return [d for d in dirs if store.exists(join(key, d, "cfg.json")) or list_dir(store, join(key, d, "progress"))[1]]


UNFINISHED = 3  # verify's exit status for a run whose machines are still collecting, nothing wrong so far


def run_verify(uri: str, deep: bool = False) -> int:
    """`activault verify`: print the problems (exit 1), or that the run is unfinished (exit 3,
    `UNFINISHED`), or a one-line summary (exit 0), then notes; on a store's root, its runs (exit 2)."""
    store, key = locate(uri)
    if runs := store_runs(store, key):
        print(f"{store.url(key)} is a store, not a run; verify one of its {len(runs)} run(s):")
        print("\n".join(f"  activault verify {store.url(join(key, r))}" for r in runs))
        return 2
    v = verify_run(store, key, deep=deep)
    waiting = (
        f"run unfinished: machines {v.unfinished} still collecting; rerun verify when they finish (a machine "
        f"that stopped resumes with its collect command, {collect_command(v.unfinished[0])})"
        if v.unfinished
        else ""
    )
    if v.problems:
        print(f"{v.run}: {len(v.problems)} problem(s)")
        print("\n".join(f"  - {p}" for p in v.problems))
        if waiting:
            v.notes.insert(0, waiting)
    elif waiting:
        print(f"{v.run}: {waiting}")
        print(f"  so far: {v.hooks} hooks, {v.files} files per hook, {v.tokens:,} tokens, no problem found")
    elif v.original:
        tokens = f"{v.tokens:,} tokens, files loaded" if deep else "tokens not counted (--deep loads the files)"
        print(f"OK  {v.run}: {orig.WHAT}, {v.hooks} hooks, {v.files} files per hook, {tokens}, {human_bytes(v.bytes)}")
    else:
        print(
            f"OK  {v.run}: {v.hooks} hooks, {v.files} files per hook, {v.tokens:,} tokens, "
            f"{human_bytes(v.bytes)}, machines {v.machines}" + (", checksums checked" if deep else "")
        )
    for n in v.notes:
        print(f"  note: {n}")
    return 1 if v.problems else UNFINISHED if v.unfinished else 0
