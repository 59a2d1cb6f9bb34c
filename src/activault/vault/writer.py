"""Writing a run: `RunWriter`, the one owner of the commit protocol, over a bounded background writer.

Every path that creates or rewrites a run (collect, import, recompress, test data) goes through
here, so the order readers rely on (docs/format.md, "Commit protocol") exists once: cfg.json
checked and written; file k of every hook, encoded and written on the writer threads; then, on the
single commit thread, metadata.json (first file of a session) and the progress record counting k+1
files; at the end the finished record and the statistics merged over finished machines.

The progress record is the one object that counts files, and its writer fences it: each record is
written only over the bytes this writer last read or wrote there (`Store.swap`: If-Match on S3, a
compare under flock locally). A collector that lost its machine to another (its lease expired in a
network partition, and the other took over) is refused with LockedError when its pending record
lands, instead of writing an old count over the new holder's, or over its finished record; the
files it wrote meanwhile hold the same bytes as the new holder's and nothing counts them twice.

Files and records are written by a bounded background `Writer` (`writer_threads.py`): a failed write
is raised at the next `write_file`, `flush` or `close`, and the run stops instead of losing data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from activault import dtypes
from activault.errors import ConfigError, FormatError, LockedError, NotFoundError
from activault.storage.base import Store, join
from activault.storage.lock import MachineLock
from activault.vault import codec as codecs
from activault.vault.megabatch import DOCUMENTS, Megabatch, decode, encode
from activault.vault.norms import NORMS_SINCE
from activault.vault.records import (
    HookMetadata,
    ProgressRecord,
    RunRecord,
    StatsRecord,
    file_name,
    header_metadata,
    metadata_key,
    parse_record,
    progress_key,
    read_metadata,
    record_text,
    redo_machine,
    write_record,
)
from activault.vault.runs import join_run, merge_statistics, rebuild_metadata
from activault.vault.stats import RunningStats
from activault.vault.writer_threads import Writer


class RunWriter:
    """Writes one machine's files of a run and every record of the run, in the commit protocol's order.

    Args:
        record: cfg.json, built by the caller (collection/resume.py `run_record` for a collection).
        metadata: hook -> what its files hold (metadata.json); each file is checked against it.
        codec: how `states` are compressed (None: raw); metadata.json says so.
        store_files: False writes the records only (`data_config.skip_cache`).
        measured: told (hook, raw bytes, stored bytes) of each hook's first compressed file.
        claim: the held claim on this machine (storage/lock.py): checked before each record, and
            named when another collector has rewritten the progress record.
        norms: False labels files with the last format version before per-token norms, so the
            encoder computes none (a scratch run no reader filters: the shuffle's buckets).
    """

    def __init__(
        self,
        store: Store,
        record: RunRecord,
        metadata: Mapping[str, HookMetadata],
        machine: int = 0,
        *,
        codec: codecs.Codec | None = None,
        threads: int = 4,
        store_files: bool = True,
        measured: Callable[[str, int, int], None] | None = None,
        claim: MachineLock | None = None,
        norms: bool = True,
    ):
        self.store, self.record, self.machine, self.run = store, record, machine, record.run_name
        self.claim = claim
        _check_specs(store.url(self.run), record, metadata, machine)
        described = codecs.describe(codec)
        self.metadata = {h: metadata[h].model_copy(update={"compression": described}) for h in record.hooks}
        self.codec, self.store_files, self.measured = codec, store_files, measured
        self.threads, self.norms = threads, norms
        self._seen: bytes | None = None  # the progress record's bytes as last read or written here
        self.resumed = self._read_progress()  # this machine's record when the writer opened
        self.files, self.rows, self.tokens = self.resumed.files_done, self.resumed.rows_done, self.resumed.tokens_done
        self._writer: Writer | None = None

    def _read_progress(self) -> ProgressRecord:
        """This machine's record, read once: its bytes are what the next record is written over."""
        self._seen = self._stored_progress()
        if self._seen is None:
            return ProgressRecord(machine=self.machine, num_runs=self.record.num_runs)
        key = progress_key(self.run, self.machine)
        url, fix = self.store.url(key), redo_machine(self.store.url(self.run), self.machine)
        rec = parse_record(self._seen, ProgressRecord, url, fix)
        if rec.machine != self.machine:
            raise FormatError(f"{url}: field 'machine' is {rec.machine}, the name says {self.machine}; {fix}")
        if rec.num_runs != self.record.num_runs:
            raise ConfigError(
                f"{url} was written with num_runs={rec.num_runs}, not {self.record.num_runs}; use the "
                "run's num_runs or a new run_name"
            )
        return rec

    def _stored_progress(self) -> bytes | None:
        try:
            return bytes(self.store.get(progress_key(self.run, self.machine)))
        except NotFoundError:
            return None

    def _write_progress(self, record: ProgressRecord) -> None:
        """Write the progress record over the bytes this writer last saw there, or raise LockedError."""
        if self.claim is not None:
            self.claim.check()
        data = record_text(record.model_dump()).encode()  # write_record's bytes
        if not self.store.swap(progress_key(self.run, self.machine), data, self._seen):
            now = self._stored_progress()
            if now != data:  # equal: ours, its reply lost and the retry refused (S3), or the same count
                raise LockedError(self._taken_over(now))
        self._seen = data

    def _check_record(self) -> None:
        """Raise LockedError if the claim is lost, or the progress record is not the one last seen here."""
        if self.claim is not None:
            self.claim.check()
        now = self._stored_progress()
        if now != self._seen:
            raise LockedError(self._taken_over(now))

    def _taken_over(self, now: bytes | None) -> str:
        """Why this writer stops: another collector rewrote (or removed) the machine's progress record."""
        url = self.store.url(progress_key(self.run, self.machine))
        try:
            fields = json.loads(now) if now is not None else {}
        except ValueError:
            fields = {}
        fields = fields if isinstance(fields, dict) else {}
        state = "is gone" if now is None else f"counts {fields.get('files_done', '?')} files"
        state += ", finished" if fields.get("finished") is True else ""
        return (
            f"run {self.run!r} machine {self.machine} was taken over: its progress record {url} "
            f"{state}, not what this collector last wrote; the machine is held now by "
            f"{self.claim.current_holder() if self.claim is not None else 'another collector'}. This "
            "collector stopped without writing over that record, and nothing counts the files it wrote "
            "since. Nothing to repair: once the other collector has stopped, the same command resumes "
            "from that record (a finished machine stays finished)"
        )

    # ---- the run's records -----------------------------------------------------------------------

    def join(self, check: Callable[[RunRecord | None], None] | None = None) -> None:
        """cfg.json written unless the stored one is the same (`check` sees it first and may refuse);
        each hook's metadata.json rebuilt when missing, damaged or out of date."""
        join_run(self.store, self.record, check)
        rebuild_metadata(self.store, self.run, self.metadata, self.machine, self.resumed.files_done)

    def begin(self) -> None:
        """Clear this machine's leftover temp files: only it writes these names, and it holds the machine."""
        for h in self.record.hooks:
            self.store.clear_partial(join(self.run, h), file_name(self.machine, 0).rpartition("-")[0] + "-")
        name = progress_key("", self.machine).rpartition("/")[2].removesuffix(".json")
        self.store.clear_partial(join(self.run, "progress"), name)

    def merge_statistics(self) -> list[int]:
        """Each hook's statistics.json as the merge over finished machines; returns those machines."""
        return merge_statistics(self.store, self.run, self.record.hooks, self.record.num_runs)

    # ---- files -----------------------------------------------------------------------------------

    def write_file(
        self,
        states: Mapping[str, torch.Tensor],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        tokens: int,
        data_state: dict[str, Any] | None,
        stats: Mapping[str, RunningStats],
        on_written: Mapping[str, Callable[[], None]] | None = None,
        documents: torch.Tensor | None = None,
    ) -> Future[None]:
        """Queue the next file of every hook, then the progress record counting it; returns the commit.

        Args:
            states: hook -> [rows, seq, d] in the hook's dtype; input_ids, positions: [rows, seq] int32.
            tokens: real (not padding) tokens of this file; data_state: the data cursor after it.
            stats: hook -> running statistics including this file (read now, on the caller's thread).
            on_written: hook -> called once its file is written or has failed (frees its buffer).
            documents: [rows, seq] int64, each token's document ordinal in the machine's stream, -1 =
                padding (a collection's provenance; without it the file is labelled format version 3).
        """
        k, rows = self.files, self._check_file(states, input_ids, positions, documents=documents)
        # The record first: once the writer threads run Python, each small torch call building it
        # hands them the GIL and waits for it back (docs/benchmarks.md: Collection).
        record = self._record(k + 1, self.rows + rows, self.tokens + tokens, data_state, stats, finished=False)
        metas = self.metadata if k == self.resumed.files_done else {}
        writer, done = self._background(), on_written or {}
        futures = []
        for h in self.record.hooks:
            if not self.store_files:
                if h in done:
                    done[h]()
                continue
            tensors = _tensors(states[h], input_ids, positions, documents)
            key = join(self.run, h, file_name(self.machine, k))
            futures.append(writer.write(key, self._encoding(h, k, tensors), on_done=done.get(h)))
        self.files, self.rows, self.tokens = k + 1, self.rows + rows, self.tokens + tokens
        return writer.commit(futures, lambda: self._commit(metas, record))

    def rewrite_file(
        self,
        k: int,
        states: Mapping[str, torch.Tensor],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hooks: Collection[str],
        on_written: Mapping[str, Callable[[], None]] | None = None,
        documents: torch.Tensor | None = None,
    ) -> None:
        """Queue file k of `hooks` again (`collect --repair`: a damaged copy collected again, the
        same bytes); no record changes, since the progress record already counts the file.
        LockedError, and nothing queued, once another collector has the machine."""
        if not 0 <= k < self.resumed.files_done:
            raise ValueError(f"file {k} is not one of the {self.resumed.files_done} files the record counts")
        self._check_file(states, input_ids, positions, k, documents)
        self._check_record()
        writer, done = self._background(), on_written or {}
        for h in self.record.hooks:
            if h not in hooks or not self.store_files:
                if h in done:
                    done[h]()
                continue
            tensors = _tensors(states[h], input_ids, positions, documents)
            key = join(self.run, h, file_name(self.machine, k))
            writer.write(key, self._encoding(h, k, tensors), on_done=done.get(h))

    def close(self) -> None:
        """Wait for every queued write and stop the writer threads, writing no record (`rewrite_file`)."""
        if self._writer is not None:
            self._writer.close()

    def _check_file(
        self,
        states: Mapping[str, torch.Tensor],
        ids: torch.Tensor,
        pos: torch.Tensor,
        k: int | None = None,
        documents: torch.Tensor | None = None,
    ) -> int:
        """The file's rows; a FormatError, before anything is written, when it does not fit the run."""
        where = f"{self.store.url(self.run)}: file {self.files if k is None else k} of machine {self.machine}"
        if set(states) != set(self.metadata):
            raise FormatError(f"{where} has hooks {sorted(states)}, the run {self.record.hooks}; nothing written")
        meta = next(iter(self.metadata.values()))
        named = [("input_ids", ids, torch.int32), ("positions", pos, torch.int32)]
        for name, t, dtype in named + ([(DOCUMENTS, documents, torch.int64)] if documents is not None else []):
            if t.dtype != dtype or t.dim() != 2 or t.shape[1] != meta.seq_length or t.shape != ids.shape:
                raise FormatError(
                    f"{where}: {name} is {list(t.shape)} {dtypes.name(t.dtype)}, the run stores "
                    f"[rows, {meta.seq_length}] {dtypes.name(dtype)} (the same rows as input_ids); nothing written"
                )
        rows = ids.shape[0]
        for h, meta in self.metadata.items():
            x = states[h]
            if (
                not 0 < rows <= meta.rows_per_file
                or list(x.shape) != [rows, meta.seq_length, meta.d_model]
                or dtypes.name(x.dtype) != meta.dtype
            ):
                raise FormatError(
                    f"{where}: states of hook {h!r} are {list(x.shape)} {dtypes.name(x.dtype)} with "
                    f"{rows} rows of ids, the run stores [1..{meta.rows_per_file}, {meta.seq_length}, "
                    f"{meta.d_model}] {meta.dtype} (its metadata.json); nothing written"
                )
        return rows

    def _encoding(self, hook: str, k: int, tensors: dict[str, torch.Tensor]) -> Callable[[], list[memoryview]]:
        """The file's parts as a function: a writer thread hashes (checksums) and compresses, never
        the producer's thread (xxh3 and zstd release the GIL)."""
        meta = header_metadata(self.run, hook, self.machine, k, self.metadata[hook].model, DOCUMENTS in tensors)
        if not self.norms:  # 4 with documents, 3 without: the same bytes but the norms
            meta["format_version"] = str(min(int(meta["format_version"]), NORMS_SINCE - 1))

        def build() -> list[memoryview]:
            parts = encode(tensors, meta, compression=self.codec)
            if self.codec is not None and self.measured is not None and k == self.resumed.files_done:
                raw = sum(t.numel() * t.element_size() for t in tensors.values())
                self.measured(hook, raw, sum(p.nbytes for p in parts))
            return parts

        return build

    def _commit(self, metas: Mapping[str, HookMetadata], record: ProgressRecord) -> None:
        """On the commit thread, after the files it counts: metadata.json, then the progress record."""
        if metas:  # once a session: a collector that lost the machine rewrites no metadata either
            self._check_record()
        for h, meta in metas.items():
            write_record(self.store, metadata_key(join(self.run, h)), meta)
        self._write_progress(record)

    def _record(
        self,
        files: int,
        rows: int,
        tokens: int,
        data_state: dict[str, Any] | None,
        stats: Mapping[str, RunningStats],
        finished: bool,
    ) -> ProgressRecord:
        # Our own numbers: constructed without a validation pass over every statistic.
        return ProgressRecord.model_construct(
            machine=self.machine,
            num_runs=self.record.num_runs,
            files_done=files,
            rows_done=rows,
            tokens_done=tokens,
            data_state=data_state,
            finished=finished,
            stats={h: StatsRecord.model_construct(**s.to_dict()) for h, s in stats.items()},
        )

    def _background(self) -> Writer:
        if self._writer is None:
            self._writer = Writer(self.store, threads=self.threads)
        return self._writer

    # ---- ending ----------------------------------------------------------------------------------

    @property
    def bytes_written(self) -> int:
        return self._writer.bytes_written if self._writer is not None else 0

    def check(self) -> None:
        """Raise a failed write's error now (e.g. while waiting for a staging buffer)."""
        if self._writer is not None:
            self._writer.check()

    def flush(self) -> None:
        """Wait until every queued file and record is written; raise the first error."""
        if self._writer is not None:
            self._writer.flush()

    def finish(self, data_state: dict[str, Any] | None, stats: Mapping[str, RunningStats]) -> list[int]:
        """After every queued file and record: the finished record, then statistics merged over the
        finished machines (returned). LockedError, and nothing written, if the machine was taken over;
        ValueError, and nothing written, without every hook's statistics (a finished record lacking
        them reads as damaged)."""
        if missing := [h for h in self.record.hooks if h not in stats]:
            raise ValueError(f"a finished machine's record needs every hook's statistics; none for {missing}")
        writer = self._background()
        writer.flush()
        record = self._record(self.files, self.rows, self.tokens, data_state, stats, finished=True)
        self._write_progress(record)
        writer.close()
        return self.merge_statistics()

    def abort(self) -> None:
        """Stop without raising: queued files are dropped, and no record counts them."""
        if self._writer is not None:
            self._writer.abort()


def _tensors(
    states: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, documents: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """One hook's file: states, ids, positions and, for a collection, the document ordinals."""
    out = {"states": states, "input_ids": ids, "positions": pos}
    if documents is not None:
        out[DOCUMENTS] = documents
    return out


def _check_specs(url: str, record: RunRecord, metadata: Mapping[str, HookMetadata], machine: int) -> None:
    """Refuse a writer whose record, metadata and machine do not describe one run."""
    if set(metadata) != set(record.hooks):
        raise ConfigError(f"{url}: metadata for hooks {sorted(metadata)}, the run has {record.hooks}")
    odd = [h for h, m in metadata.items() if (m.run_name, m.hook) != (record.run_name, h)]
    if odd:
        raise ConfigError(f"{url}: the metadata of hook {odd[0]!r} names another run or hook")
    if not 0 <= machine < record.num_runs:
        raise ConfigError(f"{url}: machine {machine} is not in 0..{record.num_runs - 1} (num_runs)")


# ---- rewriting a stored run ------------------------------------------------------------------------


def replace_file(store: Store, key: str, data: bytes, check: Callable[[Megabatch], None] | None = None) -> None:
    """Overwrite the stored megabatch `key` with `data` in one atomic put, only once `data` decodes
    (checksums verified) and `check` accepts it: a reader sees the old file or the new one."""
    new = decode(data, store.url(key), verify_checksums=True)
    if check is not None:
        check(new)
    store.put(key, data)


def record_compression(store: Store, folder: str, codec: codecs.Codec | None) -> None:
    """Say in a hook folder's metadata.json (if any) that new files are stored with `codec`."""
    meta = read_metadata(store, folder)
    if meta is not None:
        write_record(store, metadata_key(folder), meta.model_copy(update={"compression": codecs.describe(codec)}))
