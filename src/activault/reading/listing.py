"""Which megabatch files a reader reads: each source's files (in every hook) and their shape."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from activault import dtypes
from activault.errors import ConfigError, FormatError, NotFoundError
from activault.reading.options import ReadOptions
from activault.storage import STORE_OPTIONS, Entry, Store, open_store, open_stores, parse_uri
from activault.storage.uri import is_s3
from activault.vault import megabatch as fmt
from activault.vault import original as orig
from activault.vault import records

# Records kept beside the megabatches in a hook folder.
RECORDS = ("metadata.json", "statistics.json")
RECORD_THREADS = 64  # object storage: records read at once (`_records_pool`)
P = ParamSpec("P")
T = TypeVar("T")
Progress = dict[int, records.ProgressCount | None]  # machine -> its progress record (None: damaged)


class _Inline(Executor):
    """Runs each call at once, on the caller's thread."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - raised to whoever asks the future, as a pool's
            future.set_exception(e)
        return future


def _records_pool(stores: Sequence[Store], jobs: int) -> Executor:
    """Where records are read: on threads for object storage (a round trip each, overlapped), else
    inline: a local record reads in ~0.1 ms, a thread's start and hand-off took 1-8 ms on this
    project's VM (most of a local reader's construction). Up to RECORD_THREADS at once: a run
    from 64 machines had its progress records read in 195 ms on 16 threads, 130 ms on 64 (30 ms
    a round trip)."""
    if any(is_s3(s.uri) for s in stores):
        return ThreadPoolExecutor(min(jobs, RECORD_THREADS) or 1, thread_name_prefix="activault-records")
    return _Inline()


@dataclass(frozen=True)
class StatesShape:
    """What each row of a hook's files holds: `states: [rows, seq_len, d_model]` of `dtype`."""

    seq_len: int
    d_model: int
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"[rows, {self.seq_len}, {self.d_model}] {dtypes.name(self.dtype)}"


@dataclass(frozen=True)
class Prefix:
    """One source: a store, and per hook the folder of its files ("" when the URI is one)."""

    store: Store
    folders: tuple[str, ...]
    # Where the run's cfg.json and progress records are: the store itself for a run folder, the
    # folder above for a hook folder's URI (None: a Store given as it is, or no folder above).
    records: Store | None = None
    hooks: tuple[str, ...] = ("",)  # hook names, for messages

    def key(self, h: int, name: str) -> str:
        return f"{self.folders[h]}/{name}" if self.folders[h] else name

    def url(self, h: int, name: str) -> str:
        return self.store.url(self.key(h, name))


@dataclass(frozen=True)
class FileRef:
    """A megabatch file, the same name in every hook folder of one source."""

    source: int  # index into Catalog.prefixes
    name: str
    sizes: tuple[int, ...]  # bytes, one per hook


class Catalog:
    """The megabatch files of one or more sources, in blocks: `sync()` appends, never reorders.

    A file must be in every hook: one missing from some hooks is an error naming it and them
    (with `skip_bad_files`, it is skipped, counted in `incomplete` and warned about), unless its
    machine's progress record says it is still being written (then a later `sync()` adds it).
    Read from a run folder (`hooks`), a file its machine's progress record counts is expected in
    every hook too, so a reader of one hook does not skip a lost file in silence.
    Objects that are not megabatches (other names, empty objects) are skipped and listed in
    `foreign`, with a warning.

    Args:
        uri: a hook folder, a Store, or a list of them (concatenated in order; they must agree on
            d_model, dtype and seq_len). With `hooks`, the run folder(s) instead.
        options: its `store_options` open the stores of URIs (open_stores); `skip_bad_files`.
    """

    def __init__(
        self,
        uri: str | Path | Store | Sequence[str | Path | Store],
        *,
        hooks: Sequence[str] | None = None,
        options: ReadOptions | None = None,
    ):
        uris = [uri] if isinstance(uri, str | Path | Store) else list(uri)
        if not uris:
            raise ConfigError("a reader needs at least one URI")
        options = options if options is not None else ReadOptions()
        if isinstance(hooks, str) or not all(isinstance(h, str) and h.strip("/") for h in hooks or ()):
            raise ConfigError(f"hooks={hooks!r} is not accepted: hooks must be a list of hook folder names")
        self.hooks = [h.strip("/") for h in hooks] if hooks else None
        self.skip_bad_files = options.skip_bad_files
        folders = tuple(self.hooks) if self.hooks else ("",)
        stores = open_stores(uris, options.store_options or {})
        self.prefixes = [self._prefix(u, s, folders, options) for u, s in zip(uris, stores, strict=True)]
        self._plans: dict[int, records.RunRecord | None] = {}  # source -> its run's cfg.json
        self._plan_reads: dict[int, Future[records.RunRecord | None]] = {}  # cfg.json asked, not yet used
        self._damaged: set[str] = set()  # progress records warned about
        self.blocks: list[list[FileRef]] = []
        self.incomplete: dict[str, list[str]] = {}  # url of a file -> hooks that lack it (skipped)
        self.foreign: dict[str, str] = {}  # url of an object that is not a megabatch -> why (skipped)
        self._seen: set[tuple[int, str]] = set()
        # Each hook's metadata.json is read while the folders are listed: one round trip, not two.
        pairs = [(si, h) for si, p in enumerate(self.prefixes) for h in range(len(p.folders))]
        # cfg.json too, for the progress records' plan: on object storage each read is a round trip.
        with _records_pool([p.store for p in self.prefixes], len(pairs) + len(self.prefixes)) as pool:
            asked = {
                (si, h): pool.submit(records.read_metadata, self.prefixes[si].store, self.prefixes[si].folders[h])
                for si, h in pairs
            }
            self._plan_reads = {
                si: pool.submit(records.read_run, p.records, "", original_ok=True)
                for si, p in enumerate(self.prefixes)
                if p.records is not None and is_s3(p.records.uri)
            }
            found = self.sync()
            if not found:
                where = ", ".join(p.store.url(p.folders[0]) for p in self.prefixes)
                raise NotFoundError(
                    f"no megabatch files under {where}; the URI should name a hook folder (run/hook), or pass hooks="
                )
            self._metadata = {k: f.result() for k, f in asked.items()}  # a damaged record raises here
        self.shapes: list[StatesShape | None] = self._check_compatible()

    def _prefix(self, uri: str | Path | Store, store: Store, folders: tuple[str, ...], options: ReadOptions) -> Prefix:
        """A source; a hook folder's URI reads its run's progress records in the folder above."""
        if self.hooks:
            return Prefix(store, folders, store, tuple(self.hooks))
        if isinstance(uri, Store):
            return Prefix(store, folders)
        parsed = parse_uri(uri)
        if not parsed.path.strip("/"):
            return Prefix(store, folders)  # a bucket or the filesystem's root: nothing above
        parent, _, hook = str(parsed).rstrip("/").rpartition("/")
        own = {k: v for k, v in (options.store_options or {}).items() if k in STORE_OPTIONS[parsed.scheme]}
        return Prefix(store, folders, open_store(parent or "/", **own), (hook,))

    def sync(self) -> int:
        """List again; files not seen before are appended as a new block. Returns how many."""
        new: list[FileRef] = []
        for si, prefix in enumerate(self.prefixes):
            per_hook, empty, odd, progress = self._listing(si, prefix)
            listed = set.union(*(set(p) for p in per_hook))
            if not listed:
                progress = {}  # none listed: the NotFoundError says so (or a run stored no files)
            counted = _counted(progress)
            self._foreign(
                [o for os in odd for o in os] + [(u, "empty") for e in empty for n, u in e.items() if n not in counted]
            )
            lost = [{n for n in e if n in counted} for e in empty]
            complete = set.intersection(*(set(p) for p in per_hook))
            self._partial(si, prefix, per_hook, lost, (listed | counted) - complete, progress)
            for name in sorted(complete):
                if (si, name) not in self._seen:
                    self._seen.add((si, name))
                    new.append(FileRef(si, name, tuple(p[name] for p in per_hook)))
        if new:
            self.blocks.append(new)
        return len(new)

    def _listing(
        self, si: int, prefix: Prefix
    ) -> tuple[tuple[dict[str, int], ...], tuple[dict[str, str], ...], tuple[list[tuple[str, str]], ...], Progress]:
        """Every hook folder's listing (`_list`) and the progress records, the records read first:
        a file they count was written before them, so a listing made after them has it.

        On object storage, where each is a round trip, the hook folders are listed while the
        records are read (all at once), and listed again only if a record counts a file some hook's
        listing lacks (written between the two); the listing kept is then one made after the records.
        """
        if not is_s3(prefix.store.uri):
            progress = self._progress(si, prefix)
            per_hook, empty, odd = zip(*(self._list(prefix, f) for f in prefix.folders), strict=True)
            return per_hook, empty, odd, progress
        with _records_pool([prefix.store], len(prefix.folders)) as pool:
            early = [pool.submit(self._list, prefix, f) for f in prefix.folders]
            progress = self._progress(si, prefix)
            per_hook, empty, odd = zip(*(f.result() for f in early), strict=True)
            counted = _counted(progress)
            if any(n not in p and n not in e for p, e in zip(per_hook, empty, strict=True) for n in counted):
                again = [pool.submit(self._list, prefix, f) for f in prefix.folders]
                per_hook, empty, odd = zip(*(f.result() for f in again), strict=True)
        return per_hook, empty, odd, progress

    def _list(self, prefix: Prefix, folder: str) -> tuple[dict[str, int], dict[str, str], list[tuple[str, str]]]:
        """One hook folder: megabatch name -> size, empty megabatch name -> url (foreign unless a
        progress record counts it: `sync`), and (url, why) of every other object (foreign)."""
        entries: list[Entry] = prefix.store.list_dir(folder)[1]
        files, empty, odd = {}, {}, []
        for e in entries:
            name = e.key.rsplit("/", 1)[-1]
            if name in RECORDS:
                continue
            ok_key = e.kind == "file" and ".." not in e.key.split("/")
            if fmt.is_megabatch(name) and ok_key:
                if e.size > 0:
                    files[name] = e.size
                else:
                    empty[name] = prefix.store.url(e.key)
            else:
                why = "empty" if e.size == 0 else "not a megabatch"
                if e.kind != "file":
                    why = {"badkey": "a key with an empty, . or .. segment"}.get(e.kind, f"a {e.kind}")
                odd.append((prefix.store.url(e.key), why))
        return files, empty, odd

    def _foreign(self, odd: list[tuple[str, str]]) -> None:
        """Skip objects that are not megabatch files: each named once in `foreign` and a warning."""
        odd = [(url, why) for url, why in odd if url not in self.foreign]
        if not odd:
            return
        self.foreign.update(odd)
        lines = [f"{url} ({why})" for url, why in odd]
        warnings.warn(
            f"skipping {len(odd)} object(s) that are not megabatch files: {', '.join(lines[:3])}"
            + (", ..." if len(odd) > 3 else ""),
            stacklevel=4,
        )

    def _partial(
        self,
        si: int,
        prefix: Prefix,
        per_hook: Sequence[dict[str, int]],
        lost: list[set[str]],
        names: set[str],
        progress: Progress,
    ) -> None:
        """Files some hooks lack, or hold empty (that other hooks or the progress records have):
        being written (wait), else an error, or skipped and counted. One hook is checked against
        the records."""
        missing: dict[str, list[str]] = {}
        lines = []
        for name in sorted(names):
            if (si, name) in self._seen or _in_flight(name, progress):
                continue
            self._seen.add((si, name))  # decided once: skipped, or the error below
            where = list(zip(prefix.hooks, per_hook, lost, strict=True))
            missing[name] = [h for h, p, _ in where if name not in p]
            gone, empty = (
                [h for h, p, e in where if name not in p and name not in e],
                [h for h, _, e in where if name in e],
            )
            said = [f"lacks {', '.join(gone)}"] if gone else []
            said += [f"is empty (0 bytes) in {', '.join(empty)}"] if empty else []
            lines.append(f"{name} {' and '.join(said)}")
        if not missing:
            return
        shown = "; ".join(lines[:3]) + (f" (and {len(lines) - 3} more)" if len(lines) > 3 else "")
        if not self.skip_bad_files:
            raise FormatError(
                f"{len(missing)} file(s) under {prefix.store.uri} are not in every hook (other hooks or "
                f"the progress records have them): {shown}. "
                "Their tokens would be missing from the other hooks: restore them (`activault verify` on the run "
                "names the repair), or pass skip_bad_files=True to skip them"
            )
        for name, lacking in missing.items():
            self.incomplete[prefix.store.url(name)] = lacking
        warnings.warn(f"skipping {len(missing)} file(s) not in every hook: {shown}", stacklevel=4)

    def _progress(self, si: int, prefix: Prefix) -> Progress:
        """Machine -> its progress record (None: damaged, so it tells nothing, with a warning), when
        the source has records: a run folder (`hooks` given) or a hook folder of a run."""
        store = prefix.records
        if store is None:
            return {}
        entries = store.list_dir(records.progress_key("", 0).rpartition("/")[0])[1]
        machines = [m for e in entries if (m := records.parse_progress_name(e.key)) is not None]
        asked = self._plan_reads.pop(si, None)  # read beside the metadata (object storage)
        if machines and si not in self._plans:
            try:
                self._plans[si] = asked.result() if asked is not None else records.read_run(store, "", original_ok=True)
            except FormatError:
                self._plans[si] = None  # checked against nothing, as the records of a run without one
        plan = self._plans.get(si)

        def read(machine: int) -> records.ProgressCount | FormatError | None:
            try:
                return records.read_progress_count(store, "", machine, plan=plan)
            except FormatError as e:
                return e

        with _records_pool([store], len(machines)) as pool:
            found = dict(zip(machines, pool.map(read, machines), strict=True))
        for m, rec in found.items():
            if isinstance(rec, FormatError) and (url := store.url(records.progress_key("", m))) not in self._damaged:
                self._damaged.add(url)
                warnings.warn(f"reading without a damaged progress record: {rec}", stacklevel=4)
        return {m: None if isinstance(rec, FormatError) else rec for m, rec in found.items()}

    def tensor_bytes(self, si: int, h: int) -> int | None:
        """The tensor bytes of a full file of source `si`, hook `h` (None without metadata): from
        the metadata's validated shape and dtype (states, then int32 ids and positions), not its
        `bytes_per_file`, which nothing checks against them; plus int64 documents and float32 norms,
        whether it lists them or not: a run resumed by a newer activault holds files of both formats,
        and a bound 12 bytes a token above older files costs less than a second request per file)."""
        meta = self._metadata[(si, h)]
        if meta is None:
            return None
        itemsize = dtypes.to_torch(meta.dtype).itemsize
        per_token = meta.d_model * itemsize + 8 + 8 + 4
        return meta.rows_per_file * meta.seq_length * per_token

    def mismatch(self, h: int, url: str, shape: StatesShape, expected: StatesShape) -> str:
        """Why a file of hook `h` whose states are `shape` is refused (the hook's are `expected`)."""
        for si, p in enumerate(self.prefixes):
            meta = self._metadata[(si, h)]
            if meta is not None and meta.original is not None and _meta_shape(meta) == expected:
                # The original's metadata.json says what one uploader last saw: it may be what is wrong.
                return (
                    f"{url}: states are {shape}, {p.url(h, 'metadata.json')} says {expected}: one of them is "
                    f"wrong; if it is metadata.json, {orig.METADATA_FIX}"
                )
        return f"{url}: states are {shape}, the other files {expected}: it does not belong here"

    def _shape(self, si: int, h: int) -> StatesShape | None:
        """From metadata.json, else the first file's header; None for legacy `.pt` only."""
        prefix = self.prefixes[si]
        meta = self._metadata[(si, h)]
        if meta is not None:
            return _meta_shape(meta)
        first = next(
            (f for b in self.blocks for f in b if f.source == si and f.name.endswith(fmt.SUFFIX)),
            None,
        )
        if first is None:
            return None  # legacy .pt only: the first decoded file sets the shape
        key = prefix.key(h, first.name)
        header = fmt.fetch_header(prefix.store, key)  # validated: states [rows, seq, d], compressed too
        return StatesShape(header.seq_len, header.d_model, header.dtype)

    def _check_compatible(self) -> list[StatesShape | None]:
        shapes: list[StatesShape | None] = []
        for h in range(len(self.prefixes[0].folders)):
            found = [(p.store.url(p.folders[h]), self._shape(si, h)) for si, p in enumerate(self.prefixes)]
            known = [(u, s) for u, s in found if s is not None]
            if len({s for _, s in known}) > 1:
                lines = "; ".join(
                    f"{u}: seq_len={s.seq_len}, d_model={s.d_model}, dtype={dtypes.name(s.dtype)}" for u, s in known
                )
                raise ConfigError(f"cannot read these prefixes together, their activations differ: {lines}")
            shapes.append(known[0][1] if known else None)
        return shapes


def _counted(progress: Progress) -> set[str]:
    """The file names the progress records count as written."""
    return {records.file_name(m, k) for m, rec in progress.items() if rec for k in range(rec.files_done)}


def _in_flight(name: str, progress: Progress) -> bool:
    """Whether its machine is still writing the file (its progress record does not count it)."""
    parsed = records.parse_file_name(name)
    if parsed is None:
        return False
    rec = progress.get(parsed[0])
    return rec is not None and not rec.finished and rec.files_done <= parsed[1]


def _meta_shape(meta: records.HookMetadata) -> StatesShape:
    return StatesShape(meta.seq_length, meta.d_model, dtypes.to_torch(meta.dtype))
