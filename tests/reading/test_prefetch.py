"""Prefetch: read-ahead order, the first file on the consumer's thread, threads stopped at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from activault.errors import FormatError
from activault.reading import fetch
from activault.reading.listing import FileRef
from activault.reading.options import ReadOptions
from activault.reading.prefetch import Prefetch
from activault.reading.stream import FileStream
from activault.reading.workers import Workers
from activault.storage import LocalStore
from activault.tools.recompress import convert_file
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from support.synth import SynthRun, write_synthetic_run


class Numbers:
    """A stream of ten "files" whose load is the file's index doubled; file 3 is bad."""

    buffer_size, skip_bad_files, unreadable = 2, True, 0

    def order(self, epoch: int) -> Sequence[FileRef]:
        return [FileRef(0, f"f{i}", (1,)) for i in range(10)]

    def load(
        self,
        f: FileRef,
        epoch: int,
        seq: int,
        ranges: Workers,
        stop: threading.Event,
        turn: tuple[threading.Event | None, threading.Event] | None = None,
    ) -> int:
        before, queued = turn if turn is not None else (None, threading.Event())
        try:
            if before is not None:
                before.wait(30)
            if seq == 3:
                raise FormatError(f"{f.name}: bad")
            return 2 * seq
        finally:
            queued.set()


def test_prefetch_reads_any_stream_ahead_in_order_and_skips_bad_files() -> None:
    stream = Numbers()
    with pytest.warns(UserWarning, match="skipping a bad file: f3: bad"), Prefetch(stream, 0, 1, eager=True) as files:
        got = list(files)
    assert got == [(i, 2 * i) for i in range(1, 10) if i != 3] and stream.unreadable == 1


ABANDON = """
import sys
from activault import RCache, TokenLoader

def batches(reader):
    for batch in reader:  # a training loop's generator, left at its first batch
        yield batch

uri = sys.argv[1]
kept = [batches(TokenLoader(uri, batch_tokens=8, window=2)),
        batches(TokenLoader(uri, batch_tokens=8, window=2, loop=True)),
        batches(RCache(uri, buffer_size=3))]
for g in kept:
    next(g)
cycle = {"self": None, "it": iter(TokenLoader(uri, batch_tokens=8))}  # freed only by the collector
cycle["self"] = cycle
next(cycle["it"])
"""


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_abandoned_readers_exit_silently(run: SynthRun, tmp_path: Path, how: str) -> None:
    # Generators still holding readers are finalised during interpreter shutdown: nothing may print.
    script = ABANDON + ("raise SystemExit(3)\n" if how == "raise" else "")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "run/h1")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == (3 if how == "raise" else 0)
    assert out.stderr == ""


def test_prefetch_from_an_index_yields_each_file_of_the_order_from_there(run: SynthRun, tmp_path: Path) -> None:
    stream = FileStream(tmp_path / "run/h1", ReadOptions(preserve_file_order=False, seed=3, buffer_size=2))
    with stream.prefetch(1, start=2) as files:
        got = [(index, item.file) for index, item in files]
    assert got == list(enumerate(stream.order(1)))[2:] and len(got) == len(run.names) - 2


@pytest.mark.parametrize("map_reads", [True, False], ids=["mapped", "read"])
def test_a_files_decode_runs_off_the_consumer_while_the_next_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, map_reads: bool
) -> None:
    store = LocalStore(tmp_path, fsync=False, map_reads=map_reads)
    run = write_synthetic_run(store, "r", ["h"], files=3)
    for name in run.names:
        convert_file(store, f"r/h/{name}", codecs.Codec("zstd", chunk_bytes=256))
    opened: dict[str, threading.Event] = {name: threading.Event() for name in run.names}
    decoders: list[str] = []
    overlapped: list[bool] = []
    open_, decode = fetch.ObjectReader.open, fmt.decode

    def opening(self: fetch.ObjectReader, buffers: Any) -> bool:
        opened[self.key.rsplit("/", 1)[-1]].set()
        return open_(self, buffers)

    def decoding(buf: Any, url: str, *args: Any, **kw: Any) -> Any:
        decoders.append(threading.current_thread().name)
        if url.endswith(run.names[0]):  # the first file, read alone: the second is fetched meanwhile
            overlapped.append(opened[run.names[1]].wait(30))
        return decode(buf, url, *args, **kw)

    monkeypatch.setattr(fetch.ObjectReader, "open", opening)
    monkeypatch.setattr(fmt, "decode", decoding)
    stream = FileStream(LocalStore(tmp_path / "r/h", fsync=False, map_reads=map_reads), ReadOptions(buffer_size=2))
    with stream.prefetch(0) as files:
        got = [item.states[0].clone() for _, item in files]
    assert torch.equal(torch.cat(got), run.tensor("h"))  # decoded exactly
    assert overlapped == [True]
    # The first file, which the consumer waits for with nothing else in flight, is read and decoded
    # on its own thread (no hand-off); the next ones off it, while it works on the one before.
    assert decoders[0] == threading.current_thread().name, decoders
    assert len(decoders) == 3 and all(n.startswith("activault-read") for n in decoders[1:]), decoders


@pytest.mark.parametrize("map_reads", [True, False], ids=["mapped", "read"])
def test_the_first_file_is_read_on_the_consumers_thread_and_the_next_requested_at_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, map_reads: bool
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=4)
    loads: list[tuple[str, str, int]] = []  # (file, thread, file threads started by then)
    stream = FileStream(LocalStore(tmp_path / "r/h", fsync=False, map_reads=map_reads), ReadOptions(buffer_size=3))
    load = stream.load

    def loading(f: Any, *args: Any) -> Any:
        loads.append((f.name, threading.current_thread().name, files._files.started))
        return load(f, *args)

    monkeypatch.setattr(stream, "load", loading)
    with stream.prefetch(0, eager=True) as files:
        got = [item.states[0].clone() for _, item in files]
    assert torch.equal(torch.cat(got), run.tensor("h"))
    first, *rest = loads
    # The first file: on the consumer's thread, before any file thread was started.
    assert first == (run.names[0], threading.current_thread().name, 0), loads
    assert [name for name, _, _ in rest] == run.names[1:] and all(t.startswith("activault-read") for _, t, _ in rest)
