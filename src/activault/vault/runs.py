"""A run's derived records: cfg.json joined, metadata.json rebuilt, statistics merged.

Each machine writes only its own progress record. cfg.json, metadata.json and statistics.json are
derived (from the run's record, the file headers and the finished machines' progress records), so
any machine's writer rebuilds them when missing, damaged or out of date, without collecting again.
`writer.RunWriter` calls these in the commit protocol's order; nothing else writes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import Store, locate
from activault.storage.base import join
from activault.vault.megabatch import SUFFIX, Header, decode, fetch_header, megabatch_files
from activault.vault.records import (
    REBUILD,
    HookMetadata,
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


def join_run(store: Store, record: RunRecord, check: Callable[[RunRecord | None], None] | None = None) -> None:
    """Write cfg.json unless the stored one is the same; a missing or damaged one is rebuilt.

    Args:
        check: given the stored record (None when absent or damaged); raises to refuse the join.
            What may differ is the caller's to say (collection/resume.py for a collection).
    """
    try:
        old = read_run(store, record.run_name)
    except FormatError as e:
        log.warning("%s: rebuilding it from this config", str(e).split("; ")[0])
        old = None
    if check is not None:
        check(old)
    if old != record:
        write_record(store, cfg_key(record.run_name), record)


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


def rebuild_metadata(
    store: Store, run: str, metadata: Mapping[str, HookMetadata], machine: int, files_done: int
) -> list[str]:
    """Rewrite each hook's metadata.json that is missing, damaged or contradicts the stored files.

    What the files hold (shape, dtype) comes from a file's header, the rest from `metadata` (what
    the writer would write; a stored description of how files are compressed is kept). A hook with
    no file yet is left alone: its first file writes its metadata. Returns the hooks rewritten.
    """
    rebuilt = []
    for h, spec in metadata.items():
        folder = join(run, h)
        try:
            have, why = read_metadata(store, folder), "missing"
        except FormatError as e:
            have, why = None, f"damaged ({str(e).split('; ')[0]})"
        if have is not None and have.original is not None:
            raise ConfigError(
                f"{store.url(folder)} holds files of the original Activault (its metadata.json): activault "
                "reads such a vault but never writes into it; choose a new run_name"
            )
        if have is not None and not files_done:
            continue  # nothing stored here to contradict it without listing the folder
        header = _sample_header(store, folder, machine, files_done)
        if header is None:
            continue
        want = _describing(spec, header, have)
        if have == want:
            continue
        if have is not None:
            why = "out of date (" + (have.disagreement(header) or "batch sizes or model differ") + ")"
        write_record(store, metadata_key(folder), want)
        log.warning("%s was %s: rebuilt from %s", store.url(metadata_key(folder)), why, header.url)
        rebuilt.append(h)
    return rebuilt


def _describing(spec: HookMetadata, header: Header, have: HookMetadata | None) -> HookMetadata:
    """`spec` with the shape and dtype of the file `header`, and `have`'s compression if stored."""
    want = hook_metadata(
        run_name=spec.run_name,
        hook=spec.hook,
        d_model=header.d_model,
        dtype=header.dtype,
        seq_length=header.seq_len,
        rows_per_file=spec.rows_per_file,
        batch_size=spec.batch_size,
        batches_per_upload=spec.batches_per_upload,
        model=spec.model,
    )
    # Files say how each is stored; metadata.json only how new ones will be (recompress changes it).
    return want.model_copy(update={"compression": (have or spec).compression})


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
            if total.count + total.nonfinite_tokens > 0:
                record = statistics_record(total, machines, num_runs)
                write_record(store, statistics_key(join(run, h)), record)
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
    """Rewrite every hook's statistics.json of a stored run from its finished machines' records,
    recounting first the statistics that counted tokens with NaN or Inf in (`recount_nonfinite`)."""
    found = locate_run(run_uri)
    recount_nonfinite(found.store, found.run, found.record.hooks, found.record.num_runs)
    return merge_statistics(found.store, found.run, found.record.hooks, found.record.num_runs)


def recount_nonfinite(store: Store, run: str, hooks: list[str], num_runs: int) -> list[int]:
    """Recompute from its files each finished machine's statistics that are not finite (version 1
    records counted tokens with NaN or Inf in) and rewrite its progress record; returns those machines.

    The machine has finished, so nothing else writes its record; its files are read whole, once.
    """
    redone = []
    for rec in _finished(store, run, num_runs, set()):
        stale = [h for h in hooks if h in rec.stats and not rec.stats[h].running().finite]
        if not stale:
            continue
        stats = dict(rec.stats)
        for h in stale:
            s = _recount(store, run, h, rec)
            stats[h] = StatsRecord.model_construct(**s.to_dict())
            log.warning(
                "machine %d, hook %s: statistics counted %d token(s) with NaN or Inf in; recounted "
                "from its %d files without them",
                rec.machine,
                h,
                s.nonfinite_tokens,
                rec.files_done,
            )
        write_record(store, progress_key(run, rec.machine), rec.model_copy(update={"stats": stats}))
        redone.append(rec.machine)
    return redone


def _recount(store: Store, run: str, hook: str, rec: ProgressRecord) -> RunningStats:
    """Statistics of machine `rec.machine`'s files of `hook`, over the non-padding tokens, as collected."""
    s = RunningStats(rec.stats[hook].d_model)
    for k in range(rec.files_done):
        key = join(run, hook, file_name(rec.machine, k))
        try:
            mb = decode(store.get(key), store.url(key))
        except NotFoundError as e:
            raise NotFoundError(
                f"cannot recount machine {rec.machine}'s statistics of {hook}: {e} (a run collected "
                f"with data_config.skip_cache stores no files); {redo_machine(store.url(run), rec.machine)}"
            ) from e
        states = mb.states.reshape(-1, s.d)  # [rows * seq, d]
        pos = mb.positions
        s.update(states if pos is None else states[pos.reshape(-1) >= 0])
    return s
