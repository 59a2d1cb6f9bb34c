"""How a file is read: header before body, and storage faults retried visibly then named."""

from __future__ import annotations

import builtins
import json
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from obstore.exceptions import PreconditionError

from activault import RCache, TokenLoader
from activault.errors import ConfigError, FormatError, StorageError
from activault.reading import fetch, residency
from activault.reading.fetch import ReadBuffers
from activault.reading.stream import FileStream
from activault.storage import Buffer, Entry, LocalStore, Store
from activault.storage import s3 as s3mod
from activault.storage.s3 import S3Store
from activault.tools.recompress import convert_file
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from activault.vault import records
from support.pagecache import cached_pages, evict
from support.s3servers import FaultProxy, free_port
from support.synth import copy_tree, s3_env, write_synthetic_run


class Counting(Store):
    """A store that counts the bytes asked of each key (reads go through `read_into` or `get*`)."""

    def __init__(self, inner: Store):
        self.inner, self.uri = inner, inner.uri
        self.asked: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        self.asked[key] += out.nbytes
        self.requests[key] += 1
        return self.inner.read_into(key, offset, out)

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        self.asked[key] += end - start
        self.requests[key] += 1
        return self.inner.get_range(key, start, end)

    def get(self, key: str) -> memoryview:
        self.asked[key] += self.inner.size(key) or 0
        self.requests[key] += 1
        return self.inner.get(key)

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        self.inner.put(key, data)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def list(self, prefix: str = "") -> list[Entry]:
        return self.inner.list(prefix)

    def list_dir(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[Entry]]:
        return self.inner.list_dir(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def check(self, write: bool = False) -> None:
        self.inner.check(write)

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        return self.inner.swap(key, data, expect)

    def url(self, key: str = "") -> str:
        return self.inner.url(key)


def test_tensors_are_views_of_the_file_buffer(tmp_path: Path) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=1)
    raw = (tmp_path / "r/h" / run.names[0]).read_bytes()
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    header = fmt.parse_header(raw, "f")
    tensors = fmt.decode(buf, "f", header, verify_checksums=True, alloc=ReadBuffers().empty).tensors
    for name, t in tensors.items():
        assert torch.equal(t, run.files["h"][run.names[0]][name])
        assert t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # same allocation


def test_a_compressed_file_is_decoded_into_the_readers_buffers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    run = write_synthetic_run(store, "r", ["h"], files=2)
    for name in run.names:
        convert_file(store, f"r/h/{name}", codecs.Codec("zstd", chunk_bytes=256))
    cache = RCache(tmp_path / "r/h", buffer_size=1)
    taken = []
    empty = cache.files.buffers.empty

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        taken.append((shape, dtype))
        return empty(shape, dtype)

    cache.files.buffers.empty = alloc  # type: ignore[method-assign]
    assert torch.equal(torch.cat(list(cache)), run.tensor("h"))
    want = run.files["h"][run.names[0]]["states"]
    assert taken == [(tuple(want.shape), want.dtype)] * 2


def test_a_file_is_split_over_every_worker_in_whole_pages() -> None:
    size = 64 << 20
    step = fetch.range_step(size)
    assert step % 4096 == 0 and -(-size // step) == fetch.RANGE_WORKERS  # every worker on this file
    assert fetch.range_step(1 << 34) == fetch.RANGE_SIZE  # big files: ranges capped
    assert fetch.range_step(100_000) == fetch.MIN_RANGE  # small files: one request covers them
    assert fetch.range_step(size, 12_345) == 12_345  # the caller's range size wins


@pytest.mark.parametrize("bad", [0, -4096, 2.5, "16MiB"])
def test_a_range_size_that_is_not_a_positive_byte_count_is_refused(tmp_path: Path, bad: Any) -> None:
    write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=1)
    with pytest.raises(ConfigError, match="range_size must be a positive number of bytes"):
        RCache(str(tmp_path / "r/h"), range_size=bad)
    with pytest.raises(ConfigError, match="range_size must be a positive number of bytes"):
        TokenLoader(str(tmp_path / "r/h"), batch_tokens=8, range_size=bad)


def test_a_file_one_request_covers_is_read_whole_by_it(tmp_path: Path) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3)
    hook = tmp_path / "r/h"
    (hook / "m00000-000090.safetensors").write_bytes(struct.pack("<Q", 10**12) + os.urandom(3000))
    counting = Counting(LocalStore(hook, fsync=False))
    with pytest.warns(UserWarning, match="skipping a bad file"):
        cache = RCache(counting, skip_bad_files=True)
        out = list(cache)
    assert torch.equal(torch.cat(out), run.tensor("h")) and cache.bad_files == 1
    for name in [*run.names, "m00000-000090.safetensors"]:  # the junk costs its one request too
        assert (counting.requests[name], counting.asked[name]) == (1, (hook / name).stat().st_size)
    # metadata.json: one request (made while the folder is listed), present or not.
    assert counting.requests["metadata.json"] == 1
    (hook / "metadata.json").unlink()
    counting.requests.clear()
    with pytest.warns(UserWarning, match="skipping a bad file"):
        assert torch.equal(torch.cat(list(RCache(counting, skip_bad_files=True))), run.tensor("h"))
    assert counting.requests["metadata.json"] == 1


class Logging(Counting):
    """Also records each read's (key, offset, length) in order."""

    def __init__(self, inner: Store):
        super().__init__(inner)
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        self.reads.append((key, offset, out.nbytes))
        return super().read_into(key, offset, out)


class Timeline(Counting):
    """A store that logs when each ranged read starts and ends: ("start" | "end", key, offset)."""

    def __init__(self, inner: Store, delay: float = 0.0, meet: int = 0):
        super().__init__(inner)
        self.events: list[tuple[str, str, int]] = []
        self.delay, self._lock = delay, threading.Lock()
        # meet: each read waits (10 s at most) until `meet` reads have started: "read beside each
        # other" then holds however slowly a loaded machine schedules the threads.
        self.meet, self._started = meet, threading.Semaphore(0)

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        with self._lock:
            self.events.append(("start", key, offset))
            starts = sum(e == "start" for e, _, _ in self.events)
        if starts <= self.meet:
            if starts == self.meet:
                for _ in range(self.meet - 1):
                    self._started.release()
            else:
                self._started.acquire(timeout=10)
        time.sleep(self.delay)
        n = super().read_into(key, offset, out)
        with self._lock:
            self.events.append(("end", key, offset))
        return n


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "RANGE_SIZE", 4096)
    monkeypatch.setattr(fetch, "MIN_RANGE", 4096)
    monkeypatch.setattr(fetch, "HEAD_BYTES", 1024)


def test_a_file_of_the_expected_size_is_requested_whole_at_once(tmp_path: Path, small_ranges: None) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=2, d=64)
    logging_ = Logging(LocalStore(tmp_path / "r/h", fsync=False))
    assert torch.equal(torch.cat(list(RCache(logging_))), run.tensor("h")), "same data"
    for name in run.names:
        size = (tmp_path / "r/h" / name).stat().st_size
        assert size > 4096 and logging_.asked[name] == size  # every byte asked once
        mine = sorted((o, n) for k, o, n in logging_.reads if k == name)
        # No separate header read: the ranges of the whole file, the header checked from the first.
        assert mine == [(o, min(4096, size - o)) for o in range(0, size, 4096)]


def test_a_later_file_starts_reading_only_after_an_earlier_files_ranges(
    tmp_path: Path, small_ranges: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "MAX_RANGE_WORKERS", 2)  # two range workers at most
    bytes_ = ReadBuffers.bytes

    def slow(pool: ReadBuffers, nbytes: int) -> torch.Tensor:
        time.sleep(0.05)  # a file's head is slow to request its ranges: the other worker is free meanwhile
        return bytes_(pool, nbytes)

    monkeypatch.setattr(ReadBuffers, "bytes", slow)
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, d=64)
    logged = Timeline(LocalStore(tmp_path / "r/h", fsync=False))
    assert torch.equal(torch.cat(list(RCache(logged, buffer_size=3))), run.tensor("h"))
    starts = [(k, o) for e, k, o in logged.events if e == "start"]
    for before, after in zip(run.names, run.names[1:], strict=False):
        last = max(i for i, (k, _) in enumerate(starts) if k == before)
        assert starts.index((after, 0)) > last, starts


def test_the_first_file_is_read_alone_before_any_other_is_requested(tmp_path: Path, small_ranges: None) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, d=64)
    # Each request lasts a while, so ranges overlap: a free worker could take another file's request.
    logged = Timeline(LocalStore(tmp_path / "r/h", fsync=False), delay=0.002)
    assert torch.equal(torch.cat(list(RCache(logged, buffer_size=3))), run.tensor("h"))
    events, first = logged.events, run.names[0]
    assert sum(k == first for e, k, _ in events if e == "start") > 2  # several ranges, run in parallel
    done = max(i for i, (e, k, _) in enumerate(events) if e == "end" and k == first)
    assert all(k == first for _, k, _ in events[: done + 1]), events  # no other file requested before it is read


def test_a_first_file_of_one_request_is_read_beside_the_next(tmp_path: Path) -> None:
    # One GET per file: reading the first alone would leave the other workers idle for a whole file.
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, d=64)
    logged = Timeline(LocalStore(tmp_path / "r/h", fsync=False, map_reads=False), meet=3)
    assert torch.equal(torch.cat(list(RCache(logged, buffer_size=3, range_size=1 << 30))), run.tensor("h"))
    events = logged.events
    assert [(e, o) for e, _, o in events[:3]] == [("start", 0)] * 3, events  # one request each, all at once
    # Each file once (the order two threads log their starts in is the scheduler's), none ended first.
    assert sorted(k for _, k, _ in events[:3]) == run.names and len(events) == 6, events


def test_without_metadata_a_big_file_costs_its_header_then_one_request_per_range(
    tmp_path: Path, small_ranges: None
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=2, d=64)
    (tmp_path / "r/h/metadata.json").unlink()  # no size to expect: nothing is read before the header
    counting = Counting(LocalStore(tmp_path / "r/h", fsync=False))
    cache = RCache(counting)  # reads the first file's header for the shape metadata.json would give
    counting.asked.clear(), counting.requests.clear()
    assert torch.equal(torch.cat(list(cache)), run.tensor("h"))
    for name in run.names:
        size = (tmp_path / "r/h" / name).stat().st_size
        assert size > 4096 and counting.asked[name] == size  # every byte asked once
        assert counting.requests[name] == 1 + -(-(size - 1024) // 4096)


def test_a_bad_file_of_the_expected_size_is_refused_and_costs_at_most_its_size(
    hook_store: tuple[Store, Store], small_ranges: None
) -> None:
    store, hook = hook_store
    run = write_synthetic_run(store, "r", ["h"], files=3, d=64)
    good = hook.size(run.names[0])
    assert good is not None
    bad = {
        # Within the expected size: garbage, and a valid header for another shape (its bytes there).
        "m00000-000090.safetensors": struct.pack("<Q", 10**12) + os.urandom(good - 8),
        "m00000-000091.safetensors": misfit_header(2, 16, 8) + bytes(2 * 16 * 8 * 2 + 2 * 2 * 16 * 4),
        # Over the expected size by more than HEAD_BYTES: only its header is read.
        "m00000-000092.safetensors": struct.pack("<Q", 10**12) + os.urandom(good + 8192),
    }
    for name, data in bad.items():
        store.put(f"r/h/{name}", data)
    # The bound comes from the metadata's shape and dtype: a bytes_per_file that claims more is not trusted.
    meta = records.read_metadata(store, "r/h")
    assert meta is not None
    records.write_record(store, records.metadata_key("r/h"), meta.model_copy(update={"bytes_per_file": 1 << 40}))
    logging_ = Logging(hook)
    cache = RCache(logging_, buffer_size=1)
    for index, (name, error) in enumerate(zip(bad, ("corrupted", "it does not belong here", "corrupted"), strict=True)):
        logging_.asked.clear()
        cache.set_file_index(3 + index)
        with pytest.raises(FormatError, match=f"{name}: .*{error}"):
            list(cache)
        assert 0 < logging_.asked[name] <= (len(bad[name]) if index < 2 else fetch.HEAD_BYTES)
    with pytest.warns(UserWarning, match="skipping a bad file"):
        skipping = RCache(logging_, skip_bad_files=True)
        assert torch.equal(torch.cat(list(skipping)), run.tensor("h")) and skipping.bad_files == 3
    with pytest.warns(UserWarning, match="skipping a bad file"):
        loader = TokenLoader(logging_, batch_tokens=8, skip_bad_files=True, drop_last=False)
        assert sum(b.shape[0] for b in loader) == int((run.tensor("h", "positions") >= 0).sum())


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def hook_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, Store]:
    """(the store rooted at the run, the same rooted at hook folder `h`), local and on moto."""
    if request.param == "local":
        return LocalStore(tmp_path, fsync=False), LocalStore(tmp_path / "r/h", fsync=False)
    bucket, env = (
        request.getfixturevalue("moto_bucket"),
        s3_env(request.getfixturevalue("moto_url")),
    )
    return S3Store(f"s3://{bucket}", env=env), S3Store(f"s3://{bucket}/r/h", env=env)


def junk(store: Store, hook: Store, name: str, size: int) -> None:
    """A big object under a megabatch name: a header length, then garbage (sparse when local)."""
    head = struct.pack("<Q", 100) + b"\xff" * 100
    if isinstance(hook, LocalStore):
        with open(hook.root / name, "wb") as f:
            f.write(head)
            f.truncate(size)
    else:
        store.put(f"r/h/{name}", head + os.urandom(size - len(head)))


def misfit_header(rows: int, seq: int, d: int) -> bytes:
    """A valid header for `rows` rows of bf16 states, ids and positions (the data not included)."""
    sizes = {
        "states": ("BF16", [rows, seq, d], rows * seq * d * 2),
        "input_ids": ("I32", [rows, seq], rows * seq * 4),
        "positions": ("I32", [rows, seq], rows * seq * 4),
    }
    header, offset = {}, 0
    for name, (code, shape, n) in sizes.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def test_junk_and_misfit_headers_cost_one_small_read(hook_store: tuple[Store, Store]) -> None:
    store, hook = hook_store
    run = write_synthetic_run(store, "r", ["h"], files=2)
    local = isinstance(hook, LocalStore)
    junk(store, hook, "m00000-000090.safetensors", (4 << 30) if local else (16 << 20))
    # A well-formed header whose tensors need 10^5 rows: it does not fit the listed size.
    store.put("r/h/m00000-000091.safetensors", misfit_header(100_000, 16, 8) + bytes(4 << 20))
    counting = Counting(hook)
    cache = RCache(counting, buffer_size=1)
    for index, name, error in (
        (2, "m00000-000090", "corrupted header"),
        (3, "m00000-000091", "truncated file"),
    ):
        counting.asked.clear()
        cache.set_file_index(index)
        with pytest.raises(FormatError, match=f"{name}.safetensors: {error}"):
            list(cache)
        assert 0 < counting.asked[f"{name}.safetensors"] <= fetch.HEAD_BYTES
    with pytest.warns(UserWarning, match="skipping a bad file"):
        skipping = RCache(counting, skip_bad_files=True)
        out = list(skipping)
    assert skipping.bad_files == 2 and torch.equal(torch.cat(out), run.tensor("h"))
    with pytest.warns(UserWarning, match="skipping a bad file"):
        loader = TokenLoader(counting, batch_tokens=8, skip_bad_files=True, drop_last=False)
        assert sum(b.shape[0] for b in loader) == int((run.tensor("h", "positions") >= 0).sum())


def test_damaged_files_are_named_with_the_repair_command_never_deletion(hook_store: tuple[Store, Store]) -> None:
    store, hook = hook_store
    run = write_synthetic_run(store, "r", ["h"], files=3)
    empty, corrupted = run.names[1], run.names[2]
    store.put(f"r/h/{empty}", b"")  # a reader lists it only where a progress record counts it
    store.put(f"r/h/{corrupted}", struct.pack("<Q", 1 << 20) + bytes(64))  # declares more than the file holds
    with pytest.raises(FormatError, match=f"{empty}: empty file") as was_empty:
        fetch.ObjectReader(hook, empty, 0, stop=threading.Event()).open(ReadBuffers())
    with pytest.warns(UserWarning, match=f"{empty} \\(empty\\)"):  # not counted here: skipped, not read
        cache = RCache(hook, buffer_size=1)
    cache.set_file_index(1)
    with pytest.raises(FormatError, match=f"{corrupted}: corrupted header") as was_corrupted:
        list(cache)
    for name, caught in ((empty, was_empty), (corrupted, was_corrupted)):
        text = str(caught.value)
        assert text.endswith(records.file_repair(store.url("r"), name))
        assert records.collect_command(0, repair=True) in text and "delete" not in text


def test_a_damaged_file_of_the_original_activault_is_not_sent_to_collect(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    store.put("r/h/0.pt", b"")
    reader = fetch.ObjectReader(store, "r/h/0.pt", 0, stop=threading.Event())
    fix = "read the other files with skip_bad_files=True"  # nothing here rewrites the original's files
    with pytest.raises(FormatError, match=rf"0\.pt: empty file \(0 bytes\); {fix}$"):
        reader.open(ReadBuffers())


@pytest.fixture
def fast_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3mod, "NOTICE_AFTER_S", 0.3)
    monkeypatch.setattr(s3mod, "NOTICE_EVERY_S", 0.5)


@pytest.mark.s3
def test_unreachable_endpoint_is_retried_visibly_then_named(
    fast_reports: None, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**s3_env(endpoint), "S3_ENDPOINT_URL": endpoint}
    with caplog.at_level(logging.WARNING, logger="activault.storage.s3"):
        # The listing reads the run's progress records first (files they count are listed even if
        # empty), so the first request to fail may be under r/progress, not r/h: either is named.
        failed = f"s3://bkt/r/\\S*: the S3 endpoint {endpoint} failed .*check the endpoint and the network"
        with pytest.raises(StorageError, match=failed):
            RCache("s3://bkt/r/h", store_options={"env": env, "retry_timeout": 2})
    # The listings and metadata.json are asked for at once: any one's retries are reported.
    assert re.search(f"S3 at {endpoint}: (list|download) s3://bkt/r/\\S* failed \\d+ time", caplog.text)


@pytest.mark.s3
def test_repeated_5xx_is_retried_visibly_then_named(
    moto_url: str, moto_bucket: str, fast_reports: None, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = moto_bucket
    write_synthetic_run(S3Store(f"s3://{bucket}", env=s3_env(moto_url)), "r", ["h"], files=2)
    # Listing works; every read of a megabatch is answered 503 SlowDown.
    with FaultProxy(moto_url, rate=1.0, faults=("503",), when=lambda method, path: ".safetensors" in path) as proxy:
        options: dict[str, Any] = {"env": s3_env(proxy.url), "retry_timeout": 2}
        cache = RCache(f"s3://{bucket}/r/h", store_options=options)
        with caplog.at_level(logging.WARNING, logger="activault.storage.s3"):
            name = f"s3://{bucket}/r/h/m00000-00000[01].safetensors"
            with pytest.raises(StorageError, match=f"{name}: the S3 endpoint {proxy.url} failed .*503"):
                list(cache)
    assert re.search(f"S3 at {proxy.url}: .* s3://{bucket}/r/h/m00000-00000[01].safetensors failed", caplog.text)
    assert proxy.counts["503"] >= 3


def _file_mapped_at(address: int) -> str | None:
    """The file whose mapping holds `address` in this process, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return rest[4] if len(rest) == 5 else None
    return None


@pytest.mark.skipif(not LocalStore(".").map_reads, reason="needs Linux >= 5.14 (MADV_POPULATE_READ)")
def test_local_files_are_read_in_place_and_writes_never_reach_them(tmp_path: Path) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3)
    hook = tmp_path / "r/h"
    before = {name: (hook / name).read_bytes() for name in run.names}
    got = list(RCache(str(hook), return_ids=True))
    for name, item in zip(run.names, got, strict=True):
        states = item["states"]
        assert torch.equal(states, run.files["h"][name]["states"])
        assert _file_mapped_at(states.data_ptr()) == str(hook / name)  # no copy of the file was made
        states.fill_(7)  # the tensors are the caller's to write: copy-on-write, the file unchanged
        assert (hook / name).read_bytes() == before[name]
    # map_reads=False reads into buffers instead: the same tensors
    plain = list(RCache(str(hook), store_options={"map_reads": False}))
    assert torch.equal(torch.cat(plain), run.tensor("h"))
    assert _file_mapped_at(plain[0].data_ptr()) != str(hook / run.names[0])


@pytest.mark.skipif(not LocalStore(".").map_reads, reason="needs Linux >= 5.14 (MADV_POPULATE_READ)")
def test_a_gathering_reader_maps_local_files_and_has_those_on_disk_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, d=512)  # 17 pages a file
    hook = tmp_path / "r/h"
    files = [hook / n for n in run.names]
    pages = [-(-f.stat().st_size // 4096) for f in files]
    assert max(pages) <= residency.SAMPLES  # every page probed: the expected choice is exact
    asked: list[int] = []  # the size of each mapping read ahead
    read_ahead = fetch.read_ahead
    monkeypatch.setattr(fetch, "read_ahead", lambda m: (asked.append(len(m)), read_ahead(m)))

    def mapped(held: int) -> list[bool]:
        stream = FileStream(str(hook), held=held)
        with stream.prefetch(0) as got:
            items = [item for _, item in got]
        assert torch.equal(torch.cat([i.states[0] for i in items]), run.tensor("h"))  # exact bytes
        return [_file_mapped_at(i.states[0].data_ptr()) == str(f) for i, f in zip(items, files, strict=True)]

    for held in (1, 4):  # 1: as RCache; 4: as TokenLoader (window 4)
        for f in files:
            evict(f)
        # Measured, not assumed: ext4 drops the pages, tmpfs cannot (its files are memory).
        cold = [cached_pages(f) < fetch.RESIDENT * n for f, n in zip(files, pages, strict=True)]
        asked.clear()
        assert mapped(held) == [True] * len(files)  # every local file read in place, on disk or not
        assert len(asked) == (sum(cold) if held > 1 else 0)  # those on disk read ahead by the kernel
        assert [cached_pages(f) for f in files] == pages  # the page cache holds them now
        asked.clear()
        assert mapped(held) == [True] * len(files) and asked == []  # cached: nothing to read ahead


@pytest.mark.parametrize("share", [0.0, 1.0], ids=["on-disk", "cached"])
def test_the_page_cache_share_decides_whether_a_gathering_reader_has_files_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h1", "h2"], files=3, d=1024)
    monkeypatch.setattr(fetch, "resident", lambda mapping: share)  # what mincore would say
    asked: list[int] = []
    monkeypatch.setattr(fetch, "read_ahead", lambda mapping: asked.append(len(mapping)))
    hooks = tmp_path / "r"
    for held in (1, 4):  # RCache maps as it is; a window of 4 has cold files read ahead
        asked.clear()
        with FileStream(str(hooks), hooks=["h1", "h2"], held=held).prefetch(0) as got:
            items = [item for _, item in got]
        assert len(asked) == (6 if held > 1 and share < fetch.RESIDENT else 0)  # 3 files x 2 hooks
        where = {
            _file_mapped_at(item.states[k].data_ptr()) == str(hooks / h / item.file.name)
            for item in items
            for k, h in enumerate(("h1", "h2"))
        }
        assert where == {True}  # read in place either way
        for k, h in enumerate(("h1", "h2")):  # the same bytes either way
            assert torch.equal(torch.cat([item.states[k] for item in items]), run.tensor(h))
        assert torch.equal(torch.cat([item.input_ids for item in items]), run.tensor("h1", "input_ids"))
    loader = TokenLoader(str(hooks), hooks=["h1", "h2"], batch_tokens=16, window=2, drop_last=False)
    assert sum(b["h1"].shape[0] for b in loader) == int((run.tensor("h1", "positions") >= 0).sum())


def test_read_ahead_is_a_hint_a_refusal_leaves_the_reads_to_fault_pages_in(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        fetch.read_ahead(mapping)  # asked of the kernel: no error, nothing read here
        assert mapping[:1] == b"x"

    class Refusing:
        def madvise(self, *a: Any) -> None:
            raise OSError(22, "Invalid argument")

    fetch.read_ahead(Refusing())  # type: ignore[arg-type]


@pytest.mark.skipif(not LocalStore(".").map_reads, reason="needs Linux >= 5.14 (MADV_POPULATE_READ)")
@pytest.mark.parametrize("reader", ["rcache", "tokens", "tokens-read-ahead"])
def test_a_file_truncated_while_mapped_is_named_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=2, d=512)  # 66 KiB files
    monkeypatch.setattr(fetch, "resident", lambda mapping: 0.0)  # on disk: a window of 2 has it read ahead
    hook = tmp_path / "r/h"
    victim = hook / run.names[1]
    opened = fetch.ObjectReader.open

    def map_then_truncate(self: fetch.ObjectReader, buffers: ReadBuffers) -> bool:
        mapped = opened(self, buffers)
        if self.key.endswith(victim.name) and victim.stat().st_size > 8192:
            os.truncate(victim, 8192)  # a second writer shortens the file in place once it is mapped
        return mapped

    monkeypatch.setattr(fetch.ObjectReader, "open", map_then_truncate)
    fix = re.escape(records.file_repair(str(tmp_path / "r"), victim.name))
    if reader == "rcache":
        cache = iter(RCache(str(hook)))
        assert torch.equal(next(cache), run.files["h"][run.names[0]]["states"])
        with pytest.raises(FormatError, match=f"{victim.name}: truncated file .*; {fix}$"):
            next(cache)  # touching the lost pages would be SIGBUS: the reader populates them first
    else:
        window = 2 if reader == "tokens-read-ahead" else 1
        with pytest.raises(FormatError, match=f"{victim.name}: truncated file .*; {fix}$"):
            list(TokenLoader(str(hook), batch_tokens=16, window=window))
    assert victim.stat().st_size == 8192


@pytest.mark.skipif(not LocalStore(".").map_reads, reason="needs Linux >= 5.14 (MADV_POPULATE_READ)")
def test_mapped_files_are_read_in_place_front_to_back_by_their_loading_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h1", "h2"], files=3, d=4096)  # 512 KiB
    jobs: Counter[str] = Counter()
    reads: dict[int, list[tuple[str, int, int]]] = {}  # per mapping: (thread, start, end)
    order: list[int] = []  # the mapping of each read, in the order they began
    submit, populate = fetch.Workers.submit, fetch.populate

    def counting(self: fetch.Workers, priority: tuple[int, ...], fn: Any, *args: Any) -> Any:
        jobs[fn.__name__] += 1
        return submit(self, priority, fn, *args)

    def recording(mapping: Any, start: int, end: int) -> None:
        reads.setdefault(id(mapping), []).append((threading.current_thread().name, start, end))
        order.append(id(mapping))
        populate(mapping, start, end)

    monkeypatch.setattr(fetch.Workers, "submit", counting)
    monkeypatch.setattr(fetch, "populate", recording)
    paths = [tmp_path / "r" / h / name for name in run.names for h in ("h1", "h2")]
    for cold in (False, True):
        for path in paths:
            evict(path) if cold else path.read_bytes()
        jobs.clear()
        reads.clear()
        order.clear()
        # Measured: evicted files (none on tmpfs, whose files are memory) are read in ranges instead.
        on_disk = any(cached_pages(path) < fetch.RESIDENT * -(-path.stat().st_size // 4096) for path in paths)
        got = list(RCache(str(tmp_path / "r"), hooks=["h1", "h2"], range_size=16 << 10))
        for h in ("h1", "h2"):
            assert torch.equal(torch.cat([g[h] for g in got]), run.tensor(h))
        if on_disk:
            assert jobs["read"] > 6 and len(reads) < 6  # some files in ranges on the range workers
            continue
        # No header or range requests: each file read by its load (the first on the consumer's thread).
        assert jobs == {"load": 2}
        assert len(reads) == 6
        for calls in reads.values():  # one thread, consecutive ranges from the header on
            assert len({t for t, _, _ in calls}) == 1
            assert calls[0][0].startswith("activault-read") or calls[0][0] == threading.current_thread().name
            assert calls[0][1] == 0 and all(prev[2] == nxt[1] for prev, nxt in pairwise(calls))
            assert len(calls) > 2  # the body in several ranges: a stop is seen between them
        first = list(dict.fromkeys(order))[:2]  # the first file's two hooks: read alone, before any other
        assert set(order[: len(reads[first[0]]) + len(reads[first[1]])]) == set(first)


# ---- files replaced while they are read (recompress: one atomic put per file) ----


def replacement(tmp_path: Path, name: str) -> tuple[bytes, torch.Tensor]:
    """A valid file `name` of another run (other data), compressed: another size. (bytes, states)"""
    other = LocalStore(tmp_path / "other", fsync=False)
    run = write_synthetic_run(other, "r", ["h"], files=2, d=64, seed=1)
    convert_file(other, f"r/h/{name}", codecs.Codec("zstd", chunk_bytes=256))
    return bytes(other.get(f"r/h/{name}")), run.files["h"][name]["states"]


@pytest.mark.parametrize("map_reads", [True, False], ids=["mapped", "read"])
def test_a_file_replaced_after_it_was_listed_is_read_as_it_is_now(tmp_path: Path, map_reads: bool) -> None:
    store = LocalStore(tmp_path, fsync=False)
    run = write_synthetic_run(store, "r", ["h"], files=2, d=64)
    victim = run.names[1]
    new, states = replacement(tmp_path, victim)
    assert len(new) < (tmp_path / "r/h" / victim).stat().st_size
    cache = RCache(str(tmp_path / "r/h"), store_options={"map_reads": map_reads})  # listed here
    store.put(f"r/h/{victim}", new)  # a valid file of another size, renamed over the listed one
    got = list(cache)  # not "truncated file": the listed size is not the file's any more
    assert torch.equal(got[0], run.files["h"][run.names[0]]["states"]) and torch.equal(got[1], states)


def test_a_file_replaced_between_its_header_and_its_body_is_read_whole_as_it_was(
    tmp_path: Path, small_ranges: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path, fsync=False)
    run = write_synthetic_run(store, "r", ["h"], files=2, d=64)
    (tmp_path / "r/h/metadata.json").unlink()  # nothing expected: the header is read alone, first
    victim = run.names[1]
    new, _ = replacement(tmp_path, victim)
    body, replaced = fetch.ObjectReader.body, []

    def replace_then_body(self: fetch.ObjectReader, *args: Any) -> Any:
        if self.key.endswith(victim) and not replaced:
            replaced.append(store.put(f"r/h/{victim}", new))  # after the header, before any body range
        return body(self, *args)

    monkeypatch.setattr(fetch.ObjectReader, "body", replace_then_body)
    got = list(RCache(str(tmp_path / "r/h"), store_options={"map_reads": False}))
    assert replaced and (tmp_path / "r/h" / victim).read_bytes() == new
    assert torch.equal(torch.cat(got), run.tensor("h")), "the version whose header was read, whole"


@pytest.mark.s3
def test_an_object_overwritten_between_ranges_is_read_again_whole(
    moto_url: str, moto_bucket: str, tmp_path: Path, small_ranges: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 the old version is gone: the body's ranges carry If-Match with the header's ETag, the
    server refuses them (412), and the file is read again from the start, its size asked anew."""
    store = S3Store(f"s3://{moto_bucket}", env=s3_env(moto_url))
    run = write_synthetic_run(store, "r", ["h"], files=2, d=64)
    store.delete("r/h/metadata.json")  # nothing expected: the header is read alone, first
    victim = run.names[1]
    new, states = replacement(tmp_path, victim)
    body, get = fetch.ObjectReader.body, s3mod.obstore.get
    refused: list[dict[str, Any]] = []
    replaced: list[None] = []

    def replace_then_body(self: fetch.ObjectReader, *args: Any) -> Any:
        if self.key.endswith(victim) and not replaced:
            replaced.append(store.put(f"r/h/{victim}", new))  # after the header, before any body range
        return body(self, *args)

    def spying(*args: Any, **kwargs: Any) -> Any:
        try:
            return get(*args, **kwargs)
        except PreconditionError:
            refused.append(kwargs["options"])
            raise

    monkeypatch.setattr(fetch.ObjectReader, "body", replace_then_body)
    monkeypatch.setattr(s3mod.obstore, "get", spying)
    got = list(RCache(S3Store(f"s3://{moto_bucket}/r/h", env=s3_env(moto_url))))
    assert refused and all("if_match" in options for options in refused)
    assert torch.equal(got[0], run.files["h"][run.names[0]]["states"]) and torch.equal(got[1], states)


# ---- ranges in flight ----


def test_ranges_in_flight_grow_with_the_file_and_its_first_byte() -> None:
    mib = 1 << 20
    remote, slow = 0.010, 0.030  # seconds to the first byte
    assert fetch.range_workers(256 * mib) == fetch.RANGE_WORKERS  # not measured yet: as before
    assert fetch.range_workers(64 * mib, remote) == fetch.RANGE_WORKERS  # 8 ranges of 8 MiB
    assert fetch.range_workers(256 * mib, remote) == 16  # one per 16 MiB: a capped connection each
    assert fetch.range_workers(256 * mib, slow) == 32  # a slow first byte: more, smaller
    assert fetch.range_workers(256 * mib, 0.0001) == fetch.RANGE_WORKERS  # local: more are thread hops
    assert fetch.range_workers(1 << 40, remote) == fetch.MAX_RANGE_WORKERS  # bounded
    assert fetch.range_step(256 * mib, first_byte=remote) == 16 * mib
    assert fetch.range_step(256 * mib, first_byte=slow) == 8 * mib


def test_the_first_byte_estimate_is_the_least_seen_less_the_transfer() -> None:
    fb = fetch.FirstByte()
    assert fb.seconds is None
    fb.observe(0.040 + (16 << 20) / fetch.LINK_RATE, 16 << 20)  # 30 ms to the first byte, plus queueing
    fb.observe(0.031, 64 << 10)
    assert fb.seconds is not None and 0.030 < fb.seconds < 0.031
    fb.observe(0.001, 16 << 20)  # a transfer faster than one capped connection: local
    assert fb.seconds == 0.0


def test_a_big_file_from_slow_storage_is_read_in_more_ranges_than_the_floor(tmp_path: Path, small_ranges: None) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, d=1024)  # 128 KiB
    logged = Timeline(LocalStore(tmp_path / "r/h", fsync=False, map_reads=False), delay=0.02)
    assert torch.equal(torch.cat(list(RCache(logged, buffer_size=1))), run.tensor("h"))
    running = most = 0
    for e, _, _ in logged.events:
        running += 1 if e == "start" else -1
        most = max(most, running)
    assert most > fetch.RANGE_WORKERS  # the first file measured 20 ms to a first byte: remote, one range per 4 KiB


def test_a_slow_local_disk_is_read_in_the_floors_ranges_not_as_remote_storage(
    tmp_path: Path, small_ranges: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=4, d=1024)  # 128 KiB
    with LocalStore(tmp_path).open(f"r/h/{run.names[0]}") as obj:
        handle = type(obj)  # the local store's handle: every ranged read goes through its read_into
    read = handle.read_into

    def seeking(self: Any, offset: int, out: memoryview) -> int:
        time.sleep(0.03)  # a cold disk's first byte, as slow as a remote store's
        return read(self, offset, out)

    monkeypatch.setattr(handle, "read_into", seeking)
    stream = FileStream(LocalStore(tmp_path / "r/h", fsync=False, map_reads=False), held=4)  # read by copy
    items, ranges = [], 0  # range threads alive, the most seen
    with stream.prefetch(0) as got:
        for _, item in got:
            items.append(item)
            ranges = max(ranges, sum(t.name.startswith("activault-range") for t in threading.enumerate()))
    assert torch.equal(torch.cat([item.states[0] for item in items]), run.tensor("h"))
    seconds = stream.first_byte.seconds
    assert seconds is not None and seconds >= fetch.SLOW_FIRST_BYTE  # measured as slow as remote storage
    assert 0 < ranges <= fetch.RANGE_WORKERS  # yet more ranges would only seek: the floor's


def test_a_local_store_is_measured_local_and_read_in_the_floors_ranges(tmp_path: Path) -> None:
    write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, d=64)
    cache = RCache(LocalStore(tmp_path / "r/h", fsync=False, map_reads=False))
    list(cache)
    seconds = cache.files.first_byte.seconds
    assert seconds is not None and seconds < fetch.REMOTE_FIRST_BYTE
    assert fetch.range_workers(256 << 20, seconds) == fetch.RANGE_WORKERS


@pytest.mark.skipif(not LocalStore(".").map_reads, reason="needs Linux >= 5.14 (MADV_POPULATE_READ)")
def test_a_mapped_local_read_starts_no_range_worker(tmp_path: Path) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h1", "h2"], files=4, d=64)
    it = iter(RCache(str(tmp_path / "r"), hooks=["h1", "h2"], buffer_size=2))
    first = next(it)
    names = [t.name for t in threading.enumerate() if t.name.startswith("activault-")]
    assert not [n for n in names if n.startswith("activault-range")], names
    assert len([n for n in names if n.startswith("activault-read")]) <= 2, names  # one per file in flight
    got = [first, *it]
    assert torch.equal(torch.cat([g["h1"] for g in got]), run.tensor("h1"))


def test_a_local_file_read_by_copy_is_split_over_the_cores_in_big_ranges() -> None:
    for size in (100_000, 64 << 20, (64 << 20) + 300_000):  # 64 MiB of states with its ids: one read
        assert fetch.local_step(size) >= size and fetch.local_step(size) % 4096 == 0
    for size in (1 << 36, (1 << 36) + 12_345):  # big files: at most one range per core, whole pages
        step = fetch.local_step(size)
        assert step % 4096 == 0 and -(-size // step) == min(os.cpu_count() or 1, size // fetch.LOCAL_RANGE)
    assert fetch.local_step(1 << 36, 12_345) == 12_345  # the caller's range size wins


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_local_files_read_by_copy_take_one_request_each_and_s3_ones_parallel_ranges(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    small_ranges: None,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, d=64)
    sizes = {name: (tmp_path / "r/h" / name).stat().st_size for name in run.names}
    if where == "local":  # map_reads=False: the copying path that pinned (CUDA) buffers take too
        store: Store = LocalStore(tmp_path / "r/h", fsync=False, map_reads=False)
    else:
        bucket, env = request.getfixturevalue("moto_bucket"), s3_env(request.getfixturevalue("moto_url"))
        copy_tree(tmp_path / "r", S3Store(f"s3://{bucket}", env=env), "r")
        store = S3Store(f"s3://{bucket}/r/h", env=env)
    requests: Counter[str] = Counter()
    read = fetch.ObjectReader.read

    def counted(self: fetch.ObjectReader, start: int, out: memoryview, obj: Any = None) -> None:
        requests[self.key] += 1
        read(self, start, out, obj)

    monkeypatch.setattr(fetch.ObjectReader, "read", counted)
    tokens = sum(int((run.files["h"][n]["positions"] >= 0).sum()) for n in run.names)  # padding dropped
    for reader in (RCache(store), TokenLoader(store, batch_tokens=64, drop_last=False)):
        requests.clear()
        got = list(reader)
        if isinstance(reader, RCache):
            assert torch.equal(torch.cat(got), run.tensor("h"))
        else:
            assert sum(len(b) for b in got) == tokens
        for name in run.names:
            # Locally one pread per file (8 parallel ranges each faulted the buffer in: 10x slower);
            # S3 keeps its ranges (here of 4 KiB), in parallel.
            assert requests[name] == 1 if where == "local" else requests[name] >= sizes[name] // 4096 > 1, requests
