"""`activault verify`: whether a stored run is complete and consistent.

Every hook holds the same files; shapes and dtypes match `metadata.json`; token ids and positions
are equal across hooks; `statistics.json` counts the files' tokens and covers every machine.
Only headers, ids and positions are read (ranged reads), never the states.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from activault.errors import FormatError, NotFoundError
from activault.storage import Store, locate
from activault.tools.inspection import foreign, join, list_dir
from activault.units import human_bytes
from activault.vault.megabatch import (
    dtype_name,
    fetch_header,
    logical_specs,
    megabatch_files,
    parse_file_name,
    tensor_specs,
)
from activault.vault.records import RECOLLECT, REMERGE, read_json

# (problems, ids + positions bytes or None when unreadable, non-padding tokens) of one file
FileCheck = tuple[list[str], bytes | None, int]


def _read_specs(store: Store, key: str, size: int) -> tuple[dict[str, Any], int, dict[str, Any], dict[str, Any]]:
    """(header, data start, tensor specs, decoded dtype and shape of each) without fetching tensors."""
    header, start = fetch_header(store, key, size)
    specs = tensor_specs(header, size - start, store.url(key))
    return header, start, specs, logical_specs(header, store.url(key))


def _check_file(store: Store, run: str, hook: str, fname: str, size: int, meta: dict[str, Any]) -> FileCheck:
    """Problems of one file, its ids+positions bytes, and its count of non-padding tokens."""
    key, where = join(run, hook, fname), f"{hook}/{fname}"
    try:
        header, start, specs, logical = _read_specs(store, key, size)
    except FormatError as e:
        return [f"{where}: {str(e).split(': ', 1)[-1]}"], None, 0
    problems = []
    if "states" not in specs:
        return [f"{where}: no 'states' tensor"], None, 0
    dtype, shape = logical["states"]
    rows = shape[0] if shape else 0
    want = [meta.get("seq_length"), meta.get("d_model")]
    if len(shape) != 3 or shape[1:] != want or rows > int(meta.get("rows_per_file", rows)):
        problems.append(f"{where}: states shape {shape} does not match metadata.json (rows<={meta.get('rows_per_file')}, {want[0]}, {want[1]})")
    if dtype_name(dtype) != meta.get("dtype"):
        problems.append(f"{where}: states dtype {dtype_name(dtype)} but metadata.json says {meta.get('dtype')}")
    fmeta = header.get("__metadata__") or {}
    if fmeta.get("hook", hook) != hook:
        problems.append(f"{where}: header says hook {fmeta.get('hook')!r}")
    blob, real = b"", 0
    for t in ("input_ids", "positions"):
        if t not in specs:
            problems.append(f"{where}: no {t!r} tensor")
            continue
        tdtype, tshape, s, end = specs[t]
        if tshape != shape[:2] or tdtype != torch.int32:
            problems.append(f"{where}: {t} is {tshape} {dtype_name(tdtype)}, expected {shape[:2]} int32")
            continue
        raw = bytes(store.get_range(key, start + s, start + end))
        blob += raw
        if t == "positions":
            real = int((torch.frombuffer(bytearray(raw), dtype=torch.int32) >= 0).sum()) if raw else 0
    return problems, blob, real


def _run_hooks(store: Store, run: str, cfg: dict[str, Any] | None) -> tuple[list[str], list[str], list[str]]:
    """(hooks: from cfg.json, else the folders with a metadata.json; the run's folders; problems)."""
    dirs, _ = list_dir(store, run)
    if cfg is not None:
        return list(cfg.get("hooks") or []), dirs, []
    if not dirs:
        raise NotFoundError(f"{store.url(run)} holds no run (no cfg.json, no hook folders)")
    return [d for d in dirs if store.exists(join(run, d, "metadata.json"))], dirs, ["cfg.json is missing"]


def _hook_files(
    store: Store, run: str, hooks: list[str], dirs: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]], list[str]]:
    """(metadata.json and megabatch name -> size of every hook folder present; problems)."""
    metas: dict[str, dict[str, Any]] = {}
    names: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for h in hooks:
        if h not in dirs:
            problems.append(f"{h}: hook folder is missing")
            continue
        metas[h] = read_json(store, join(run, h, "metadata.json"), RECOLLECT) or {}
        if not metas[h]:
            problems.append(f"{h}: metadata.json is missing")
        _, files = list_dir(store, join(run, h))
        names[h] = megabatch_files(f for f in files if foreign(f) is None)
    return metas, names, problems


def _missing_files(names: dict[str, dict[str, int]], every: list[str]) -> list[str]:
    """Files that some hook lacks but another has."""
    problems = []
    for h, fs in names.items():
        missing = [n for n in every if n not in fs]
        if missing:
            problems.append(f"{h}: {len(missing)} file(s) missing that other hooks have: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return problems


def _check_files(
    store: Store, run: str, metas: dict[str, dict[str, Any]], names: dict[str, dict[str, int]], threads: int
) -> tuple[list[str], int]:
    """Problems of every file (ids and positions compared across hooks) and the run's non-padding tokens."""
    jobs = [(h, n) for h in names for n in sorted(names[h])]
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda j: _check_file(store, run, j[0], j[1], names[j[0]][j[1]], metas[j[0]]), jobs))
    problems: list[str] = []
    ref: dict[str, tuple[str, bytes]] = {}
    tokens: dict[str, int] = {}  # per file name: the same tokens in every hook count once
    for (h, n), (probs, blob, real) in zip(jobs, results, strict=True):
        problems += probs
        if blob is None:
            continue
        if n not in ref:
            ref[n], tokens[n] = (h, blob), real
        elif ref[n][1] != blob:
            problems.append(f"{h}/{n}: token ids or positions differ from {ref[n][0]}/{n}")
    return problems, sum(tokens.values())


def _check_statistics(store: Store, run: str, hooks: list[str], total: int, want_machines: list[int]) -> list[str]:
    """statistics.json of each hook: present, counting `total` tokens, covering `want_machines`."""
    problems = []
    for h in hooks:
        stats = read_json(store, join(run, h, "statistics.json"), REMERGE)
        if stats is None:
            problems.append(f"{h}: statistics.json is missing")
            continue
        if int(stats.get("count", -1)) != total:
            problems.append(f"{h}: statistics.json counts {stats.get('count')} tokens, the files hold {total} non-padding tokens")
        if "machines" not in stats:
            problems.append(f"{h}: statistics.json lists no machines")
        elif sorted(stats["machines"]) != want_machines:
            problems.append(f"{h}: statistics.json covers machines {stats['machines']}, expected {want_machines}")
    return problems


def verify_run(store: Store, run: str = "", threads: int = 8) -> tuple[list[str], dict[str, Any]]:
    """Problems of a stored run (empty when clean) and a summary."""
    cfg = read_json(store, join(run, "cfg.json"), RECOLLECT)
    hooks, dirs, problems = _run_hooks(store, run, cfg)
    metas, names, hook_problems = _hook_files(store, run, hooks, dirs)
    every = sorted(set().union(*names.values())) if names else []
    file_problems, total = _check_files(store, run, metas, names, threads)
    machines = sorted({m[0] for n in every if (m := parse_file_name(n))})
    want_machines = list(range(int(cfg["num_runs"]))) if cfg and "num_runs" in cfg else machines
    problems += hook_problems + _missing_files(names, every) + file_problems
    problems += _check_statistics(store, run, list(names), total, want_machines)
    problems += foreign_objects(store, run)
    summary = {"run": store.url(run), "hooks": len(hooks), "files": len(every), "tokens": total,
               "bytes": sum(sum(fs.values()) for fs in names.values()), "machines": machines}  # fmt: skip
    return problems, summary


def foreign_objects(store: Store, run: str) -> list[str]:
    """The run's objects that activault never writes (links, devices, bad keys, empty megabatches)."""
    out = []
    for e in store.list(run):
        if (why := foreign(e)) is not None:
            rel = e.key[len(run) :].lstrip("/") if run else e.key
            out.append(f"{rel}: foreign object ({why}), skipped; delete it (`rm` in `activault s3`)")
    return out


def store_runs(store: Store, key: str) -> list[str]:
    """The runs directly under `key` if it is a store's root (or a folder of runs), else []."""
    if store.exists(join(key, "cfg.json")):
        return []
    dirs, _ = list_dir(store, key)
    if any(store.exists(join(key, d, "metadata.json")) for d in dirs):
        return []  # a run whose cfg.json is missing
    return [d for d in dirs if store.exists(join(key, d, "cfg.json")) or list_dir(store, join(key, d, "progress"))[1]]


def run_verify(uri: str) -> int:
    """`activault verify`: print the problems (exit 1) or a one-line summary (exit 0); on a store's
    root, its runs (exit 2)."""
    store, key = locate(uri)
    if runs := store_runs(store, key):
        print(f"{store.url(key)} is a store, not a run; verify one of its {len(runs)} run(s):")
        print("\n".join(f"  activault verify {store.url(join(key, r))}" for r in runs))
        return 2
    problems, s = verify_run(store, key)
    if problems:
        print(f"{s['run']}: {len(problems)} problem(s)")
        print("\n".join(f"  - {p}" for p in problems))
        return 1
    print(f"OK  {s['run']}: {s['hooks']} hooks, {s['files']} files per hook, {s['tokens']:,} tokens, "
          f"{human_bytes(s['bytes'])}, machines {s['machines']}")
    return 0
