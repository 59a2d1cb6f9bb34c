"""The collection loop: documents → model → cleaned activations → statistics → megabatch files.

Everything is written through `vault.writer.RunWriter` (the commit protocol: file k of every hook,
then the progress record counting k+1 files, the data cursor and the statistics so far). A restart
reads that record and continues at file k+1 with the same data and statistics, so a run killed at
any point and resumed ends with the same bytes as one that was not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from activault.background import prefetch
from activault.collection.plan import (
    MeasuredRatio,
    Plan,
    available_memory,
    check_feasible,
    cost_notes,
    make_plan,
    pinned_limit,
    summary_lines,
)
from activault.collection.resume import check_resume, hook_metadata, run_record, tokenizer_ref
from activault.config import Config, resolve_storage
from activault.errors import ActivaultError, FormatError
from activault.storage import Store, open_store
from activault.storage.lock import MachineLock, hold
from activault.units import human_bytes
from activault.vault import codec as codecs
from activault.vault.records import RunRecord, cfg_key, progress_key, read_run, redo_machine
from activault.vault.stats import RunningStats
from activault.vault.writer import RunWriter, StagingBuffers
from activault.version import __version__

if TYPE_CHECKING:
    from activault.collection.packing import DataState

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
    files_planned: int = 0
    bad_records: int = 0  # skipped input records (data_config.on_bad_record: skip)
    nonfinite: dict[str, int] = field(default_factory=dict)  # hook -> stored tokens with NaN/Inf
    storage_wait: float = 0.0  # seconds the model waited for a written megabatch's buffer

    def outcome(self) -> str:
        """One line: files written against the plan, and the bad records skipped."""
        line = f"{self.files} of {self.files_planned} planned files written"
        if self.files < self.files_planned:
            line += "; the data ran out first (every document was collected)"
        if self.bad_records:
            line += f"; {self.bad_records} bad input record(s) skipped (logged with file and line)"
        return line


def collect(cfg: Config, machine: int = 0, storage: str | None = None, show_progress: bool = True) -> Result:
    """Collect this machine's share of the run; resumes from its progress record."""
    from activault.collection.arch import text_config
    from activault.collection.hooks import hook_dims, resolve_hooks
    from activault.collection.model import (
        keep_freed_memory,
        load_skeleton,
        load_tokenizer,
        model_info,
        runs_on_cpu,
        stored_dtype,
    )
    from activault.collection.sources import source_for

    cfg.check_machine(machine)
    tc, dc, uc = cfg.transformer_config, cfg.data_config, cfg.upload_config
    run = cfg.run_name

    # Everything that can be wrong is checked before any weights load.
    dest = resolve_storage(cfg, storage)
    store = open_store(dest)
    store.check(write=True)
    source_for(dc)
    skeleton = load_skeleton(tc)
    specs = resolve_hooks(skeleton, uc.hooks)
    dims = hook_dims(skeleton, specs)
    info = model_info(skeleton)
    tokenizer = load_tokenizer(tc)
    dtype = stored_dtype(tc, skeleton.config)
    itemsize = dtype.itemsize
    pinned = pinned_limit() if tc.device != "cpu" else None
    check_feasible(cfg, dims, itemsize, text_config(skeleton.config), available_memory(), pinned)
    record = run_record(cfg, info, tokenizer_ref(tc.model_name), dims, __version__)
    check_resume(_stored_run(store, run), record, store.url(cfg_key(run)))
    if runs_on_cpu(tc):  # the forward's activations are then plain memory, freed every batch
        keep_freed_memory()
    with hold(store, run, machine, uc.lease_seconds) as claim:  # one collector per (run, machine)
        job = _Job(cfg, machine, store, record, specs, dims, tokenizer, dtype, claim)
        return job.run(show_progress)


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

    def _writer(self, plan: Plan) -> RunWriter:
        """The run's writer: cfg.json and metadata.json from this config, this machine's files."""
        uc, dc = self.cfg.upload_config, self.cfg.data_config
        codec = codecs.from_config(uc.compression, uc.compression_level, uc.compression_chunk_kib << 10)
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

    def _join(self, writer: RunWriter) -> None:
        """cfg.json (checked again, now the machine is held) and metadata.json are derived records:
        rebuilt here when missing, damaged or out of date, without collecting again."""
        where = self.store.url(cfg_key(self.cfg.run_name))
        writer.join(lambda stored: check_resume(stored, self.record, where))

    def run(self, show_progress: bool) -> Result:
        from activault.collection.hooks import Capture
        from activault.collection.model import load_model
        from activault.collection.packing import iter_batches

        cfg, machine, store, dims = self.cfg, self.machine, self.store, self.dims
        tc, dc = cfg.transformer_config, cfg.data_config
        plan = make_plan(cfg, dims, self.dtype.itemsize, machine, self.dtype)
        writer = self._writer(plan)
        progress = writer.resumed  # this machine's record: where it continues
        state = _cursor(store, cfg.run_name, machine, progress.data_state)  # checked before weights load
        for line in summary_lines(cfg, plan, dims, self.record.model, store.uri, machine):
            log.info(line)
        for note in cost_notes(store, 0 if dc.skip_cache else plan.total_bytes):
            log.warning("note: %s", note)

        result = Result(destination=store.url(cfg.run_name), files_planned=plan.files)
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

        loop = _Collector(cfg, machine, writer, Capture(model, self.specs), dims, self.dtype, self.claim.check)
        t0 = time.perf_counter()
        # Pinned in the data thread, so the model's thread copies batches to the GPU without waiting.
        ahead = prefetch((b.pin() for b in batches) if loop.cuda else batches)
        try:
            merged = loop.run(ahead, show_progress)
        finally:
            ahead.close()
        return self._report(result, writer, loop, time.perf_counter() - t0, merged)

    def _report(self, result: Result, writer: RunWriter, loop: _Collector, seconds: float, merged: list[int]) -> Result:
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


@dataclass
class _Filling:
    """The rows of the file being filled, for every hook, batch by batch."""

    ids: torch.Tensor  # [rows_per_file, S] int32
    pos: torch.Tensor  # [rows_per_file, S] int32, index in document, -1 = padding
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> staged [rows_per_file, S, d]
    rows: int = 0
    tokens: int = 0  # real (not padding) tokens
    data_state: dict[str, Any] | None = None  # the data cursor after its last batch


class _Collector:
    """Runs the model over batches, keeps running statistics, fills files and hands them to the writer."""

    def __init__(
        self,
        cfg: Config,
        machine: int,
        writer: RunWriter,
        capture: Any,
        dims: dict[str, int],
        dtype: torch.dtype,
        check_claim: Callable[[], None] | None = None,
    ):
        self.cfg, self.machine, self.writer, self.capture = cfg, machine, writer, capture
        self.dims, self.dtype = dims, dtype  # what is stored: [rows, S, dims[h]] in dtype
        # Raises once another collector may hold this machine (an expired lease).
        self.check_claim = check_claim or (lambda: None)
        resumed = writer.resumed
        self.data_state = resumed.data_state  # the cursor after the last batch collected
        self.hooks = cfg.upload_config.hooks
        self.device = next(capture.model.parameters()).device
        # With a device map the first parameter may sit on the CPU while hooks fire on GPUs.
        self.cuda = any(p.device.type == "cuda" for p in capture.model.parameters())
        self.copy_streams: dict[torch.device, Any] = {}  # one D2H stream per GPU, off the compute stream
        self.stats = {  # running statistics per hook, over every file so far
            h: resumed.stats[h].running(self.device) if h in resumed.stats else RunningStats(dims[h], self.device)
            for h in self.hooks
        }
        self.nonfinite = {h: s.nonfinite for h, s in resumed.stats.items()}  # as of the last file
        self.staging: dict[str, StagingBuffers] = {}
        self.tokens = resumed.tokens_done

    def run(self, batches: Any, show_progress: bool) -> list[int]:
        """Collect the remaining files of this machine, then write the final progress record and
        merge statistics; returns the machines statistics.json covers."""
        cfg, uc, first = self.cfg, self.cfg.upload_config, self.writer.resumed.files_done
        n_batches, n_files = cfg.machine_batches(self.machine), cfg.machine_files(self.machine)
        bar = _bar(show_progress, total=n_batches, initial=first * uc.batches_per_upload)
        t0, tokens0 = time.perf_counter(), self.tokens
        try:
            for k in range(first, n_files):
                mb = _Filling(self._rows_buffer(), self._rows_buffer())
                for _ in range(min(uc.batches_per_upload, n_batches - k * uc.batches_per_upload)):
                    batch = next(batches, None)
                    if batch is None:
                        break
                    self._add(mb, batch)
                    bar.update(1)
                    bar.set_postfix_str(_rate(self.tokens - tokens0, self.writer.bytes_written, t0))
                if mb.rows == 0:
                    self._release(mb)
                    break
                self.check_claim()
                self._submit(k, mb)
                if mb.rows < cfg.rows_per_file and k < n_files - 1:
                    break  # the data ran out: this partial file is the last
            self.writer.flush()
            self.check_claim()
            return self.writer.finish(self.data_state, self.stats)
        except BaseException:
            self.writer.abort()
            raise
        finally:
            self.capture.close()
            bar.close()

    @property
    def bad_records(self) -> int:
        state = _cursor(self.writer.store, self.cfg.run_name, self.machine, self.data_state)
        return state.bad_records if state is not None else 0

    def _rows_buffer(self) -> torch.Tensor:
        return torch.empty(self.cfg.rows_per_file, self.cfg.data_config.seq_length, dtype=torch.int32)

    def _add(self, mb: _Filling, batch: Any) -> None:
        """Forward one batch and append its stored tokens to the file being filled."""
        B, S, r = batch.input_ids.shape[0], self.cfg.data_config.seq_length, mb.rows
        acts = self.capture(batch.input_ids, batch.position_ids, batch.segment_ids)
        flat = batch.keep.reshape(-1).nonzero().squeeze(1)  # [B*S] forward positions of stored tokens
        every = flat.numel() == batch.keep.numel()  # every forward position stored: no gather needed
        mb.ids[r : r + B] = batch.input_ids.reshape(-1)[flat].view(B, S)
        doc_pos = batch.doc_positions.reshape(-1)[flat].view(B, S)
        mb.pos[r : r + B] = doc_pos
        real = (doc_pos >= 0).reshape(-1)
        padded = not bool(real.all())
        on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for h in self.hooks:
            a = acts[h]
            if a.device not in on:
                cuda = a.device.type == "cuda"  # pinned first: the index copies must not block the host
                on[a.device] = tuple(  # type: ignore[assignment]
                    (x.pin_memory() if cuda else x).to(a.device, non_blocking=cuda) for x in (flat, real)
                )
            flat_d, real_d = on[a.device]
            kept = a.reshape(-1, a.shape[-1])  # [B*S, d]
            if not every:
                kept = kept.index_select(0, flat_d)
            if kept.dtype != self.dtype:  # a module kept in another precision: statistics of what is stored
                kept = kept.to(self.dtype)
            if padded:
                kept = torch.where(real_d.unsqueeze(1), kept, 0)  # padding is stored as zeros
            self.stats[h].update(kept[real_d] if padded else kept)
            if h not in mb.states:
                mb.states[h] = self._staging(h).acquire(self.writer.check)
            self._copy(mb.states[h][r : r + B], kept.view(B, S, -1))
        mb.rows += B
        mb.data_state = self.data_state = batch.state.to_dict()
        n = int(real.sum())
        mb.tokens += n
        self.tokens += n

    def _copy(self, host: torch.Tensor, acts: torch.Tensor) -> None:
        """Device to host: on CUDA, asynchronous on a copy stream into pinned memory, so the next
        forward pass does not queue behind it; synchronised in _submit before any write."""
        if acts.device.type != "cuda":
            host.copy_(acts)
            return
        stream = self.copy_streams.get(acts.device)
        if stream is None:
            stream = self.copy_streams[acts.device] = torch.cuda.Stream(acts.device)
        stream.wait_stream(torch.cuda.current_stream(acts.device))
        with torch.cuda.stream(stream):
            host.copy_(acts, non_blocking=True)
        acts.record_stream(stream)  # not reused by the allocator before the copy is done

    def _staging(self, hook: str) -> StagingBuffers:
        if hook not in self.staging:
            shape = (self.cfg.rows_per_file, self.cfg.data_config.seq_length, self.dims[hook])
            count = self.cfg.upload_config.max_pending + 1
            self.staging[hook] = StagingBuffers(shape, self.dtype, count, pin=self.cuda)
        return self.staging[hook]

    def _release(self, mb: _Filling) -> None:
        for h, buf in mb.states.items():
            self.staging[h].release(buf)

    def _submit(self, k: int, mb: _Filling) -> None:
        """Hand file k of every hook to the writer; it writes the progress record counting it after."""
        for stream in self.copy_streams.values():
            stream.synchronize()  # the async copies into host buffers are done
        self._check_nonfinite(k)
        rows = mb.rows
        self.writer.write_file(
            {h: mb.states[h][:rows] for h in self.hooks},
            mb.ids[:rows],
            mb.pos[:rows],
            tokens=mb.tokens,
            data_state=mb.data_state,
            stats=self.stats,
            on_written={h: _releaser(self.staging[h], mb.states[h]) for h in self.hooks},
        )

    def _check_nonfinite(self, k: int) -> None:
        """Refuse (on_nonfinite: error) or report tokens with NaN/Inf that file k would store."""
        for h, s in self.stats.items():
            n = s.nonfinite_tokens - self.nonfinite.get(h, 0)  # read once per file: a GPU sync
            if not n:
                continue
            where = f"machine {self.machine}, file {k}, hook {h}: {n} token(s) hold NaN or Inf"
            if self.cfg.upload_config.on_nonfinite == "error":
                raise ActivaultError(
                    f"{where}; nothing of this file was stored. The activations overflow or the "
                    "model is broken: try transformer_config.dtype bfloat16 or float32, or set "
                    "upload_config.on_nonfinite: warn to store them and count them"
                )
            log.warning("%s (stored; left out of the statistics, counted in their `nonfinite`)", where)
            self.nonfinite[h] = s.nonfinite_tokens


def _releaser(buffers: StagingBuffers, buf: torch.Tensor) -> Callable[[], None]:
    return lambda: buffers.release(buf)


def _rate(tokens: int, nbytes: int, t0: float) -> str:
    dt = max(time.perf_counter() - t0, 1e-9)
    return f"{tokens / dt:,.0f} tok/s, {nbytes / dt / 1e6:,.1f} MB/s written"


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _bar(show: bool, total: int, initial: int) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="batch", dynamic_ncols=True, mininterval=1.0)
