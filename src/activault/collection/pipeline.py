"""The collection loop: documents → model → cleaned activations → statistics → megabatch files.

Everything is written through `vault.writer.RunWriter` (the commit protocol: file k of every hook,
then the progress record counting k+1 files, the data cursor and the statistics so far). A restart
reads that record and continues at file k+1 with the same data and statistics, so a run killed at
any point and resumed ends with the same bytes as one that was not. For the same reason `repair`
collects a damaged or missing counted file again, byte for byte (collection/repair.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from activault.background import prefetch
from activault.collection.collector import Collector
from activault.collection.plan import (
    MeasuredRatio,
    Plan,
    available_memory,
    cost_notes,
    make_plan,
    pinned_limit,
    summary_lines,
)
from activault.collection.preflight import Preflight, device_lines, preflight, skeleton_shape
from activault.collection.repair import check_data, file_batches, scan, summary
from activault.collection.resume import check_resume, hook_metadata, run_record, tokenizer_ref
from activault.config import Config, resolve_storage
from activault.errors import ConfigError, FormatError
from activault.storage import Store, open_store
from activault.storage.base import join
from activault.storage.lock import MachineLock, hold
from activault.units import human_bytes
from activault.vault import codec as codecs
from activault.vault.records import (
    RunRecord,
    cfg_key,
    check_against_plan,
    progress_key,
    read_metadata,
    read_run,
    redo_machine,
)
from activault.vault.stats import RunningStats
from activault.vault.writer import RunWriter
from activault.version import __version__

if TYPE_CHECKING:
    from activault.collection.packing import Batch, DataState

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What a collection wrote."""

    destination: str
    files: int = 0
    rows: int = 0
    tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    stats: dict[str, RunningStats] = field(default_factory=dict)
    files_planned: int | None = 0  # None: n_batches all, until the data runs out
    bad_records: int = 0  # skipped input records (data_config.on_bad_record: skip)
    nonfinite: dict[str, int] = field(default_factory=dict)  # hook -> stored tokens with NaN/Inf
    storage_wait: float = 0.0  # seconds the model waited for a written megabatch's buffer
    repaired: list[int] = field(default_factory=list)  # (repair) file indices collected again

    def outcome(self) -> str:
        """One line: files written against the plan, and the bad records skipped."""
        if self.files_planned is None:
            line = f"{self.files} files written; the data ran out (n_batches: all: every document was collected)"
        else:
            line = f"{self.files} of {self.files_planned} planned files written"
        if self.files_planned is not None and self.files < self.files_planned:
            line += "; the data ran out first (every document was collected)"
        if self.bad_records:
            line += f"; {self.bad_records} bad input record(s) skipped (logged with file and line)"
        return line


def collect(
    cfg: Config, machine: int = 0, storage: str | None = None, show_progress: bool = True, repair: bool = False
) -> Result:
    """Collect this machine's share of the run; resumes from its progress record.

    Args:
        repair: instead, collect again exactly the files the progress record counts that are
            damaged or missing (byte-identical), leaving intact files and the records as they are.
    """
    from activault.collection.align import aligned_config, check_other, check_tokens, reference
    from activault.collection.hooks import resolve_hooks
    from activault.collection.model import (
        keep_freed_memory,
        load_skeleton,
        load_tokenizer,
        model_info,
        runs_on_cpu,
        stored_dtype,
    )

    ref = reference(cfg)  # data_config.align_to: the run whose tokens this one collects again
    if ref is not None:
        cfg = aligned_config(cfg, ref)  # num_runs too: the machine is checked against the reference's
    cfg.check_machine(machine)
    tc, uc = cfg.transformer_config, cfg.upload_config
    run = cfg.run_name

    # Everything that can be wrong is checked before any weights load.
    dest = resolve_storage(cfg, storage)
    store = open_store(dest)
    if ref is not None:
        check_other(ref, store.url(run))
    store.check(write=True)
    skeleton = load_skeleton(tc)
    shape = skeleton_shape(skeleton, tc, uc.hooks)
    pinned = pinned_limit() if tc.device != "cpu" else None
    found = preflight(cfg, shape, store, machine, pinned, available_memory())  # the checks estimate runs too
    found.check()
    specs = resolve_hooks(skeleton, uc.hooks)
    dims = shape.dims
    info = model_info(skeleton, specs)
    tokenizer = load_tokenizer(tc)
    aligned_to = None
    if ref is not None:  # this tokenizer packs the reference's stored tokens, or nothing is written
        check_tokens(cfg, tokenizer, ref, machine)
        aligned_to = ref.store.url(ref.run)
    dtype = stored_dtype(tc, skeleton.config)
    record = run_record(cfg, info, tokenizer_ref(tc.model_name), dims, __version__, aligned_to)
    check_resume(_stored_run(store, run), record, store.url(cfg_key(run)))
    if runs_on_cpu(tc):  # the forward's activations are then plain memory, freed every batch
        keep_freed_memory()
    with hold(store, run, machine, uc.lease_seconds) as claim:  # one collector per (run, machine)
        job = _Job(cfg, machine, store, record, specs, dims, tokenizer, dtype, claim, found)
        return job.run(show_progress, repair)


@dataclass
class _Job:
    """A validated collection of one machine, run while holding its claim."""

    cfg: Config
    machine: int
    store: Store
    record: RunRecord
    specs: Any
    dims: dict[str, int]
    tokenizer: Any
    dtype: torch.dtype
    claim: MachineLock
    found: Preflight | None = None  # what the preflight said: device, weights, notes

    def _writer(self, plan: Plan) -> RunWriter:
        """The run's writer: cfg.json and metadata.json from this config, this machine's files."""
        uc, dc = self.cfg.upload_config, self.cfg.data_config
        codec = self._codec(codecs.from_config(uc.compression, uc.compression_level, uc.compression_chunk_kib << 10))
        return RunWriter(
            self.store,
            self.record,
            hook_metadata(self.cfg, self.dims, self.dtype, codec),
            self.machine,
            codec=codec,
            threads=uc.write_threads,
            store_files=not dc.skip_cache,
            measured=MeasuredRatio(plan, log),
            claim=self.claim,  # each record checks it; a lost machine's record is refused
        )

    def _codec(self, configured: codecs.Codec | None) -> codecs.Codec | None:
        """How new files are stored: with the codec the run's metadata.json names (`activault
        recompress` changes it, cfg.json keeps the config's), so a resumed or repaired run stays one
        codec; the config's for a new run, for hooks without metadata yet, and where the names agree
        (its level and chunk size are runtime settings: they may change on resume)."""
        run, recorded = self.cfg.run_name, {}
        for h in self.cfg.upload_config.hooks:
            try:
                meta = read_metadata(self.store, join(run, h))
            except FormatError:  # damaged: the writer rebuilds it, as this config says
                continue
            if meta is not None:
                recorded[h] = codecs.from_description(meta.compression)
        names = {h: codecs.describe(c)["codec"] for h, c in recorded.items()}
        if len(set(names.values())) > 1:
            said = ", ".join(f"{h}: {n}" for h, n in names.items())
            raise ConfigError(
                f"the hooks of {self.store.url(run)} store new files with different codecs ({said}): an "
                f"`activault recompress` of it did not finish. Run it again with the codec you want "
                f"(`activault recompress {self.store.url(run)} --compression zstd`, or none; fp8 is lossy), "
                "then collect"
            )
        if not recorded or set(names.values()) == {codecs.describe(configured)["codec"]}:
            return configured
        codec = next(iter(recorded.values()))
        log.info(
            "%s stores new files as %s (its metadata.json; activault recompress changed it), not as "
            "upload_config.compression says (%s): new files follow the run",
            self.store.url(run),
            codecs.name(codec),
            codecs.name(configured),
        )
        return codec

    def _join(self, writer: RunWriter) -> None:
        """cfg.json (checked again, now the machine is held) and metadata.json are derived records:
        rebuilt here when missing, damaged or out of date, without collecting again."""
        where = self.store.url(cfg_key(self.cfg.run_name))
        writer.join(lambda stored: check_resume(stored, self.record, where))

    def run(self, show_progress: bool, repair: bool = False) -> Result:
        from activault.collection.hooks import Capture
        from activault.collection.model import load_model
        from activault.collection.packing import iter_batches

        cfg, machine, store, dims = self.cfg, self.machine, self.store, self.dims
        tc, dc = cfg.transformer_config, cfg.data_config
        plan = make_plan(cfg, dims, self.dtype.itemsize, machine, self.dtype)
        writer = self._writer(plan)
        progress = writer.resumed  # this machine's record: where it continues
        # Checked before weights load: the record's count against the plan, and its data cursor.
        planned = cfg.machine_files(machine)  # None: until the data runs out
        check_against_plan(progress, planned, store, cfg.run_name)
        state = _cursor(store, cfg.run_name, machine, progress.data_state)
        if repair:
            return self._repair(writer, Result(destination=store.url(cfg.run_name), files_planned=planned))
        for line in summary_lines(cfg, plan, dims, self.record.model, store.uri, machine):
            log.info(line)
        if self.found is not None:
            for line in device_lines(tc, self.found.shape):
                log.info(line)
            for note in self.found.notes:  # what the checks could not check here: said, not warned
                log.info("note: %s", note)
        upload = None if plan.size == "unknown" else plan.total_bytes
        for note in cost_notes(store, 0 if dc.skip_cache else upload):
            log.warning("note: %s", note)

        result = Result(destination=store.url(cfg.run_name), files_planned=planned)
        if progress.finished:
            self._join(writer)
            log.info(
                "machine %d already finished (%d files); its records are checked and statistics merged",
                machine,
                progress.files_done,
            )
            writer.merge_statistics()
            result.files, result.rows = progress.files_done, progress.rows_done
            result.tokens = progress.tokens_done
            result.bad_records = state.bad_records if state is not None else 0
            result.stats = {h: s.running() for h, s in progress.stats.items()}
            result.nonfinite = {h: s.nonfinite for h, s in progress.stats.items()}
            log.info("machine %d: %s", machine, result.outcome())
            return result
        if not progress.files_done:
            _require_documents(cfg, machine)  # before anything is written
        self._join(writer)
        writer.begin()
        model = load_model(tc, self.specs)
        if progress.files_done:
            log.info("resuming machine %d after %d files", machine, progress.files_done)
        batches = iter_batches(dc, self.tokenizer, machine=machine, num_runs=cfg.num_runs, state=state)
        if state is None:
            for _ in range(dc.start_batch):
                if next(batches, None) is None:
                    break

        loop = Collector(cfg, machine, writer, Capture(model, self.specs), dims, self.dtype, self.claim.check)
        t0 = time.perf_counter()
        # Pinned in the data thread, so the model's thread copies batches to the GPU without waiting.
        ahead = prefetch((b.pin() for b in batches) if loop.cuda else batches)
        try:
            merged = loop.run(ahead, show_progress)
        finally:
            ahead.close()
        return self._report(result, writer, loop, time.perf_counter() - t0, merged)

    def _repair(self, writer: RunWriter, result: Result) -> Result:
        """Collect again the counted files with a damaged or missing copy; nothing else is written."""
        from activault.collection.hooks import Capture
        from activault.collection.model import load_model
        from activault.collection.packing import iter_batches

        cfg, machine, progress = self.cfg, self.machine, writer.resumed
        result.files, result.rows, result.tokens = progress.files_done, progress.rows_done, progress.tokens_done
        where = f"run {cfg.run_name!r} machine {machine}"
        if not progress.files_done or not writer.store_files:
            stored = "no files (data_config.skip_cache)" if progress.files_done else "no progress record counting files"
            log.info("%s: nothing to repair: it has %s", where, stored)
            return result
        damage = scan(self.store, cfg.run_name, writer.metadata, machine, progress.files_done)
        self._join(writer)  # cfg.json checked again, now the machine is held
        log.info("%s: %s", where, summary(damage))
        if not progress.finished:
            log.info("%s has not finished: the same command without --repair continues it", where)
        if not damage.broken:
            return result
        for problem in damage.problems:
            log.warning("damaged: %s", problem)
        dc, uc = cfg.data_config, cfg.upload_config

        def files(last: int) -> Iterator[tuple[int, list[Batch]]]:
            """File k's batches for k = 0..last, packed again from the start of the machine's share."""
            batches = iter_batches(dc, self.tokenizer, machine=machine, num_runs=cfg.num_runs)
            for _ in range(dc.start_batch):
                if next(batches, None) is None:
                    break
            # n_batches all: no count ends a file early, and nothing past file `last` is read
            n_batches = cfg.machine_batches(machine) or (last + 1) * uc.batches_per_upload
            return file_batches(batches, last, uc.batches_per_upload, n_batches, cfg.rows_per_file)

        # Packing only (no forward pass) is cheap next to the model: every file is checked first.
        check_data(files(damage.files - 1), damage, progress.data_state, dc.seq_length, where)
        model = load_model(cfg.transformer_config, self.specs)
        loop = Collector(cfg, machine, writer, Capture(model, self.specs), self.dims, self.dtype, self.claim.check)
        t0 = time.perf_counter()
        ahead = prefetch(files(damage.last))
        try:
            result.repaired = loop.repair(ahead, damage)
        finally:
            ahead.close()
        result.bytes_written, result.seconds = writer.bytes_written, time.perf_counter() - t0
        log.info(
            "%s: repaired file(s) %s (%s) in %.1fs; the records and every other file are as they were",
            where,
            result.repaired,
            human_bytes(result.bytes_written),
            result.seconds,
        )
        return result

    def _report(self, result: Result, writer: RunWriter, loop: Collector, seconds: float, merged: list[int]) -> Result:
        """Fill `result` from a finished collection and log it; `merged`: the machines statistics cover."""
        cfg, machine = self.cfg, self.machine
        result.files, result.rows, result.tokens = writer.files, writer.rows, writer.tokens
        result.bytes_written, result.seconds = writer.bytes_written, seconds
        result.stats, result.bad_records = loop.stats, loop.bad_records
        result.nonfinite = {h: s.nonfinite_tokens for h, s in loop.stats.items()}
        result.storage_wait = sum(b.waited for b in loop.staging.values())
        _report_wait(result.storage_wait, result.seconds, cfg)
        if any(result.nonfinite.values()):
            log.warning("tokens with NaN or Inf stored (upload_config.on_nonfinite: warn): %s", result.nonfinite)
        log.info(
            "wrote %d files (%s) to %s in %.1fs; statistics cover machines %s",
            writer.files - writer.resumed.files_done,
            human_bytes(result.bytes_written),
            result.destination,
            result.seconds,
            merged,
        )
        log.info("machine %d: %s", machine, result.outcome())
        return result


def _report_wait(waited: float, seconds: float, cfg: Config) -> None:
    """Say how long the model waited for storage; warn, with what helps, once it is a real share."""
    share = waited / max(seconds, 1e-9)
    if share < 0.05:
        log.info("the model waited %.1f s (%.1f%% of the run) for storage", waited, 100 * share)
        return
    uc = cfg.upload_config
    log.warning(
        "the model waited %.1f s (%.0f%% of the run) for storage to take its files: storage is slower "
        "than the model here. More upload_config.write_threads (now %d) help a remote store; a larger "
        "max_pending (now %d; each holds one more megabatch per hook in memory) absorbs bursts; "
        "compression writes fewer bytes",
        waited,
        100 * share,
        uc.write_threads,
        uc.max_pending,
    )


def _stored_run(store: Store, run: str) -> RunRecord | None:
    """The stored cfg.json to check a rerun against; a damaged one is rebuilt later, not checked."""
    try:
        return read_run(store, run)
    except FormatError as e:
        log.warning("%s: rebuilding it from this config", str(e).split("; ")[0])
        return None


def _cursor(store: Store, run: str, machine: int, data_state: dict[str, Any] | None) -> DataState | None:
    """The data cursor of this machine's progress record; a damaged one is a FormatError naming the
    record and the repair (it would resume at the wrong document, or as finished)."""
    from activault.collection.packing import DataState

    if not data_state:
        return None
    try:
        return DataState.from_dict(data_state)
    except FormatError as e:
        url = store.url(progress_key(run, machine))
        raise FormatError(f"{url}: {e}; {redo_machine(store.url(run), machine)}") from None


def _require_documents(cfg: Config, machine: int) -> None:
    """A source that yields nothing is an error now, before weights load, not an empty run."""
    from activault.collection.sources import require_documents, source_for

    source = f"data_key {cfg.data_config.data_key!r}"
    require_documents(source_for(cfg.data_config), source, machine=machine, num_runs=cfg.num_runs)
