"""The streaming layer under RCache and TokenLoader: lifecycle, buffers, order."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from activault.errors import ConfigError
from activault.reading import buffers, fetch
from activault.reading.options import ReadOptions
from activault.reading.stream import FileStream
from activault.storage import LocalStore
from support.synth import SynthRun, write_synthetic_run


def test_order_per_epoch_and_rank(run: SynthRun, tmp_path: Path) -> None:
    def order(epoch: int, **kw: int) -> list[str]:
        options = ReadOptions(preserve_file_order=False, seed=4, **kw)
        return [f.name for f in FileStream(tmp_path / "run/h1", options).order(epoch)]

    assert sorted(order(0)) == run.names and order(0) != order(1) and order(0) == order(0)
    shards = [order(2, rank=r, world_size=4) for r in range(4)]
    assert sorted(sum(shards, [])) == run.names
    assert [f.name for f in FileStream(tmp_path / "run/h1").order(5)] == run.names


@pytest.mark.parametrize("reader", ["rcache", "tokens"])
def test_a_dropped_readers_buffers_serve_the_next_reader_without_waiting_for_gc(
    run: SynthRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    from activault import RCache, TokenLoader

    gc.collect()
    monkeypatch.setattr(buffers, "_spare", [])
    opts = ReadOptions(store_options={"map_reads": False})  # read into the stream's buffers
    make = {
        "rcache": lambda: RCache(str(tmp_path / "run"), hooks=["h1", "h2"], options=opts),
        "tokens": lambda: TokenLoader(str(tmp_path / "run"), hooks=["h1", "h2"], batch_tokens=8, options=opts),
    }[reader]
    first = make()
    assert sum(1 for _ in first) > 0
    gc.disable()
    try:
        del first
        # Was 0 until the cyclic collector ran: reader -> stream -> the reader's bound method.
        assert buffers.spare_bytes() > 0
    finally:
        gc.enable()
    assert sum(1 for _ in make()) > 0  # the next reader reads, from those buffers
    reader = make()
    files = reader.files.prefetch(0)
    del reader
    with files:
        assert sum(1 for _ in files) > 0  # a Prefetch holds its reader while it reads
    with pytest.raises(ConfigError, match="reader of these files was dropped: keep a reference"):
        make().files.prefetch(0)  # the reader is gone before its files are asked for


def test_a_local_first_file_read_by_copy_is_read_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3)
    events: list[tuple[str, str]] = []
    read = fetch.ObjectReader.read

    def logged(self: fetch.ObjectReader, start: int, out: memoryview, obj: Any = None) -> None:
        name = self.key.rsplit("/", 1)[-1]
        events.append(("start", name))
        if name == run.names[0]:
            time.sleep(0.2)  # a slow first read: a second file read beside it would start meanwhile
        read(self, start, out, obj)
        events.append(("end", name))

    monkeypatch.setattr(fetch.ObjectReader, "read", logged)
    stream = FileStream(LocalStore(tmp_path / "r/h", fsync=False, map_reads=False), ReadOptions(buffer_size=3))
    with stream.prefetch(0, eager=True) as files:
        got = [item.states[0].clone() for _, item in files]
    assert torch.equal(torch.cat(got), run.tensor("h"))
    # One pread per local file, and the first alone: a second pread would take half the cores.
    assert events[:2] == [("start", run.names[0]), ("end", run.names[0])], events
    assert len(events) == 6, events
