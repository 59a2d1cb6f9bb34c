"""The records of a run besides its megabatches: cfg.json, per-machine progress, merged statistics.

Each machine writes only its own progress record, after the files it counts; `statistics.json`
is derived from the finished machines' records, so no record is ever shared between writers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import Store
from activault.vault.stats import RunningStats, merge_all

log = logging.getLogger(__name__)

# How to repair a damaged record, for commands that only read them.
RECOLLECT = "run the run's collect command again: it rewrites its records"
REMERGE = "recompute it with `activault merge-stats RUN_URI`"


def progress_key(run: str, machine: int) -> str:
    return f"{run}/progress/machine-{machine:05d}.json"


def read_json(store: Store, key: str, fix: str = "delete it and run the same command again to rewrite it") -> dict[str, Any] | None:
    """A JSON object, or None if absent; a damaged one raises FormatError naming it and `fix`."""
    try:
        obj = json.loads(store.get_text(key))
    except NotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{store.url(key)} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{store.url(key)} is not a JSON object; {fix}")
    return obj


def write_json(store: Store, key: str, obj: Any) -> None:
    store.put_text(key, json.dumps(obj, indent=1, sort_keys=True) + "\n")


class Progress:
    """The per-machine progress record."""

    def __init__(self, store: Store, run: str, machine: int, num_runs: int):
        self.store, self.key = store, progress_key(run, machine)
        self.machine, self.num_runs = machine, num_runs
        rec = read_json(store, self.key) or {}
        if rec and rec.get("num_runs") != num_runs:
            raise ConfigError(
                f"{store.url(self.key)} was written with num_runs={rec.get('num_runs')}, not {num_runs}; "
                "use the run's num_runs or a new run_name"
            )
        self.files_done: int = rec.get("files_done", 0)
        self.rows_done: int = rec.get("rows_done", 0)
        self.tokens_done: int = rec.get("tokens_done", 0)
        self.data_state: dict[str, Any] | None = rec.get("data_state")
        self.finished: bool = rec.get("finished", False)
        self.stats: dict[str, dict[str, Any]] = rec.get("stats", {})

    def record(self, files: int, rows: int, tokens: int, data_state: dict[str, Any] | None,
               stats: dict[str, dict[str, Any]], finished: bool) -> dict[str, Any]:
        return {
            "machine": self.machine, "num_runs": self.num_runs, "files_done": files, "rows_done": rows,
            "tokens_done": tokens, "data_state": data_state, "finished": finished, "stats": stats,
        }  # fmt: skip


def merge_statistics(store: Store, run: str, hooks: list[str], num_runs: int) -> list[int]:
    """Write each hook's statistics.json as the exact merge over finished machines; return them.

    Machines finishing together may race: each re-lists after writing and rewrites while the set
    of finished machines grew, so the last writer always covers every finished machine, and the
    sorted merge order makes every writer's bytes the same.
    """
    written: list[int] | None = None
    while True:
        records = {}
        for m in range(num_runs):
            try:
                rec = read_json(store, progress_key(run, m))
            except FormatError:  # another machine's broken record must not stop this one finishing
                log.warning("skipping %s: not valid JSON; rerun machine %d to rewrite it",
                            store.url(progress_key(run, m)), m)
                continue
            if rec and rec.get("finished"):
                records[m] = rec
        machines = sorted(records)
        if machines == written:
            return machines
        for h in hooks:
            parts = [RunningStats.from_dict(records[m]["stats"][h]) for m in machines if h in records[m]["stats"]]
            total = merge_all(parts)
            if total is None:
                continue
            out = total.to_dict()
            out["machines"] = machines
            out["num_runs"] = num_runs
            write_json(store, f"{run}/{h}/statistics.json", out)
        written = machines
