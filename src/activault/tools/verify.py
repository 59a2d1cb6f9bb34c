"""`activault verify`: whether a stored run is complete, consistent and, with `--deep`, intact.

Every record parses; every hook holds the same files; each file's header passes the format's
validator and agrees with metadata.json (when only metadata.json disagrees, it is named, not the
files); token ids and positions are equal across hooks; statistics.json counts the files' tokens
and covers every machine. Only headers, ids and positions are read (ranged reads), unless `deep`:
then every file is read whole, each tensor's bytes are checked against its checksum, and tokens
with NaN or Inf are counted per hook. Each problem names its repair.

Here: the run as a whole (records, hooks, which files each holds, statistics, foreign objects) and
the command. Each file's checks are `verify_checks.py`'s; a vault of the original Activault is
checked by `verify_original.py`.
"""

from __future__ import annotations

from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from activault.errors import FormatError, NotFoundError
from activault.storage import Store, locate
from activault.storage.base import join
from activault.tools.inspection import foreign, list_dir
from activault.tools.shuffle import shuffled_machines
from activault.tools.verify_checks import (
    FileCheck,
    Verification,
    against_metadata,
    check_file,
    integrity_notes,
    provenance_order,
)
from activault.tools.verify_original import verify_original
from activault.tools.verify_records import check_statistics, read_records, unfinished_machines
from activault.units import human_bytes
from activault.vault import original as orig
from activault.vault.megabatch import megabatch_files
from activault.vault.records import (
    REBUILD,
    HookMetadata,
    RunRecord,
    collect_command,
    file_repair,
    metadata_key,
    parse_file_name,
    read_metadata,
    read_run,
)

DEEP_THREADS = 4  # whole files in flight at once with --deep (memory: 4 files)


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
        verify_original(store, run, hooks, dirs, deep, out)
        out.problems += foreign_objects(store, run)
        return out
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
                lambda j: check_file(store, run, j[0], j[1], names[j[0]][j[1]], deep, dims.get(j[0]), shuffled), jobs
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
        out.problems += against_metadata(h, metas.get(h), [c for c in checks if c.hook == h], out.run)
    out.tokens = sum(c.real for c in ref.values())  # the same tokens in every hook count once
    out.machines = sorted({m[0] for n in every if (m := parse_file_name(n))})
    out.unfinished = unfinished_machines(store, run, recs, set(out.machines), out.problems) if cfg else []
    if out.unfinished:
        want = recs.finished()
        total = sum(c.real for n, c in ref.items() if (m := parse_file_name(n)) and m[0] in want)
    else:
        want, total = list(range(cfg.num_runs)) if cfg else out.machines, out.tokens
    out.problems += check_statistics(store, run, list(names), total, want, not out.unfinished)
    out.problems += provenance_order(checks, out.run, shuffled) if deep else []
    out.notes += integrity_notes(checks, list(names), deep)
    if cfg is not None and cfg.imported_from is not None:
        out.notes.append(cfg.imported_from.provenance())
    out.problems += foreign_objects(store, run, claimed)
    out.hooks, out.files = len(hooks), len(every)
    out.bytes = sum(sum(fs.values()) for fs in names.values())
    return out


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
