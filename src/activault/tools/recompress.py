"""`activault recompress`: store an existing run's files with another codec, in place, file by file.

Each file is read and decoded, encoded with the new codec, decoded again from the new bytes and
checked against the original (bit for bit; for fp8, ids and positions bit for bit and every
finite token within fp8's error bound), and only then written over the original in one atomic
put (the run writer's `replace_file`). A file already stored as asked is skipped (one header
read), so an interrupted conversion resumes where it stopped, and a reader sees either the old
file or the new one, both valid. When every file of a hook is converted, its metadata.json records
the codec (`record_compression`).

Every hook folder is checked before any file is converted: each megabatch's header is read, objects
that are not megabatches are skipped and counted as the readers skip them (reading/listing.py), and
a file a progress record counts that is missing, empty or not a regular file is an error naming it.
A file is rewritten in the run writer's tensor order, so `--compression none` of a compressed
raw-collected file gives back the very bytes collect wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from activault.errors import ConfigError, FormatError
from activault.storage import Entry, Store, locate
from activault.storage.base import join
from activault.storage.lock import hold_task
from activault.tools.inspection import list_dir
from activault.units import human_bytes
from activault.vault import codec as codecs
from activault.vault.megabatch import (
    CHECKSUM_KEY,
    CODECS_KEY,
    LEGACY_SUFFIX,
    REQUIRED,
    SUFFIX,
    Megabatch,
    decode,
    encode,
    fetch_header,
    is_megabatch,
    padding_zeroed,
    relabelled,
)
from activault.vault.norms import NORMS
from activault.vault.records import (
    ProgressRecord,
    RunRecord,
    file_name,
    metadata_key,
    read_progress,
    read_run,
    redo_machine,
    statistics_key,
)
from activault.vault.writer import record_compression, replace_file


@dataclass
class Summary:
    """What a conversion did."""

    files: int = 0
    converted: int = 0
    skipped: int = 0  # already stored as asked
    bytes_before: int = 0
    bytes_after: int = 0
    foreign: dict[str, str] = field(default_factory=dict)  # url -> why it is not a megabatch (skipped)
    leftovers: int = 0  # temp files of killed writes removed


def _is_stored_as(store: Store, key: str, size: int, codec: codecs.Codec | None, d_model: int | None) -> bool:
    """Whether a file is already stored as asked; FormatError if its header contradicts cfg.json's `d_model`."""
    header = fetch_header(store, key, size)
    if d_model is not None and header.d_model != d_model:
        raise FormatError(
            f"{header.url}: its header says d = {header.d_model}, cfg.json's hook_dims {d_model}: the file's "
            "header is damaged or edited; file left as it was (restore it or collect it again)"
        )
    packed = header.packed
    if codec is None:
        return not packed
    return "states" in packed and packed["states"].matches(codec)


def _check(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], codec: codecs.Codec | None, url: str) -> None:
    """The converted file holds the same data (fp8: within its bound); else FormatError, nothing written.
    Norms are left out: encode computes them again from what the new file stores."""
    old, new = ({k: t for k, t in ts.items() if k != NORMS} for ts in (old, new))
    if old.keys() != new.keys():
        raise FormatError(
            f"{url}: conversion changed the tensors ({sorted(old)} -> {sorted(new)}); file left as it was"
        )
    for k, t in old.items():
        n = new[k]
        if n.dtype != t.dtype or n.shape != t.shape:
            raise FormatError(f"{url}: conversion changed {k!r} to {list(n.shape)} {n.dtype}; file left as it was")
        if codec is not None and not codec.lossless and k == "states":
            if not torch.equal(t.isfinite(), n.isfinite()):  # NaN and Inf stay non-finite, the rest finite
                raise FormatError(f"{url}: fp8 changed which values are finite; file left as it was")
            finite = t.reshape(-1, t.shape[-1]).isfinite().all(1) if t.numel() else torch.ones(0, dtype=torch.bool)
            worst = codecs.token_errors(t, n)[finite].max().item() if bool(finite.any()) else 0.0
            if worst > codecs.FP8_MAX_TOKEN_ERROR:
                raise FormatError(
                    f"{url}: fp8 relative error {worst:.4f} on a token exceeds "
                    f"{codecs.FP8_MAX_TOKEN_ERROR}; file left as it was"
                )
        elif not torch.equal(t.reshape(-1).view(torch.uint8), n.reshape(-1).view(torch.uint8)):
            raise FormatError(f"{url}: {k!r} does not decode bit for bit after conversion; file left as it was")


def convert_file(store: Store, key: str, codec: codecs.Codec | None) -> tuple[int, int]:
    """Convert one megabatch in place, verified before it is replaced; (bytes before, bytes after)."""
    url = store.url(key)
    buf = store.get(key)
    old = decode(buf, url, verify_checksums=True)  # never convert a file that is already damaged
    # Rewritten by this version's rules (checksums, codec description), so labelled with its version.
    tensors, meta = _writer_order(old.tensors), relabelled(_described(old.metadata))
    if "states" in tensors and "positions" in tensors:  # what encode stores: checked against that
        tensors["states"] = padding_zeroed(tensors["states"], tensors["positions"])
    parts = encode({k: t.contiguous() for k, t in tensors.items()}, meta, compression=codec)
    data = b"".join(parts)  # the exact bytes written, decoded once more to check them

    def same(new: Megabatch) -> None:
        if _described(new.metadata) != meta:
            raise FormatError(f"{url}: conversion changed the header metadata; file left as it was")
        _check(tensors, new.tensors, codec, url)

    replace_file(store, key, data, same)
    return buf.nbytes, len(data)


def _writer_order(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors in the order the run writer hands them to `encode` (states, input_ids, positions):
    encode lays out equally wide tensors in that order, and a compressed file lists them otherwise."""
    rank = {n: i for i, n in enumerate(REQUIRED)}
    return {n: tensors[n] for n in sorted(tensors, key=lambda n: rank.get(n, len(rank)))}


def _described(meta: dict[str, str]) -> dict[str, str]:
    """What a file's header says of it, without how it is stored (codec and checksums are rewritten)."""
    return {k: v for k, v in meta.items() if k not in (CODECS_KEY, "checksum") and not k.startswith(CHECKSUM_KEY)}


def _progress(store: Store, run: str, num_runs: int | None) -> dict[int, ProgressRecord | None]:
    """Machine -> its progress record (None: not written yet); {} for a run without cfg.json."""
    return {m: read_progress(store, run, m) for m in range(num_runs or 0)}


# Records kept beside the megabatches in a hook folder (as reading/listing.py's RECORDS).
_RECORDS = (metadata_key(""), statistics_key(""))


@dataclass
class _Planned:
    """One megabatch to convert, or skip when already stored as asked; found by the check."""

    hook: str
    name: str
    size: int
    stored_as: bool


def _hook_files(store: Store, folder: str, summary: Summary) -> dict[str, Entry]:
    """A hook folder's entries by name; objects that are not megabatches (other names, empty
    objects, links, FIFOs, bad keys) skipped and named in `summary.foreign`, as the readers do."""
    entries: dict[str, Entry] = {}
    for e in list_dir(store, folder)[1]:
        name = e.key.rsplit("/", 1)[-1]
        entries[name] = e
        if name in _RECORDS or name.endswith(LEGACY_SUFFIX):
            continue  # records, and legacy .pt files (read, never converted)
        if not (is_megabatch(name) and e.kind == "file" and e.size > 0 and ".." not in e.key.split("/")):
            why = "empty" if e.kind == "file" and e.size == 0 else "not a megabatch"
            if e.kind != "file":
                why = "a key with an empty, . or .. segment" if e.kind == "badkey" else f"a {e.kind}"
            summary.foreign[store.url(e.key)] = why
    return entries


def _holes(
    store: Store, run: str, hook: str, entries: dict[str, Entry], progress: dict[int, ProgressRecord | None]
) -> None:
    """A file a progress record counts must be a megabatch here: missing, empty or not a regular
    file, it is a hole in the run (readers would stop there), named before anything is converted."""
    for m, rec in progress.items():
        for k in range(rec.files_done if rec else 0):
            name = file_name(m, k)
            e = entries.get(name)
            if e is None or e.kind != "file" or e.size == 0:
                what = "missing" if e is None else "empty" if e.kind == "file" else f"a {e.kind}, not a file"
                raise FormatError(
                    f"{store.url(join(run, hook, name))} is {what}, yet machine {m}'s progress record counts "
                    f"it: a hole in the run; nothing converted. Restore the file from a copy, or "
                    f"{redo_machine(store.url(run), m)}"
                )


def _check_run(
    store: Store,
    run: str,
    hooks: list[str],
    codec: codecs.Codec | None,
    hook_dims: dict[str, int],
    progress: dict[int, ProgressRecord | None],
    threads: int,
    summary: Summary,
) -> list[_Planned]:
    """Every hook folder checked (foreign objects counted, holes refused, every header read and
    validated) before any file is converted; what to convert or skip, in order."""
    todo: list[tuple[str, str, int]] = []
    for h in hooks:
        entries = _hook_files(store, join(run, h), summary)
        _holes(store, run, h, entries, progress)
        files = [(n, e.size) for n, e in entries.items() if store.url(e.key) not in summary.foreign]
        todo += [(h, n, size) for n, size in sorted(files) if n.endswith(SUFFIX)]

    def header(item: tuple[str, str, int]) -> _Planned:
        h, name, size = item
        return _Planned(h, name, size, _is_stored_as(store, join(run, h, name), size, codec, hook_dims.get(h)))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(header, todo))


def _clear_leftovers(store: Store, run: str, hooks: list[str], progress: dict[int, ProgressRecord | None]) -> int:
    """Remove the temp files of writes killed mid-way (local store: `.{file}.{random}.tmp`) in the
    hook folders, only of machines whose collection has finished (or of a run without progress
    records): no collector writes there any more, so such a file is a dead writer's."""
    finished = [m for m, rec in progress.items() if rec and rec.finished] if progress else None
    prefixes = ["m"] if finished is None else [file_name(m, 0).rpartition("-")[0] + "-" for m in finished]
    return sum(store.clear_partial(join(run, h), p) for h in hooks for p in prefixes)


def recompress_run(
    store: Store,
    run: str,
    codec: codecs.Codec | None,
    *,
    threads: int = 2,
    force: bool = False,
    on_file: Callable[[str, str], None] | None = None,
) -> Summary:
    """Store every megabatch of `run` with `codec` (None: raw); resumable, each file verified first.

    Args:
        force: convert even while machines have not finished (their newest files may be rewritten
            raw by a resumed collection; running this again converts them).
        on_file: told (file, "converted" or "skipped") after each file.
    """
    cfg = read_run(store, run)
    dirs, _ = list_dir(store, run)
    hooks = list(cfg.hooks) if cfg else [d for d in dirs if store.exists(metadata_key(join(run, d)))]
    if not hooks:
        raise ConfigError(f"{store.url(run)} holds no run (no cfg.json, no hook folder with a metadata.json)")
    with hold_task(store, run, "recompress", "being recompressed"):
        return _recompress(store, run, cfg, hooks, codec, threads, force, on_file)


def _recompress(
    store: Store,
    run: str,
    cfg: RunRecord | None,
    hooks: list[str],
    codec: codecs.Codec | None,
    threads: int,
    force: bool,
    on_file: Callable[[str, str], None] | None,
) -> Summary:
    progress = _progress(store, run, cfg.num_runs if cfg else None)
    if (waiting := [m for m, rec in progress.items() if not (rec and rec.finished)]) and not force:
        raise ConfigError(
            f"machines {waiting} of {store.url(run)} have not finished collecting; recompress once "
            "collection has ended (or pass --force)"
        )
    summary = Summary()
    plan = _check_run(store, run, hooks, codec, dict(cfg.hook_dims) if cfg else {}, progress, threads, summary)
    summary.leftovers = _clear_leftovers(store, run, hooks, progress)

    def one(p: _Planned) -> tuple[_Planned, int, int]:
        if p.stored_as:
            return p, p.size, p.size
        return p, *convert_file(store, join(run, p.hook, p.name), codec)

    for h in hooks:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for p, before, after in pool.map(one, [p for p in plan if p.hook == h]):
                summary.files += 1
                summary.converted += not p.stored_as
                summary.skipped += p.stored_as
                summary.bytes_before += before
                summary.bytes_after += after
                if on_file is not None:
                    on_file(f"{h}/{p.name}", "skipped" if p.stored_as else "converted")
        record_compression(store, join(run, h), codec)
    return summary


def run_recompress(
    uri: str,
    compression: str,
    level: int | None = None,
    chunk_kib: int | None = None,
    threads: int = 2,
    force: bool = False,
) -> int:
    """`activault recompress RUN_URI --compression ...`: convert and print what changed."""
    store, run = locate(uri)
    chunk = codecs.CHUNK_BYTES if chunk_kib is None else chunk_kib << 10
    codec = codecs.from_config(compression, codecs.LEVEL if level is None else level, chunk)  # type: ignore[arg-type]
    s = recompress_run(
        store, run, codec, threads=threads, force=force, on_file=lambda f, what: print(f"  {what:9s} {f}", flush=True)
    )
    for url, why in s.foreign.items():
        print(f"  {'foreign':9s} {url} ({why}: not read)", flush=True)
    if s.leftovers:
        print(f"  removed {s.leftovers} unfinished temp file(s) of an earlier, killed attempt", flush=True)
    ratio = s.bytes_after / max(s.bytes_before, 1)
    print(
        f"{store.url(run)}: {s.converted} file(s) converted, {s.skipped} already {compression}, "
        f"{len(s.foreign)} other object(s) skipped; "
        f"{human_bytes(s.bytes_before)} -> {human_bytes(s.bytes_after)} ({ratio:.3f})"
    )
    return 0
