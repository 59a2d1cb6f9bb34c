"""Which megabatch files a reader reads: each source's files (in every hook) and their shape."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from activault import dtypes
from activault.errors import ConfigError, FormatError, NotFoundError
from activault.reading.options import ReadOptions
from activault.storage import Entry, Store, open_stores
from activault.vault import megabatch as fmt
from activault.vault import original as orig
from activault.vault import records

# Records kept beside the megabatches in a hook folder.
RECORDS = ("metadata.json", "statistics.json")


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
        self.prefixes = [Prefix(s, folders) for s in open_stores(uris, options.store_options or {})]
        self.blocks: list[list[FileRef]] = []
        self.incomplete: dict[str, list[str]] = {}  # url of a file -> hooks that lack it (skipped)
        self.foreign: dict[str, str] = {}  # url of an object that is not a megabatch -> why (skipped)
        self._seen: set[tuple[int, str]] = set()
        # Each hook's metadata.json is read while the folders are listed: one round trip, not two.
        pairs = [(si, h) for si, p in enumerate(self.prefixes) for h in range(len(p.folders))]
        with ThreadPoolExecutor(min(len(pairs), 16), thread_name_prefix="activault-records") as pool:
            asked = {
                (si, h): pool.submit(records.read_metadata, self.prefixes[si].store, self.prefixes[si].folders[h])
                for si, h in pairs
            }
            found = self.sync()
            if not found:
                where = ", ".join(p.store.url(p.folders[0]) for p in self.prefixes)
                raise NotFoundError(
                    f"no megabatch files under {where}; the URI should name a hook folder (run/hook), or pass hooks="
                )
            self._metadata = {k: f.result() for k, f in asked.items()}  # a damaged record raises here
        self.shapes: list[StatesShape | None] = self._check_compatible()

    def sync(self) -> int:
        """List again; files not seen before are appended as a new block. Returns how many."""
        new: list[FileRef] = []
        for si, prefix in enumerate(self.prefixes):
            per_hook = [self._list(prefix, folder) for folder in prefix.folders]
            listed = set.union(*(set(p) for p in per_hook))
            progress = self._progress(prefix) if listed else {}  # none listed: the NotFoundError says so
            counted = {records.file_name(m, k) for m, rec in progress.items() if rec for k in range(rec.files_done)}
            complete = set.intersection(*(set(p) for p in per_hook))
            self._partial(si, prefix, per_hook, (listed | counted) - complete, progress)
            for name in sorted(complete):
                if (si, name) not in self._seen:
                    self._seen.add((si, name))
                    new.append(FileRef(si, name, tuple(p[name] for p in per_hook)))
        if new:
            self.blocks.append(new)
        return len(new)

    def _list(self, prefix: Prefix, folder: str) -> dict[str, int]:
        """Megabatch name -> size in one hook folder; anything else is reported once as foreign."""
        entries: list[Entry] = prefix.store.list_dir(folder)[1]
        files, odd = {}, []
        for e in entries:
            name = e.key.rsplit("/", 1)[-1]
            if name in RECORDS:
                continue
            ok_key = e.kind == "file" and ".." not in e.key.split("/")
            if fmt.is_megabatch(name) and e.size > 0 and ok_key:
                files[name] = e.size
            elif (url := prefix.store.url(e.key)) not in self.foreign:
                why = "empty" if e.size == 0 else "not a megabatch"
                self.foreign[url] = (
                    why
                    if e.kind == "file"
                    else {"badkey": "a key with an empty, . or .. segment"}.get(e.kind, f"a {e.kind}")
                )
                odd.append(f"{url} ({self.foreign[url]})")
        if odd:
            warnings.warn(
                f"skipping {len(odd)} object(s) that are not megabatch files: {', '.join(odd[:3])}"
                + (", ..." if len(odd) > 3 else ""),
                stacklevel=4,
            )
        return files

    def _partial(
        self,
        si: int,
        prefix: Prefix,
        per_hook: list[dict[str, int]],
        names: set[str],
        progress: dict[int, records.ProgressRecord | None],
    ) -> None:
        """Files some hooks lack (that other hooks or the progress records have): being written
        (wait), else an error, or skipped and counted. One hook is checked against the records."""
        hooks = self.hooks or [""]
        missing = {}
        for name in sorted(names):
            if (si, name) in self._seen or _in_flight(name, progress):
                continue
            self._seen.add((si, name))  # decided once: skipped, or the error below
            missing[name] = [h for h, p in zip(hooks, per_hook, strict=True) if name not in p]
        if not missing:
            return
        lines = "; ".join(f"{n} lacks {', '.join(h)}" for n, h in list(missing.items())[:3])
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        if not self.skip_bad_files:
            raise FormatError(
                f"{len(missing)} file(s) under {prefix.store.uri} are not in every hook (other hooks or "
                f"the progress records have them): {lines}{more}. "
                "Their tokens would be missing from the other hooks: restore them, or pass "
                "skip_bad_files=True to skip them"
            )
        for name, lacking in missing.items():
            self.incomplete[prefix.store.url(name)] = lacking
        warnings.warn(f"skipping {len(missing)} file(s) not in every hook: {lines}{more}", stacklevel=4)

    def _progress(self, prefix: Prefix) -> dict[int, records.ProgressRecord | None]:
        """Machine -> its progress record (None: damaged, so it tells nothing), when the prefix is a
        run folder (`hooks` given): the records sit beside the hook folders."""
        if not self.hooks:
            return {}
        entries = prefix.store.list_dir(records.progress_key("", 0).rpartition("/")[0])[1]
        machines = [m for e in entries if (m := records.parse_progress_name(e.key)) is not None]

        def read(machine: int) -> records.ProgressRecord | None:
            try:
                return records.read_progress(prefix.store, "", machine)
            except FormatError:
                return None

        if len(machines) <= 1:
            return {m: read(m) for m in machines}
        with ThreadPoolExecutor(min(len(machines), 16), thread_name_prefix="activault-records") as pool:
            return dict(zip(machines, pool.map(read, machines), strict=True))

    def tensor_bytes(self, si: int, h: int) -> int | None:
        """The tensor bytes of a full file of source `si`, hook `h` (None without metadata): from
        the metadata's validated shape and dtype (states, then int32 ids and positions), not its
        `bytes_per_file`, which nothing checks against them."""
        meta = self._metadata[(si, h)]
        if meta is None:
            return None
        itemsize = dtypes.to_torch(meta.dtype).itemsize
        return meta.rows_per_file * meta.seq_length * (meta.d_model * itemsize + 8)

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


def _in_flight(name: str, progress: dict[int, records.ProgressRecord | None]) -> bool:
    """Whether its machine is still writing the file (its progress record does not count it)."""
    parsed = records.parse_file_name(name)
    if parsed is None:
        return False
    rec = progress.get(parsed[0])
    return rec is not None and not rec.finished and rec.files_done <= parsed[1]


def _meta_shape(meta: records.HookMetadata) -> StatesShape:
    return StatesShape(meta.seq_length, meta.d_model, dtypes.to_torch(meta.dtype))
