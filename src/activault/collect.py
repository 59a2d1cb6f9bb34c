"""The collection loop: documents → model → cleaned activations → statistics → megabatch files.

Commit protocol, per megabatch k of machine i: the file `{hook}/m{i}-{k}` of every hook is
written (atomically), then `progress/machine-{i}.json` records k+1 files, the data cursor and the
statistics so far. A restart reads that record and continues at file k+1 with the same data and
statistics, so a run killed at any point and resumed ends with the same bytes as one that was not.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .config import Config, resolve_storage
from .errors import ConfigError, FormatError, NotFoundError
from .format import encode, file_name, hook_metadata
from .stats import RunningStats, merge_all
from .store import Store, open_store
from .writer import BufferPool, Writer

log = logging.getLogger(__name__)

GB = 1e9


def progress_key(run: str, machine: int) -> str:
    return f"{run}/progress/machine-{machine:05d}.json"


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    """A JSON record, or None if absent; a damaged one raises FormatError naming it."""
    try:
        return json.loads(store.get_text(key))
    except NotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(
            f"{store.url(key)} is not valid JSON ({e}); delete it and run the same command again to rewrite it"
        ) from None


def write_json(store: Store, key: str, obj: Any) -> None:
    store.put_text(key, json.dumps(obj, indent=1, sort_keys=True) + "\n")


@dataclass
class Plan:
    """What a collection will produce, known before any weights load."""

    tokens: int
    files: int
    rows_per_file: int
    bytes_per_hook: dict[str, int]
    price_per_gb_month: float

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_hook.values())

    @property
    def monthly_cost(self) -> float:
        return self.total_bytes / GB * self.price_per_gb_month


def make_plan(cfg: Config, dims: dict[str, int], itemsize: int, machine: int | None = None) -> Plan:
    """Tokens, files and bytes for one machine (or the whole run when machine is None)."""
    d = cfg.data_config
    batches = d.n_batches if machine is None else cfg.machine_batches(machine)
    machines = range(cfg.num_runs) if machine is None else [machine]
    files = sum(cfg.machine_files(m) for m in machines)
    tokens = batches * d.batch_size * d.seq_length
    per_token = {h: dim * itemsize + 8 for h, dim in dims.items()}  # + int32 id and int32 position
    return Plan(tokens, files, cfg.rows_per_file, {h: tokens * b for h, b in per_token.items()},
                cfg.upload_config.price_per_gb_month)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"


def summary_lines(cfg: Config, plan: Plan, dims: dict[str, int], info: dict[str, Any], dest: str, machine: int) -> list[str]:
    lines = [
        f"model        {cfg.transformer_config.model_name} ({info.get('model_type', '?')}, "
        f"{info.get('n_layers', '?')} layers, d_model {info.get('d_model', '?')})",
        f"machine      {machine} of {cfg.num_runs}",
        f"tokens       {plan.tokens:,} in {plan.files} files of {plan.rows_per_file} rows x {cfg.data_config.seq_length}",
    ]
    for h, b in plan.bytes_per_hook.items():
        lines.append(f"hook         {h}  d={dims[h]}  {human_bytes(b)}")
    lines += [
        f"total        {human_bytes(plan.total_bytes)}  (~${plan.monthly_cost:,.2f}/month at "
        f"${plan.price_per_gb_month}/GB-month)",
        f"destination  {dest}/{cfg.run_name}",
    ]
    return lines


def check_run_record(store: Store, cfg: Config, record: dict[str, Any]) -> None:
    """Refuse to join a run whose stored config differs in what shapes the data."""
    key = f"{cfg.run_name}/cfg.json"
    old = read_json(store, key)
    if old is None:
        return
    if old.get("num_runs") != cfg.num_runs:
        raise ConfigError(
            f"run {cfg.run_name!r} at {store.url(key)} was started with num_runs={old.get('num_runs')}, "
            f"this config says num_runs={cfg.num_runs}: machines would collect overlapping data. "
            "Use the same num_runs, or a new run_name"
        )
    for field_name in ("hooks", "tokenizer"):
        if old.get(field_name) != record.get(field_name):
            raise ConfigError(
                f"run {cfg.run_name!r} was started with {field_name}={old.get(field_name)!r}, this config has "
                f"{record.get(field_name)!r}; use the same config, or a new run_name"
            )
    old_data = dict(old.get("config", {}).get("data_config", {}))
    new_data = record["config"]["data_config"]
    for k in ("data_key", "seq_length", "batch_size", "seed", "shuffle_buffer", "clean_added_tokens",
              "clean_default_system_prompt", "start_batch"):
        if k in old_data and old_data[k] != new_data.get(k):
            raise ConfigError(
                f"run {cfg.run_name!r} was started with data_config.{k}={old_data[k]!r}, this config has "
                f"{new_data.get(k)!r}; resuming would mix different data. Use the same config, or a new run_name"
            )


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


class _Progress:
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


def collect(cfg: Config, machine: int = 0, storage: str | None = None, show_progress: bool = True) -> Result:
    """Collect this machine's share of the run; resumes from its progress record."""
    from .data import DataState, iter_batches, resolve_source
    from .hooks import Capture, hook_dims, resolve_hooks
    from .model import load_model, load_skeleton, load_tokenizer, model_info

    if not 0 <= machine < cfg.num_runs:
        raise ConfigError(f"--machine {machine} is out of range: num_runs is {cfg.num_runs}, so use 0..{cfg.num_runs - 1}")
    tc, dc, uc = cfg.transformer_config, cfg.data_config, cfg.upload_config
    run = cfg.run_name

    # Everything that can be wrong is checked before any weights load.
    dest = resolve_storage(cfg, storage)
    store = open_store(dest)
    store.check(write=True)
    resolve_source(dc.data_key, dc.registry)
    skeleton = load_skeleton(tc)
    specs = resolve_hooks(skeleton, uc.hooks)
    dims = hook_dims(skeleton, specs)
    info = model_info(skeleton)
    tokenizer = load_tokenizer(tc)
    itemsize = torch.empty((), dtype=_torch_dtype(tc.dtype, skeleton)).element_size()
    record = {
        "format": "activault", "format_version": 1, "activault_version": __version__, "run_name": run,
        "config": cfg.to_public_dict(), "model": info, "tokenizer": tc.model_name, "hooks": uc.hooks,
        "hook_dims": dims, "num_runs": cfg.num_runs,
        "progress": [progress_key(run, m).split("/", 1)[1] for m in range(cfg.num_runs)],
    }  # fmt: skip
    check_run_record(store, cfg, record)
    progress = _Progress(store, run, machine, cfg.num_runs)
    plan = make_plan(cfg, dims, itemsize, machine)
    for line in summary_lines(cfg, plan, dims, info, store.uri, machine):
        log.info(line)
    for note in store.cost_notes(0 if dc.skip_cache else plan.total_bytes):
        log.warning("note: %s", note)

    result = Result(destination=store.url(run))
    if progress.finished:
        log.info("machine %d already finished (%d files); refreshing statistics", machine, progress.files_done)
        merge_statistics(store, run, uc.hooks, cfg.num_runs)
        return result

    write_json(store, f"{run}/cfg.json", record)
    # Only this machine writes these names, and its previous process is gone: its temp files are stale.
    for h in uc.hooks:
        store.clear_partial(f"{run}/{h}", f"m{machine:05d}-")
    store.clear_partial(f"{run}/progress", f"machine-{machine:05d}")
    model = load_model(tc, specs)
    device = next(model.parameters()).device
    stats = {h: RunningStats(dims[h], device) for h in uc.hooks}
    for h, d in progress.stats.items():
        stats[h] = RunningStats.from_dict(d, device)
    if progress.files_done:
        log.info("resuming machine %d after %d files", machine, progress.files_done)

    n_batches = cfg.machine_batches(machine)
    n_files = cfg.machine_files(machine)
    state = DataState.from_dict(progress.data_state) if progress.data_state else None
    batches = iter_batches(dc, tokenizer, machine=machine, num_runs=cfg.num_runs, state=state)
    if state is None:
        for _ in range(dc.start_batch):
            if next(batches, None) is None:
                break

    writer = Writer(store, threads=uc.write_threads)
    pools: dict[str, BufferPool] = {}
    pin = device.type == "cuda"
    rows_per_file, S = cfg.rows_per_file, dc.seq_length
    files, rows_total, tokens_total = progress.files_done, progress.rows_done, progress.tokens_done
    t0 = time.perf_counter()
    bar = _bar(show_progress, total=n_batches, initial=files * uc.batches_per_upload)
    capture = Capture(model, specs)
    used_devices: set[torch.device] = set()
    try:
        for k in range(progress.files_done, n_files):
            n_here = min(uc.batches_per_upload, n_batches - k * uc.batches_per_upload)
            ids = torch.empty(rows_per_file, S, dtype=torch.int32)
            pos = torch.empty(rows_per_file, S, dtype=torch.int32)
            bufs: dict[str, torch.Tensor] = {}
            rows = 0
            data_state = None
            for _ in range(n_here):
                batch = next(batches, None)
                if batch is None:
                    break
                B = batch.input_ids.shape[0]
                acts = capture(batch.input_ids.to(device), batch.position_ids.to(device), batch.segment_ids.to(device))
                flat = batch.keep.reshape(-1).nonzero().squeeze(1)  # [B*S] positions of stored tokens
                ids[rows : rows + B] = batch.input_ids.reshape(-1)[flat].view(B, S)
                doc_pos = batch.doc_positions.reshape(-1)[flat].view(B, S)
                pos[rows : rows + B] = doc_pos
                real = (doc_pos >= 0).reshape(-1)
                on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # hooks may sit on several GPUs
                for h in uc.hooks:
                    a = acts[h]
                    if a.device not in on:
                        on[a.device] = (flat.to(a.device, non_blocking=True), real.to(a.device, non_blocking=True))
                        used_devices.add(a.device)
                    flat_d, real_d = on[a.device]
                    kept = a.reshape(-1, a.shape[-1]).index_select(0, flat_d)  # [B*S, d]
                    if not bool(real.all()):
                        kept = torch.where(real_d.unsqueeze(1), kept, 0)  # padding stored as zeros
                        stats[h].update(kept[real_d])
                    else:
                        stats[h].update(kept)
                    if h not in bufs:
                        if h not in pools:
                            pools[h] = BufferPool((rows_per_file, S, kept.shape[-1]), kept.dtype, uc.max_pending + 1, pin)
                        bufs[h] = pools[h].acquire(writer._check)
                    # Pinned host buffer, async copy; synchronised below before the writer reads it.
                    bufs[h][rows : rows + B].copy_(kept.view(B, S, -1), non_blocking=pin)
                rows += B
                data_state = batch.state.to_dict()
                tokens_total += int(real.sum())
                bar.update(1)
                bar.set_postfix_str(_rate(tokens_total - progress.tokens_done, writer.bytes_written, t0))
            for dev in used_devices:
                if dev.type == "cuda":
                    torch.cuda.current_stream(dev).synchronize()  # the async copies into host buffers are done
            if rows == 0:
                for h, b in bufs.items():
                    pools[h].release(b)
                break
            futures = []
            if not dc.skip_cache:
                for h in uc.hooks:
                    meta = {"format": "activault", "format_version": "1", "run_name": run, "hook": h,
                            "machine": str(machine), "file_index": str(k), "model": tc.model_name}  # fmt: skip
                    parts = encode({"states": bufs[h][:rows], "input_ids": ids[:rows], "positions": pos[:rows]}, meta)
                    futures.append(writer.write(f"{run}/{h}/{file_name(machine, k)}", parts,
                                                on_done=_releaser(pools[h], bufs[h])))
            else:
                for h, b in bufs.items():
                    pools[h].release(b)
            files, rows_total = k + 1, rows_total + rows
            snapshot = {h: s.to_dict() for h, s in stats.items()}
            rec = progress.record(files, rows_total, tokens_total, data_state, snapshot, finished=False)
            first = k == progress.files_done
            metas = {h: hook_metadata(run_name=run, hook=h, d_model=pools[h].shape[-1], dtype=pools[h].dtype,
                                      seq_length=S, rows_per_file=rows_per_file, batch_size=dc.batch_size,
                                      batches_per_upload=uc.batches_per_upload, model=tc.model_name)
                     for h in uc.hooks} if first else {}  # fmt: skip
            writer.commit(futures, _committer(store, run, progress.key, rec, metas))
            if rows < rows_per_file and k < n_files - 1:
                break  # the data ran out: this partial megabatch is the last
        writer.flush()
        final = progress.record(files, rows_total, tokens_total, None, {h: s.to_dict() for h, s in stats.items()}, True)
        write_json(store, progress.key, final)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        capture.close()
        bar.close()
    merged = merge_statistics(store, run, uc.hooks, cfg.num_runs)
    result.files, result.rows, result.tokens = files, rows_total, tokens_total
    result.bytes_written, result.seconds = writer.bytes_written, time.perf_counter() - t0
    result.stats = stats
    log.info("wrote %d files (%s) to %s in %.1fs; statistics cover machines %s", files - progress.files_done,
             human_bytes(writer.bytes_written), result.destination, result.seconds, merged)
    return result


def _committer(store: Store, run: str, key: str, rec: dict[str, Any], metas: dict[str, dict[str, Any]]):
    def commit() -> None:
        for h, meta in metas.items():
            write_json(store, f"{run}/{h}/metadata.json", meta)
        write_json(store, key, rec)

    return commit


def _releaser(pool: BufferPool, buf: torch.Tensor):
    return lambda: pool.release(buf)


def _torch_dtype(name: str, skeleton: torch.nn.Module) -> torch.dtype:
    if name == "auto":
        try:
            return next(skeleton.parameters()).dtype
        except StopIteration:
            return torch.float32
    return getattr(torch, name)


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
