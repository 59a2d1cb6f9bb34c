"""What verify reads in a run's records: the progress records (sound, within cfg.json's plan, which
machines are still collecting, which files they count) and statistics.json against them."""

from __future__ import annotations

from dataclasses import dataclass

from activault.errors import FormatError
from activault.storage import Store
from activault.storage.base import join
from activault.tools.inspection import list_dir
from activault.vault.records import (
    REBUILD,
    REMERGE,
    ProgressRecord,
    RunRecord,
    collect_command,
    file_name,
    parse_file_name,
    parse_progress_name,
    progress_key,
    read_progress,
    read_statistics,
    redo_machine,
)


@dataclass
class Records:
    """What the progress records say: each listed machine's record (None: damaged, it says nothing)."""

    records: dict[int, ProgressRecord | None]
    num_runs: int | None  # cfg.json's

    def finished(self) -> list[int]:
        return sorted(m for m, r in self.records.items() if r is not None and r.finished)

    def counted(self) -> dict[str, int]:
        """File name -> machine, of every file a sound record counts."""
        return {file_name(m, k): m for m, r in self.records.items() if r is not None for k in range(r.files_done)}

    def in_flight(self, name: str) -> bool:
        """Whether an unfinished machine may still be writing the file (its record does not count it)."""
        parsed = parse_file_name(name)
        rec = self.records.get(parsed[0]) if parsed is not None else None
        return rec is not None and not rec.finished and parsed is not None and parsed[1] >= rec.files_done


def read_records(store: Store, run: str, cfg: RunRecord | None, problems: list[str]) -> Records:
    """Every progress record parses and fits cfg.json's plan; each machine's record, or None if damaged."""
    _, entries = list_dir(store, join(run, "progress"))
    num_runs = cfg.num_runs if cfg else None
    found: dict[int, ProgressRecord | None] = {}
    for e in entries:
        m = parse_progress_name(e.key)
        if m is None:
            continue
        try:
            found[m] = rec = read_progress(store, run, m, e.size, cfg)
        except FormatError as err:
            found[m] = None
            problems.append(str(err))
            continue
        if rec is not None and num_runs is not None and rec.num_runs != num_runs:
            found[m] = None
            problems.append(
                f"progress/{e.key.rsplit('/', 1)[-1]}: num_runs {rec.num_runs}, cfg.json "
                f"says {num_runs}; {redo_machine(store.url(run), m)}"
            )
    return Records(found, num_runs)


def unfinished_machines(store: Store, run: str, recs: Records, machines: set[int], problems: list[str]) -> list[int]:
    """Machines still collecting (a record not finished) or not started (no record, no file); a
    machine with files but no record is a problem."""
    waiting = sorted(m for m, r in recs.records.items() if r is not None and not r.finished)
    for m in range(recs.num_runs or 0):
        if m in recs.records:
            continue
        if m not in machines:
            waiting.append(m)
            continue
        problems.append(
            f"machine {m} has files but no progress record ({store.url(progress_key(run, m))}): nothing says "
            f"how far it got; rerun its collect command ({collect_command(m)}): it collects its share again "
            "from the start, rewriting its files with the same bytes"
        )
    return sorted(waiting)


def check_statistics(store: Store, run: str, hooks: list[str], total: int, want: list[int], done: bool) -> list[str]:
    """statistics.json of each hook: parses, counts `total` tokens, covers machines `want` (all
    finished machines); while the run is not `done`, statistics may not exist yet."""
    problems = []
    for h in hooks:
        try:
            stats = read_statistics(store, join(run, h))
        except FormatError as e:
            problems.append(str(e))
            continue
        if stats is None:
            if done or want:
                problems.append(f"{h}: statistics.json is missing; {REBUILD}, {REMERGE}")
            continue
        if not stats.running().finite:
            problems.append(
                f"{h}: statistics.json counts {stats.nonfinite} token(s) with NaN or Inf in (stats_version "
                f"{stats.stats_version}: written before they were left out); recount them with "
                "`activault merge-stats RUN`"
            )
        elif stats.count + stats.nonfinite != total:
            problems.append(
                f"{h}: statistics.json counts {stats.count} tokens and {stats.nonfinite} with NaN or Inf, "
                f"the files of machines {want} hold {total} non-padding tokens; {REBUILD}, {REMERGE}"
            )
        if stats.machines != want:
            problems.append(
                f"{h}: statistics.json covers machines {stats.machines}, the finished machines are {want}; "
                f"{REBUILD}, {REMERGE}"
            )
    return problems
