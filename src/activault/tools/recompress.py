"""`activault recompress`: store an existing run's files with another codec, in place, file by file.

Each file is read and decoded, encoded with the new codec, decoded again from the new bytes and
checked against the original (bit for bit; for fp8, ids and positions bit for bit and every
finite token within fp8's error bound), and only then written over the original in one atomic
put (the run writer's `replace_file`). A file already stored as asked is skipped (one header
read), so an interrupted conversion resumes where it stopped, and a reader sees either the old
file or the new one, both valid. When every file of a hook is converted, its metadata.json records
the codec (`record_compression`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from activault.errors import ConfigError, FormatError
from activault.storage import Store, locate
from activault.storage.base import join
from activault.tools.inspection import list_dir
from activault.units import human_bytes
from activault.vault import codec as codecs
from activault.vault.megabatch import (
    CHECKSUM_KEY,
    CODECS_KEY,
    SUFFIX,
    Megabatch,
    decode,
    encode,
    fetch_header,
    megabatch_files,
    relabelled,
)
from activault.vault.records import metadata_key, read_progress, read_run
from activault.vault.writer import record_compression, replace_file


@dataclass
class Summary:
    """What a conversion did."""

    files: int = 0
    converted: int = 0
    skipped: int = 0  # already stored as asked
    bytes_before: int = 0
    bytes_after: int = 0


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
    """The converted file holds the same data (fp8: within its bound); else FormatError, nothing written."""
    if old.keys() != new.keys():
        raise FormatError(
            f"{url}: conversion changed the tensors ({sorted(old)} -> {sorted(new)}); file left as it was"
        )
    for k, t in old.items():
        n = new[k]
        if n.dtype != t.dtype or n.shape != t.shape:
            raise FormatError(f"{url}: conversion changed {k!r} to {list(n.shape)} {n.dtype}; file left as it was")
        if codec is not None and not codec.lossless and k == "states":
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
    tensors, meta = old.tensors, relabelled(_described(old.metadata))
    parts = encode({k: t.contiguous() for k, t in tensors.items()}, meta, compression=codec)
    data = b"".join(parts)  # the exact bytes written, decoded once more to check them

    def same(new: Megabatch) -> None:
        if _described(new.metadata) != meta:
            raise FormatError(f"{url}: conversion changed the header metadata; file left as it was")
        _check(tensors, new.tensors, codec, url)

    replace_file(store, key, data, same)
    return buf.nbytes, len(data)


def _described(meta: dict[str, str]) -> dict[str, str]:
    """What a file's header says of it, without how it is stored (codec and checksums are rewritten)."""
    return {k: v for k, v in meta.items() if k not in (CODECS_KEY, "checksum") and not k.startswith(CHECKSUM_KEY)}


def _unfinished(store: Store, run: str, num_runs: int | None) -> list[int]:
    if num_runs is None:
        return []
    return [m for m in range(num_runs) if not ((rec := read_progress(store, run, m)) and rec.finished)]


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
    if (waiting := _unfinished(store, run, cfg.num_runs if cfg else None)) and not force:
        raise ConfigError(
            f"machines {waiting} of {store.url(run)} have not finished collecting; recompress once "
            "collection has ended (or pass --force)"
        )
    summary = Summary()
    for h in hooks:
        files = {n: s for n, s in megabatch_files(list_dir(store, join(run, h))[1]).items() if n.endswith(SUFFIX)}

        def one(item: tuple[str, int], h: str = h) -> tuple[str, int, int, bool]:
            name, size = item
            key = join(run, h, name)
            if _is_stored_as(store, key, size, codec, cfg.hook_dims.get(h) if cfg else None):
                return name, size, size, False
            before, after = convert_file(store, key, codec)
            return name, before, after, True

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for name, before, after, converted in pool.map(one, sorted(files.items())):
                summary.files += 1
                summary.converted += converted
                summary.skipped += not converted
                summary.bytes_before += before
                summary.bytes_after += after
                if on_file is not None:
                    on_file(f"{h}/{name}", "converted" if converted else "skipped")
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
    ratio = s.bytes_after / max(s.bytes_before, 1)
    print(
        f"{store.url(run)}: {s.converted} file(s) converted, {s.skipped} already {compression}; "
        f"{human_bytes(s.bytes_before)} -> {human_bytes(s.bytes_after)} ({ratio:.3f})"
    )
    return 0
