"""The file-filling loop of a collection: batches → model → cleaned activations → statistics →
one megabatch per hook, handed to `vault.writer.RunWriter`; and the same loop collecting a
repair's damaged files again (collection/repair.py says which)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from activault import dtypes
from activault.collection.repair import Damage, stored_tokens
from activault.config import Config
from activault.errors import ActivaultError
from activault.vault.stats import RunningStats
from activault.vault.writer import RunWriter
from activault.vault.writer_threads import StagingBuffers

log = logging.getLogger(__name__)


@dataclass
class Filling:
    """The rows of the file being filled, for every hook, batch by batch."""

    ids: torch.Tensor  # [rows_per_file, S] int32
    pos: torch.Tensor  # [rows_per_file, S] int32, index in document, -1 = padding
    docs: torch.Tensor  # [rows_per_file, S] int64, document ordinal in the machine's stream, -1 = padding
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> staged [rows_per_file, S, d]
    rows: int = 0
    tokens: int = 0  # real (not padding) tokens
    data_state: dict[str, Any] | None = None  # the data cursor after its last batch


class Collector:
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
        # hook -> (the module's dtype, tokens since the last file that were finite there and hold
        # an Inf once stored in `dtype`: counted on the device, read with the NaN/Inf counts).
        self.overflow: dict[str, tuple[torch.dtype, torch.Tensor]] = {}
        self.staging: dict[str, StagingBuffers] = {}
        self.tokens = resumed.tokens_done

    def run(self, batches: Any, show_progress: bool) -> list[int]:
        """Collect the remaining files of this machine, then write the final progress record and
        merge statistics; returns the machines statistics.json covers."""
        cfg, uc, first = self.cfg, self.cfg.upload_config, self.writer.resumed.files_done
        # None (n_batches: all): until the data runs out, which ends every loop below.
        n_batches, n_files = cfg.machine_batches(self.machine), cfg.machine_files(self.machine)
        per = uc.batches_per_upload
        bar = _bar(show_progress, total=n_batches, initial=first * per)
        t0, tokens0 = time.perf_counter(), self.tokens
        try:
            for k in itertools.count(first) if n_files is None else range(first, n_files):
                mb = self._filling()
                for _ in range(per if n_batches is None else min(per, n_batches - k * per)):
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
                if mb.rows < cfg.rows_per_file and (n_files is None or k < n_files - 1):
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

    def repair(self, files: Any, damage: Damage) -> list[int]:
        """Collect again file k of the hooks `damage` names, for each (k, batches) of `files`, without
        counting its tokens again; the other files' batches are skipped (no forward pass)."""
        repaired = []
        try:
            for k, group in files:
                broken = damage.broken.get(k)
                if not broken:
                    continue
                mb = self._filling()
                for batch in group:
                    self._add(mb, batch, count=False)
                for stream in self.copy_streams.values():
                    stream.synchronize()  # the async copies into host buffers are done
                rows = mb.rows
                self.writer.rewrite_file(
                    k,
                    {h: mb.states[h][:rows] for h in self.hooks},
                    mb.ids[:rows],
                    mb.pos[:rows],
                    hooks=broken,
                    on_written={h: _releaser(self.staging[h], mb.states[h]) for h in self.hooks},
                    documents=mb.docs[:rows],
                )
                repaired.append(k)
            self.writer.close()
        except BaseException:
            self.writer.abort()
            raise
        finally:
            self.capture.close()
        return repaired

    @property
    def bad_records(self) -> int:
        from activault.collection.packing import DataState

        # Our own cursor, checked when the run resumed or written by this loop.
        return DataState.from_dict(self.data_state).bad_records if self.data_state else 0

    def _filling(self) -> Filling:
        shape = (self.cfg.rows_per_file, self.cfg.data_config.seq_length)
        ids, pos = torch.empty(shape, dtype=torch.int32), torch.empty(shape, dtype=torch.int32)
        return Filling(ids, pos, torch.empty(shape, dtype=torch.int64))

    def _add(self, mb: Filling, batch: Any, count: bool = True) -> None:
        """Forward one batch and append its stored tokens to the file being filled; `count`: into
        the running statistics (not for a repaired file: its tokens are counted already)."""
        B, S, r = batch.input_ids.shape[0], self.cfg.data_config.seq_length, mb.rows
        acts = self.capture(batch.input_ids, batch.position_ids, batch.segment_ids)
        ids, doc_pos, flat = stored_tokens(batch, S)  # flat: [B*S] forward positions of stored tokens
        every = flat.numel() == batch.keep.numel()  # every forward position stored: no gather needed
        mb.ids[r : r + B], mb.pos[r : r + B] = ids, doc_pos
        mb.docs[r : r + B] = batch.documents.reshape(-1)[flat].view(B, S)
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
                wide, kept = kept, kept.to(self.dtype)
                if wide.is_floating_point() and torch.finfo(self.dtype).max < torch.finfo(wide.dtype).max:
                    lost = (kept.isinf() & wide.isfinite()).any(-1)
                    if padded:
                        lost &= real_d
                    before = self.overflow.get(h, (wide.dtype, 0))[1]
                    self.overflow[h] = (wide.dtype, before + lost.sum())
            if padded:
                kept = torch.where(real_d.unsqueeze(1), kept, 0)  # padding is stored as zeros
            if count:
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

    def _release(self, mb: Filling) -> None:
        for h, buf in mb.states.items():
            self.staging[h].release(buf)

    def _submit(self, k: int, mb: Filling) -> None:
        """Hand file k of every hook to the writer; it writes the progress record counting it after."""
        for stream in self.copy_streams.values():
            stream.synchronize()  # the async copies into host buffers are done
        self._check_nonfinite(k)
        rows = mb.rows
        self.writer.write_file(
            {h: mb.states[h][:rows] for h in self.hooks},
            mb.ids[:rows],
            mb.pos[:rows],
            documents=mb.docs[:rows],
            tokens=mb.tokens,
            data_state=mb.data_state,
            stats=self.stats,
            on_written={h: _releaser(self.staging[h], mb.states[h]) for h in self.hooks},
        )

    def _check_nonfinite(self, k: int) -> None:
        """Refuse (on_nonfinite: error) or report tokens with NaN/Inf that file k would store."""
        for h, s in self.stats.items():
            n = s.nonfinite_tokens - self.nonfinite.get(h, 0)  # read once per file: a GPU sync
            wide, lost = self.overflow.pop(h, (None, 0))
            if not n:
                continue
            where = f"machine {self.machine}, file {k}, hook {h}: {n} token(s) hold NaN or Inf"
            if wide is not None and int(lost):
                where += (
                    f" ({int(lost)} of them finite in the module's {dtypes.name(wide)} output, beyond "
                    f"{dtypes.name(self.dtype)}'s largest value: stored as Inf)"
                )
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


def _bar(show: bool, total: int | None, initial: int) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="batch", dynamic_ncols=True, mininterval=1.0)
