"""The streaming layer under RCache and TokenLoader: lifecycle, buffers, order."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from activault.reading import stream
from activault.reading.stream import FileStream
from activault.storage import LocalStore
from support.synth import SynthRun

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


def test_order_per_epoch_and_rank(run: SynthRun, tmp_path: Path) -> None:
    def order(epoch: int, **kw: int) -> list[str]:
        return [f.name for f in FileStream(tmp_path / "run/h1", preserve_file_order=False, seed=4, **kw).order(epoch)]

    assert sorted(order(0)) == run.names and order(0) != order(1) and order(0) == order(0)
    shards = [order(2, rank=r, world_size=4) for r in range(4)]
    assert sorted(sum(shards, [])) == run.names
    assert [f.name for f in FileStream(tmp_path / "run/h1").order(5)] == run.names


class Gated(LocalStore):
    """A local store whose reads of one file wait for a gate, noting what else was read meanwhile."""

    def __init__(self, root: Path):
        super().__init__(root, fsync=False)
        self.gated, self.gate = "", threading.Event()
        self.read: list[str] = []
        self.meanwhile: list[str] = []

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        self.read.append(key)
        if key == self.gated:
            assert self.gate.wait(30)
            self.meanwhile = [k for k in self.read if k != key]
        return super().read_into(key, offset, out)


@pytest.mark.parametrize("alone", [True, False])
def test_the_first_file_is_read_alone_then_the_next_ones_ahead(
    run: SynthRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alone: bool
) -> None:
    monkeypatch.setattr(stream, "FIRST_ALONE", alone)
    store = Gated(tmp_path / "run/h1")
    files = FileStream(store, buffer_size=2)
    order = [f.name for f in files.order(0)]
    store.gated = order[0]

    def release() -> None:  # alone: after a while; together: once the next file was asked for
        for _ in range(300 if not alone else 3):
            if order[1] in store.read:
                break
            time.sleep(0.1)
        store.gate.set()

    with files.prefetch(0) as it:
        threading.Thread(target=release, daemon=True).start()
        assert next(it)[0] == 0
        # Alone: nothing else was asked for while the first file was read. Together: the next was.
        assert store.meanwhile == ([] if alone else [order[1]])
        assert [i for i, _ in it] == list(range(1, len(order)))
    assert sorted(set(store.read)) == sorted(order)
