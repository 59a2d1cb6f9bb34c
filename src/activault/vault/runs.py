"""A run's records over its life: joining a run, progress, rebuilding records, merging statistics.

Each machine writes only its own progress record. cfg.json, metadata.json and statistics.json are
derived (from the config, the file headers and the finished machines' progress records), so any
machine's collect rebuilds them when missing, damaged or out of date, without collecting again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from activault.config import Config
from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import Store, locate
from activault.storage.base import join
from activault.vault.megabatch import SUFFIX, Header, fetch_header, megabatch_files
from activault.vault.records import (
    REBUILD,
    ProgressRecord,
    RunRecord,
    StatsRecord,
    cfg_key,
    file_name,
    hook_metadata,
    metadata_key,
    parse_progress_name,
    progress_key,
    read_metadata,
    read_progress,
    read_run,
    redo_machine,
    statistics_key,
    statistics_record,
    write_record,
)
from activault.vault.stats import RunningStats

log = logging.getLogger(__name__)

# Fields of data_config that decide which tokens each file holds.
DATA_FIELDS = (
    "data_key",
    "seq_length",
    "batch_size",
    "seed",
    "shuffle_buffer",
    "clean_added_tokens",
    "clean_default_system_prompt",
    "start_batch",
)


def run_record(
    cfg: Config, model: dict[str, Any], tokenizer: str, hook_dims: dict[str, int], version: str
) -> RunRecord:
    """cfg.json of a run collected with `cfg`."""
    return RunRecord(
        activault_version=version,
        run_name=cfg.run_name,
        config=cfg.to_public_dict(),
        model=model,
        tokenizer=tokenizer,
        hooks=list(cfg.upload_config.hooks),
        hook_dims=dict(hook_dims),
        num_runs=cfg.num_runs,
        progress=[progress_key("", m) for m in range(cfg.num_runs)],
    )


def _check_same_run(url: str, old: RunRecord, new: RunRecord) -> None:
    """Refuse to join a run whose stored config differs in what shapes the data."""
    if old.num_runs != new.num_runs:
        raise ConfigError(
            f"run {new.run_name!r} at {url} was started with num_runs={old.num_runs}, this config "
            f"says num_runs={new.num_runs}: machines would collect overlapping data. "
            "Use the same num_runs, or a new run_name"
        )
    for name in ("hooks", "tokenizer"):
        if getattr(old, name) != getattr(new, name):
            raise ConfigError(
                f"run {new.run_name!r} was started with {name}={getattr(old, name)!r}, this config "
                f"has {getattr(new, name)!r}; use the same config, or a new run_name"
            )
    old_data, new_data = old.config.get("data_config") or {}, new.config.get("data_config") or {}
    for k in DATA_FIELDS:
        if k in old_data and old_data[k] != new_data.get(k):
            raise ConfigError(
                f"run {new.run_name!r} was started with data_config.{k}={old_data[k]!r}, this config "
                f"has {new_data.get(k)!r}; resuming would mix different data. Use the same config, "
                "or a new run_name"
            )


def join_run(store: Store, record: RunRecord) -> None:
    """Check `record` against the stored cfg.json, then write it; a missing or damaged one is rebuilt."""
    key = cfg_key(record.run_name)
    try:
        old = read_run(store, record.run_name)
    except FormatError as e:
        log.warning("%s: rebuilding it from this config", str(e).split("; ")[0])
        old = None
    if old is not None:
        _check_same_run(store.url(key), old, record)
    if old != record:
        write_record(store, key, record)


class Progress:
    """This machine's progress record: read at start, rewritten after every file it counts."""

    def __init__(self, store: Store, run: str, machine: int, num_runs: int):
        self.store, self.key, self.machine = store, progress_key(run, machine), machine
        rec = read_progress(store, run, machine)
        if rec is not None and rec.num_runs != num_runs:
            raise ConfigError(
                f"{store.url(self.key)} was written with num_runs={rec.num_runs}, not {num_runs}; "
                "use the run's num_runs or a new run_name"
            )
        self.last = rec or ProgressRecord(machine=machine, num_runs=num_runs)

    @property
    def files_done(self) -> int:
        return self.last.files_done

    @property
    def rows_done(self) -> int:
        return self.last.rows_done

    @property
    def tokens_done(self) -> int:
        return self.last.tokens_done

    @property
    def finished(self) -> bool:
        return self.last.finished

    @property
    def data_state(self) -> dict[str, Any] | None:
        return self.last.data_state

    @property
    def stats(self) -> dict[str, StatsRecord]:
        return self.last.stats

    def record(
        self,
        files: int,
        rows: int,
        tokens: int,
        data_state: dict[str, Any] | None,
        stats: dict[str, RunningStats],
        finished: bool,
    ) -> ProgressRecord:
        # Our own numbers: constructed without a validation pass over every statistic.
        return ProgressRecord.model_construct(
            machine=self.machine,
            num_runs=self.last.num_runs,
            files_done=files,
            rows_done=rows,
            tokens_done=tokens,
            data_state=data_state,
            finished=finished,
            stats={h: StatsRecord.model_construct(**s.to_dict()) for h, s in stats.items()},
        )

    def write(self, record: ProgressRecord) -> None:
        write_record(self.store, self.key, record)


def _sample_header(store: Store, folder: str, machine: int, files_done: int) -> Header | None:
    """The header of this machine's first file, else of the first file listed in `folder`."""
    if files_done:
        key = join(folder, file_name(machine, 0))
    else:
        names = sorted(n for n in megabatch_files(store.list_dir(folder)[1]) if n.endswith(SUFFIX))
        if not names:
            return None
        key = join(folder, names[0])
    try:
        return fetch_header(store, key)
    except (FormatError, NotFoundError) as e:
        log.warning("cannot rebuild %s from %s: %s", metadata_key(folder), key, e)
        return None


def rebuild_metadata(store: Store, cfg: Config, machine: int, files_done: int) -> list[str]:
    """Rewrite each hook's metadata.json that is missing, damaged or contradicts the stored files.

    What the files hold comes from a file's header, the batch sizes from the config. A hook with no
    file yet is left alone: its first file writes its metadata. Returns the hooks rewritten.
    """
    rebuilt = []
    dc, uc = cfg.data_config, cfg.upload_config
    for h in uc.hooks:
        folder = join(cfg.run_name, h)
        try:
            have, why = read_metadata(store, folder), "missing"
        except FormatError as e:
            have, why = None, f"damaged ({str(e).split('; ')[0]})"
        if have is not None and not files_done:
            continue  # nothing stored here to contradict it without listing the folder
        header = _sample_header(store, folder, machine, files_done)
        if header is None:
            continue
        want = hook_metadata(
            run_name=cfg.run_name,
            hook=h,
            d_model=header.d_model,
            dtype=header.dtype,
            seq_length=header.seq_len,
            rows_per_file=cfg.rows_per_file,
            batch_size=dc.batch_size,
            batches_per_upload=uc.batches_per_upload,
            model=cfg.transformer_config.model_name,
        )
        if have == want:
            continue
        if have is not None:
            why = "out of date (" + (have.disagreement(header) or "batch sizes or model differ") + ")"
        write_record(store, metadata_key(folder), want)
        log.warning("%s was %s: rebuilt from %s", store.url(metadata_key(folder)), why, header.url)
        rebuilt.append(h)
    return rebuilt


def _finished(store: Store, run: str, num_runs: int, skip: set[int]) -> Iterator[ProgressRecord]:
    """Finished machines' records in machine order, each read once; damaged ones are skipped."""
    _, entries = store.list_dir(join(run, "progress"))
    named = sorted((m, e.size) for e in entries if (m := parse_progress_name(e.key)) is not None)
    for m, size in named:
        if m >= num_runs or m in skip:
            continue
        try:
            rec = read_progress(store, run, m, size)
        except FormatError as e:  # another machine's damage must not stop this one finishing
            log.warning("skipping machine %d's statistics: %s", m, e)
            continue
        if rec is None or not rec.finished:
            continue
        if rec.num_runs != num_runs:
            log.warning("skipping machine %d: its record says num_runs=%d, the run %d", m, rec.num_runs, num_runs)
            continue
        yield rec


def merge_statistics(store: Store, run: str, hooks: list[str], num_runs: int) -> list[int]:
    """Write each hook's statistics.json as the exact merge over finished machines; return them.

    One pass lists progress/ once and reads each record once, folding it into one running total
    per hook in machine order, so every writer writes the same bytes. Machines finishing together
    may race: after writing, the records of machines not yet merged are read again, and the merge
    is redone while any of them has finished since.
    """
    while True:
        totals: dict[str, RunningStats] = {}
        machines: list[int] = []
        seen: set[int] = set()
        for rec in _finished(store, run, num_runs, set()):
            seen.add(rec.machine)
            parts = {h: rec.stats[h].running() for h in hooks if h in rec.stats}
            odd = [h for h, s in parts.items() if h in totals and s.d != totals[h].d]
            if odd:
                log.warning(
                    "skipping machine %d: its statistics of %s have another d_model than the other machines'; %s",
                    rec.machine,
                    odd[0],
                    redo_machine(store.url(run), rec.machine),
                )
                continue
            for h, s in parts.items():
                totals[h] = totals[h].merge(s) if h in totals else RunningStats(s.d).merge(s)
            machines.append(rec.machine)
        for h, total in totals.items():
            if total.count > 0:
                stats = statistics_record(total, machines, num_runs)
                write_record(store, statistics_key(join(run, h)), stats)
        if next(_finished(store, run, num_runs, seen), None) is None:
            return machines


@dataclass(frozen=True)
class StoredRun:
    """A run found in a store: where, and its cfg.json."""

    store: Store
    run: str  # the run folder's key in `store`
    record: RunRecord


def locate_run(run_uri: str) -> StoredRun:
    """The run at `PATH/RUN` or `s3://BUCKET[/PREFIX]/RUN`; NotFoundError if it has no cfg.json."""
    store, key = locate(run_uri)
    rec = read_run(store, key)
    if rec is None:
        raise NotFoundError(
            f"{run_uri} holds no cfg.json: pass a run folder, e.g. ./vault/RUN or s3://BUCKET/RUN "
            f"(if it is one, {REBUILD})"
        )
    return StoredRun(store, key, rec)


def merge_run_statistics(run_uri: str) -> list[int]:
    """Rewrite every hook's statistics.json of a stored run from its finished machines' records."""
    found = locate_run(run_uri)
    return merge_statistics(found.store, found.run, found.record.hooks, found.record.num_runs)
