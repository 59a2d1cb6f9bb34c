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

from activault import dtypes
from activault.errors import ActivaultError, ConfigError, FormatError, NotFoundError
from activault.storage import Store, locate
from activault.storage.base import join
from activault.vault.megabatch import SUFFIX, Header, decode, fetch_header, megabatch_files
from activault.vault.norms import NORMS
from activault.vault.records import (
    REBUILD,
    HookMetadata,
    ProgressRecord,
    RunRecord,
    StatsRecord,
    cfg_key,
    collect_command,
    file_name,
    file_repair,
    hook_metadata,
    metadata_key,
    parse_progress_name,
    planned_files,
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
    the writer would write; a stored description of how files are compressed is kept). A header
    that contradicts cfg.json's width or dtype of the hook is the broken part: it never rewrites a
    metadata.json (a FormatError naming the file when one is needed). A hook with no file yet is
    left alone: its first file writes its metadata. Returns the hooks rewritten.
    """
    plan = _stored_run(store, run)
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
        if (odd := _against_run(plan, h, header)) is not None:
            fix = file_repair(store.url(run), header.url)
            if have is not None and _against_run(plan, h, have) is None:
                # metadata.json agrees with cfg.json: kept; the file is for verify and `--repair`
                log.warning("%s, so %s is kept as it is; %s", odd, store.url(metadata_key(folder)), fix)
                continue
            raise FormatError(f"{odd}, so {store.url(metadata_key(folder))} is not rebuilt from it; {fix}")
        want = _describing(spec, header, have)
        if have == want:
            continue
        if have is not None:
            why = "out of date (" + (have.disagreement(header) or "batch sizes or model differ") + ")"
        write_record(store, metadata_key(folder), want)
        log.warning("%s was %s: rebuilt from %s", store.url(metadata_key(folder)), why, header.url)
        rebuilt.append(h)
    return rebuilt


def _stored_run(store: Store, run: str) -> RunRecord | None:
    """cfg.json when it can be read (what checks against it need), else None."""
    try:
        return read_run(store, run)
    except ActivaultError:  # damaged or the original's: the caller's own read names it
        return None


def _against_run(plan: RunRecord | None, hook: str, held: Header | HookMetadata) -> str | None:
    """How a file's header (or a metadata.json) contradicts cfg.json's width and dtype of `hook`."""
    if plan is None:
        return None
    d, dtype = plan.hook_dims.get(hook), dtypes.canonical(str(plan.model.get("dtype", "")))
    if isinstance(held, Header):
        what, has_d, has_dtype = f"{held.url}: its header says", held.d_model, dtypes.name(held.dtype)
    else:
        what, has_d, has_dtype = "metadata.json says", held.d_model, held.dtype
    if (d is None or has_d == d) and (dtype is None or has_dtype == dtype):
        return None
    return (
        f"{what} states of d = {has_d} in {has_dtype}, cfg.json says hook {hook} holds d = "
        f"{d if d is not None else has_d} in {dtype or has_dtype}: the file is damaged or edited, not the run's records"
    )


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
        provenance="documents" in spec.tensors,  # as the writer writes new files
        norms=NORMS in spec.tensors,
    )
    # Files say how each is stored; metadata.json only how new ones will be (recompress changes it).
    return want.model_copy(update={"compression": (have or spec).compression})


def _finished(
    store: Store, run: str, hooks: list[str], num_runs: int, plan: RunRecord | None, skip: set[int]
) -> Iterator[ProgressRecord]:
    """Finished machines' records in machine order, each read once; a damaged one (also: one that
    counts more files than planned, or lacks a hook's statistics) is skipped with a warning."""
    _, entries = store.list_dir(join(run, "progress"))
    named = sorted((m, e.size) for e in entries if (m := parse_progress_name(e.key)) is not None)
    for m, size in named:
        if m >= num_runs or m in skip:
            continue
        try:
            rec = read_progress(store, run, m, size, plan)
            if rec is not None and rec.finished:
                _check_complete(store, run, rec, hooks, num_runs)
        except FormatError as e:  # another machine's damage must not stop this one finishing
            log.warning("skipping machine %d's statistics: %s", m, e)
            continue
        if rec is not None and rec.finished:
            yield rec


def _check_complete(store: Store, run: str, rec: ProgressRecord, hooks: list[str], num_runs: int) -> None:
    """A FormatError when a finished record cannot be merged: another num_runs, a hook's statistics missing."""
    url, fix = store.url(progress_key(run, rec.machine)), redo_machine(store.url(run), rec.machine)
    if rec.num_runs != num_runs:
        raise FormatError(f"{url}: field 'num_runs' is {rec.num_runs}, cfg.json says {num_runs}; {fix}")
    if lacking := [h for h in hooks if h not in rec.stats]:
        raise FormatError(
            f"{url}: field 'stats' has no statistics of hook(s) {', '.join(lacking)} although the machine "
            f"finished: the record is damaged; {fix}"
        )


def merge_statistics(
    store: Store, run: str, hooks: list[str], num_runs: int, *, plan: RunRecord | None = None, strict: bool = False
) -> list[int]:
    """Write each hook's statistics.json as the exact merge over finished machines; return them.

    One pass lists progress/ once and reads each record once, folding it into one running total
    per hook in machine order, so every writer writes the same bytes. Machines finishing together
    may race: after writing, the records of machines not yet merged are read again, and the merge
    is redone while any of them has finished since. A machine that cannot be merged is skipped with
    a warning, or, when `strict`, is a FormatError (nothing written).

    Args:
        plan: cfg.json, to check each record against (read from the store when not given).
    """
    plan = plan if plan is not None else _stored_run(store, run)
    while True:
        totals: dict[str, RunningStats] = {}
        machines: list[int] = []
        seen: set[int] = set()
        for rec in _finished(store, run, hooks, num_runs, plan, set()):
            seen.add(rec.machine)
            parts = {h: rec.stats[h].running() for h in hooks}
            odd = [h for h, s in parts.items() if h in totals and s.d != totals[h].d]
            if odd:
                why = (
                    f"machine {rec.machine}'s statistics of {odd[0]} have another d_model than the other "
                    f"machines'; {redo_machine(store.url(run), rec.machine)}"
                )
                if strict:
                    raise FormatError(f"cannot merge statistics: {why}")
                log.warning("skipping %s", why)
                continue
            for h, s in parts.items():
                totals[h] = totals[h].merge(s) if h in totals else RunningStats(s.d).merge(s)
            machines.append(rec.machine)
        for h, total in totals.items():
            if total.count + total.nonfinite_tokens > 0:
                record = statistics_record(total, machines, num_runs)
                write_record(store, statistics_key(join(run, h)), record)
        if next(_finished(store, run, hooks, num_runs, plan, seen), None) is None:
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


FINISHED_ONLY = (
    "or merge only the finished machines with `activault merge-stats RUN --finished-only` "
    "(statistics.json then lists the machines it covers)"
)


def merge_run_statistics(run_uri: str, finished_only: bool = False) -> list[int]:
    """Rewrite every hook's statistics.json of a stored run from its machines' records, recounting
    first the statistics that counted tokens with NaN or Inf in (`recount_nonfinite`).

    Every machine must have finished with a sound record, else one error names the first one that
    has not and its fix; `finished_only` merges the finished machines alone (statistics.json lists them).
    """
    found = locate_run(run_uri)
    store, run, record = found.store, found.run, found.record
    if not finished_only:
        check_every_machine(store, run, record)
    recount_nonfinite(store, run, record.hooks, record.num_runs, record)
    return merge_statistics(store, run, record.hooks, record.num_runs, plan=record, strict=not finished_only)


def check_every_machine(store: Store, run: str, record: RunRecord) -> None:
    """An error naming the first machine whose statistics cannot be merged (no record, a damaged
    one, not finished) and its fix; nothing when every machine has finished."""
    head = "cannot merge statistics over every machine"
    for m in range(record.num_runs):
        url = store.url(progress_key(run, m))
        try:
            rec = read_progress(store, run, m, plan=record)
            if rec is not None and rec.finished:
                _check_complete(store, run, rec, record.hooks, record.num_runs)
        except FormatError as e:
            raise FormatError(f"{head}: machine {m}'s progress record is damaged: {e}") from None
        if rec is None:
            raise NotFoundError(
                f"{head}: machine {m} has no progress record ({url}): it has not started, or its record is "
                f"lost. Run its collect command ({collect_command(m)}; files it wrote already are written "
                f"again with the same bytes), then merge again; {FINISHED_ONLY}"
            )
        if not rec.finished:
            planned = planned_files(record, m)
            raise FormatError(
                f"{head}: machine {m} has not finished ({url} counts {rec.files_done}"
                f"{'' if planned is None else f' of {planned}'} files). Let it finish, or resume it with "
                f"its collect command ({collect_command(m)}), then merge again; {FINISHED_ONLY}"
            )


def recount_nonfinite(
    store: Store, run: str, hooks: list[str], num_runs: int, plan: RunRecord | None = None
) -> list[int]:
    """Recompute from its files each finished machine's statistics that are not finite (version 1
    records counted tokens with NaN or Inf in) and rewrite its progress record; returns those machines.

    The machine has finished, so nothing else writes its record; its files are read whole, once.
    """
    redone = []
    for rec in _finished(store, run, hooks, num_runs, plan, set()):
        stale = [h for h in hooks if not rec.stats[h].running().finite]
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
                f"with data_config.skip_cache stores no files); {file_repair(store.url(run), key)}"
            ) from e
        states = mb.states.reshape(-1, s.d)  # [rows * seq, d]
        pos = mb.positions
        s.update(states if pos is None else states[pos.reshape(-1) >= 0])
    return s
