"""The codec's process-wide pool: one thread per core, shared by default, nested work inline,
errors returned only once no chunk is left running, a forked child's own pool."""

from __future__ import annotations

import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from activault.errors import FormatError
from activault.vault import codec as codecs
from activault.vault import codec_pool


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def packed_bf16(tokens: int = 64, d: int = 32, chunk_bytes: int = 256) -> tuple[torch.Tensor, codecs.Packed, bytes]:
    """A bf16 tensor compressed into many chunks (`chunk_bytes` of raw states each)."""
    x = torch.randn((tokens, d), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, frames = codecs.pack(x, codecs.Codec("zstd", chunk_bytes=chunk_bytes))
    return x, packed, b"".join(frames)


class CountingPool(ThreadPoolExecutor):
    """An executor that keeps every future it hands out."""

    def __init__(self, workers: int = 2) -> None:
        super().__init__(workers)
        self.futures: list[Future] = []

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        f = super().submit(fn, *args, **kwargs)
        self.futures.append(f)
        return f


def test_chunks_decode_on_the_process_wide_pool_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = codec_pool.decode_pool()
    assert codec_pool.decode_pool() is pool and pool._max_workers == codec_pool.cores()  # one pool, a thread per core
    x, packed, blob = packed_bf16()
    spy = CountingPool()
    monkeypatch.setattr(codec_pool, "decode_pool", lambda: spy)
    assert torch.equal(bits(codecs.unpack(blob, packed, "t")), bits(x))
    assert len(spy.futures) == len(packed.chunks) > 1
    with CountingPool() as given:  # or on the caller's executor
        assert torch.equal(bits(codecs.unpack(blob, packed, "t", threads=given)), bits(x))
    assert len(given.futures) == len(packed.chunks) and len(spy.futures) == len(packed.chunks)
    spy.shutdown()


def test_decodes_submitted_to_the_pool_run_their_chunks_inline_instead_of_waiting_on_it() -> None:
    x, packed, blob = packed_bf16()
    pool = codec_pool.decode_pool()
    jobs = [pool.submit(codecs.unpack, blob, packed, "t") for _ in range(4 * codec_pool.cores())]
    # A chunk queued behind the jobs waiting for it would never run: this would time out.
    assert all(torch.equal(bits(j.result(timeout=120)), bits(x)) for j in jobs)


def test_an_error_returns_only_once_no_chunk_is_left_running() -> None:
    """The caller reuses its buffer after an error: no chunk may still be writing into it."""
    x, packed, blob = packed_bf16(tokens=256)
    bad = bytearray(blob)
    bad[packed.chunks[0] // 2] ^= 0x5A  # chunk 0: the first to fail, with many still queued
    with CountingPool(workers=2) as pool:
        with pytest.raises(FormatError, match=r"'t': chunk 0 \(bytes 0\.\.\d+\) is corrupted"):
            codecs.unpack(bytes(bad), packed, "'t'", threads=pool)
        assert len(pool.futures) == len(packed.chunks) and all(f.done() for f in pool.futures)


def test_a_forked_child_decodes_on_a_pool_of_its_own() -> None:
    """The parent's pool threads do not exist in a fork: a child reusing its pool would wait forever."""
    x, packed, blob = packed_bf16()
    codecs.unpack(blob, packed, "t")  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it decoded exactly, killed after 60 s if it hangs
        signal.alarm(60)
        try:
            ok = torch.equal(bits(codecs.unpack(blob, packed, "t")), bits(x))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
