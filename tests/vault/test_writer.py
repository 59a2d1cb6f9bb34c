"""Writing a run: the run writer (the commit protocol, one cfg.json, equal bytes, refused garbage,
no record written over another writer's)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from activault.errors import ConfigError, FormatError, LockedError, StorageError
from activault.storage import LocalStore
from activault.vault import codec as codecs
from activault.vault.megabatch import encode
from activault.vault.records import (
    RunRecord,
    file_name,
    hook_metadata,
    read_metadata,
    read_progress,
    read_run,
    read_statistics,
)
from activault.vault.stats import RunningStats
from activault.vault.writer import RunWriter, replace_file
from support.slow_store import SlowStore


def test_prefetch_keeps_order_raises_errors_and_stops_its_thread():
    from activault.background import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad document")

    got = []
    with pytest.raises(ValueError, match="bad document"):
        for x in prefetch(broken()):
            got.append(x)
    assert got == [1]

    gen = prefetch(iter(range(1000)), depth=2)
    assert next(gen) == 0
    gen.close()  # the consumer stops early: the producer thread must end, not hang
    assert not [t for t in threading.enumerate() if t.name == "activault-data"]


# ---- the run writer ----------------------------------------------------------------------------

HOOKS = ["h1", "h2"]
ROWS, SEQ, D = 4, 8, 6


def run_specs(run: str = "run", machines: int = 1, dtype: torch.dtype = torch.bfloat16):
    record = RunRecord(run_name=run, hooks=HOOKS, num_runs=machines, tokenizer="t", model={"d_model": D})
    metadata = {
        h: hook_metadata(
            run_name=run,
            hook=h,
            d_model=D,
            dtype=dtype,
            seq_length=SEQ,
            rows_per_file=ROWS,
            batch_size=2,
            batches_per_upload=2,
            model="m",
        )
        for h in HOOKS
    }
    return record, metadata


def file_tensors(k: int, rows: int = ROWS, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(k)
    states = {h: torch.randn(rows, SEQ, D, generator=g).to(dtype) for h in HOOKS}
    ids = torch.randint(0, 100, (rows, SEQ), generator=g, dtype=torch.int32)
    pos = torch.arange(SEQ, dtype=torch.int32).expand(rows, SEQ).contiguous()
    return states, ids, pos


def write_files(writer: RunWriter, ks, stats: dict[str, RunningStats]) -> None:
    for k in ks:
        states, ids, pos = file_tensors(k)
        for h in HOOKS:
            stats[h].update(states[h].reshape(-1, D))
        writer.write_file(states, ids, pos, tokens=ROWS * SEQ, data_state={"k": k + 1}, stats=stats)


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".locks" not in p.parts
    }


def test_run_writer_commits_each_record_after_the_files_it_counts(tmp_path):
    store = SlowStore(tmp_path, delay=0.002)
    record, metadata = run_specs()
    writer = RunWriter(store, record, metadata, threads=4)
    writer.join()
    writer.begin()
    stats = {h: RunningStats(D) for h in HOOKS}
    write_files(writer, range(3), stats)
    assert writer.finish({"k": 3}, stats) == [0]
    order = {key: i for i, key in enumerate(store.order)}
    progress = [i for i, key in enumerate(store.order) if key == "run/progress/machine-00000.json"]
    assert len(progress) == 4  # one per file, then the finished record
    assert store.order.count("run/cfg.json") == 1
    for h in HOOKS:
        assert order[f"run/{h}/metadata.json"] < progress[0]  # the first file's metadata, before its record
        for k in range(3):
            assert order[f"run/{h}/{file_name(0, k)}"] < progress[k]
    assert all(order[f"run/{h}/statistics.json"] > progress[-1] for h in HOOKS)  # statistics last
    assert read_run(store, "run") == record
    rec = read_progress(store, "run", 0)  # every record written validates
    assert (rec.files_done, rec.rows_done, rec.tokens_done, rec.finished) == (3, 3 * ROWS, 3 * ROWS * SEQ, True)
    assert read_metadata(store, "run/h1") == metadata["h1"]
    assert read_statistics(store, "run/h2").count == 3 * ROWS * SEQ


def test_a_failed_file_is_never_counted(tmp_path):
    bad = f"h2/{file_name(0, 2)}"
    store = SlowStore(tmp_path, delay=0.0, fail_on=bad)
    record, metadata = run_specs()
    writer = RunWriter(store, record, metadata)
    writer.join()
    stats = {h: RunningStats(D) for h in HOOKS}
    write_files(writer, range(2), stats)
    writer.flush()
    with pytest.raises(StorageError, match="disk full"):
        write_files(writer, [2], stats)
        writer.flush()
    writer.abort()
    rec = read_progress(store, "run", 0)
    assert rec.files_done == 2 and not rec.finished  # file 2 of h1 may exist: nothing counts it
    assert not (tmp_path / "run" / bad).exists() and read_statistics(store, "run/h1") is None


def test_a_writer_that_lost_the_machine_writes_no_record_over_the_new_holders(tmp_path):
    """A and B both believe they hold machine 0 (A was partitioned past its lease): once B has
    finished, neither A's pending record nor its finished record nor its statistics land."""
    store = LocalStore(tmp_path, fsync=False)
    record, metadata = run_specs()
    a, a_stats = RunWriter(store, record, metadata), {h: RunningStats(D) for h in HOOKS}
    a.join()
    write_files(a, range(2), a_stats)
    a.flush()
    late = RunWriter(store, record, metadata)  # opened with A's record, its next one still pending
    late_stats = {h: late.resumed.stats[h].running() for h in HOOKS}

    b = RunWriter(store, record, metadata)
    b_stats = {h: b.resumed.stats[h].running() for h in HOOKS}
    write_files(b, range(2, 4), b_stats)
    b.finish({"k": 4}, b_stats)
    before = tree(tmp_path)

    with pytest.raises(LockedError, match=r"machine 0 was taken over: .* counts 4 files, finished"):
        a.finish({"k": 2}, a_stats)
    write_files(late, [2], late_stats)
    with pytest.raises(LockedError, match="nothing counts the files it wrote since"):
        late.flush()
    late.abort()
    assert tree(tmp_path) == before, "B's records, statistics and files, byte for byte"
    assert read_progress(store, "run", 0).finished


def test_a_record_written_but_reported_failed_counts_once(tmp_path):
    """A conditional put that landed but whose reply was lost (S3 retries it, and the retry is
    refused) is the writer's own record: taken as written, not as a takeover."""

    class LostReply(LocalStore):
        def swap(self, key, data, expect):
            return super().swap(key, data, expect) and False

    record, metadata = run_specs()
    writer = RunWriter(LostReply(tmp_path, fsync=False), record, metadata)
    writer.join()
    stats = {h: RunningStats(D) for h in HOOKS}
    write_files(writer, range(2), stats)
    assert writer.finish({"k": 2}, stats) == [0]
    assert read_progress(LocalStore(tmp_path), "run", 0).files_done == 2


def test_runs_written_twice_or_resumed_are_the_same_bytes(tmp_path):
    def write(root: Path, stop: int | None) -> None:
        record, metadata = run_specs()
        stats = {h: RunningStats(D) for h in HOOKS}
        writer = RunWriter(LocalStore(root, fsync=False), record, metadata)
        writer.join()
        write_files(writer, range(stop or 3), stats)
        if stop is not None:  # the process dies after `stop` files; a new writer resumes
            writer.flush()
            writer.abort()
            writer = RunWriter(LocalStore(root, fsync=False), record, metadata)
            assert writer.resumed.files_done == stop and writer.resumed.data_state == {"k": stop}
            stats = {h: writer.resumed.stats[h].running() for h in HOOKS}
            writer.join()
            write_files(writer, range(stop, 3), stats)
        writer.finish({"k": 3}, stats)

    write(tmp_path / "a", None)
    write(tmp_path / "b", None)
    write(tmp_path / "c", 1)
    assert tree(tmp_path / "a") == tree(tmp_path / "b") == tree(tmp_path / "c")


def test_records_only_when_files_are_not_stored(tmp_path):
    record, metadata = run_specs()
    writer = RunWriter(LocalStore(tmp_path, fsync=False), record, metadata, store_files=False)
    writer.join()
    freed: list[str] = []
    states, ids, pos = file_tensors(0)
    stats = {h: RunningStats(D) for h in HOOKS}
    writer.write_file(
        states, ids, pos, tokens=1, data_state=None, stats=stats, on_written={"h1": lambda: freed.append("h1")}
    )
    writer.finish(None, stats)
    assert freed == ["h1"] and not list(tmp_path.rglob("*.safetensors"))
    assert read_progress(LocalStore(tmp_path), "run", 0).files_done == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"states": {"h1": torch.zeros(ROWS, SEQ, D, dtype=torch.float32)}},
            r"states of hook 'h1' are \[4, 8, 6\] float32",
        ),
        ({"states": {"h2": torch.zeros(ROWS, SEQ, D + 1, dtype=torch.bfloat16)}}, r"\[4, 8, 7\] bfloat16"),
        ({"states": {"h1": torch.zeros(ROWS + 1, SEQ, D, dtype=torch.bfloat16)}}, r"with 4 rows of ids"),
        ({"drop": "h2"}, r"has hooks \['h1'\], the run \['h1', 'h2'\]"),
        ({"ids": torch.zeros(ROWS, SEQ, dtype=torch.int64)}, r"input_ids is \[4, 8\] int64"),
        ({"pos": torch.zeros(ROWS, SEQ + 1, dtype=torch.int32)}, r"positions is \[4, 9\] int32"),
        ({"rows": ROWS + 4}, r"the run stores \[1..4, 8, 6\] bfloat16"),
        ({"rows": 0}, r"the run stores \[1..4, 8, 6\]"),
    ],
    ids=["dtype", "width", "rows-differ", "hook-missing", "ids-dtype", "pos-shape", "too-many-rows", "no-rows"],
)
def test_a_file_that_does_not_fit_the_run_is_refused_before_anything_is_written(tmp_path, change, message):
    record, metadata = run_specs()
    writer = RunWriter(LocalStore(tmp_path, fsync=False), record, metadata)
    states, ids, pos = file_tensors(0, rows=change.get("rows", ROWS))
    states.update(change.get("states", {}))
    states.pop(change.get("drop", ""), None)
    ids, pos = change.get("ids", ids), change.get("pos", pos)
    with pytest.raises(FormatError, match=message) as e:
        writer.write_file(states, ids, pos, tokens=1, data_state=None, stats={})
    assert "nothing written" in str(e.value)
    writer.abort()
    assert not tmp_path.exists() or not list(tmp_path.rglob("*"))


def test_a_writer_that_does_not_describe_one_run_is_refused(tmp_path):
    store = LocalStore(tmp_path, fsync=False)
    record, metadata = run_specs(machines=2)
    with pytest.raises(ConfigError, match=r"metadata for hooks \['h1'\], the run has \['h1', 'h2'\]"):
        RunWriter(store, record, {"h1": metadata["h1"]})
    with pytest.raises(ConfigError, match="the metadata of hook 'h2' names another run or hook"):
        RunWriter(store, record, {**metadata, "h2": metadata["h1"]})
    with pytest.raises(ConfigError, match=r"machine 2 is not in 0..1 \(num_runs\)"):
        RunWriter(store, record, metadata, 2)
    RunWriter(store, record, metadata, 1).finish(None, {h: RunningStats(D) for h in HOOKS})
    with pytest.raises(ConfigError, match="was written with num_runs=2, not 3"):
        RunWriter(store, record.model_copy(update={"num_runs": 3}), metadata, 1)


def test_replace_file_writes_only_a_verified_file(tmp_path):
    store = LocalStore(tmp_path, fsync=False)
    states, ids, pos = file_tensors(0)
    tensors = {"states": states["h1"], "input_ids": ids, "positions": pos}
    store.put("f.safetensors", encode(tensors, {"format": "activault"}))
    before = store.get("f.safetensors").tobytes()
    new = b"".join(encode(tensors, {"format": "activault"}, compression=codecs.Codec("zstd")))
    with pytest.raises(FormatError):
        replace_file(store, "f.safetensors", new[:-7])  # truncated: never written

    def refuse(mb):
        raise FormatError("not the same data")

    with pytest.raises(FormatError, match="not the same data"):
        replace_file(store, "f.safetensors", new, refuse)
    assert store.get("f.safetensors").tobytes() == before
    replace_file(store, "f.safetensors", new, lambda mb: None)
    assert store.get("f.safetensors").tobytes() == new


def test_synthetic_runs_are_whole_runs_whose_records_validate(tmp_path):
    from support.synth import write_synthetic_run

    store = LocalStore(tmp_path, fsync=False)
    synth = write_synthetic_run(store, "run", HOOKS, machines=2, files=2)
    rec = read_run(store, "run")
    assert rec is not None and rec.num_runs == 2 and rec.imported_from is None
    for m in range(2):
        progress = read_progress(store, "run", m)
        assert progress.finished and progress.files_done == 2
    for h in HOOKS:
        assert read_metadata(store, f"run/{h}").rows_per_file == 4
        stats = read_statistics(store, f"run/{h}")
        assert stats.machines == [0, 1] and stats.mean == synth.stats[h].mean.tolist()


def test_a_finished_record_without_every_hooks_statistics_is_refused_before_anything_is_written(tmp_path):
    """It would read as damaged, with advice to collect the machine again."""
    store = LocalStore(tmp_path, fsync=False)
    record, metadata = run_specs()
    writer = RunWriter(store, record, metadata)
    writer.join()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"every hook's statistics; none for \['h2'\]"):
        writer.finish(None, {"h1": RunningStats(D)})
    writer.abort()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_writer_without_norms_labels_its_files_before_norms_and_stores_none(tmp_path):
    """`norms=False` (a scratch run): the same tensors, labelled format 4 with documents (3 without),
    no norms computed; the default stores each token's norm of its states."""
    from activault.vault.megabatch import decode
    from activault.vault.norms import NORMS, token_norms

    store = LocalStore(tmp_path, fsync=False)
    states, ids, pos = file_tensors(0)
    docs = torch.arange(ROWS * SEQ, dtype=torch.int64).view(ROWS, SEQ)
    for run, norms, documents, label in [("a", False, docs, "4"), ("b", False, None, "3"), ("c", True, docs, "5")]:
        record, metadata = run_specs(run)
        writer = RunWriter(store, record, metadata, norms=norms)
        writer.join()
        writer.write_file(states, ids, pos, tokens=ROWS * SEQ, data_state=None, stats={}, documents=documents)
        writer.close()
        mb = decode(store.get(f"{run}/h1/{file_name(0, 0)}"), run, verify_checksums=True)
        assert mb.header is not None and mb.header.metadata["format_version"] == label
        assert torch.equal(mb.states, states["h1"]) and torch.equal(mb.input_ids, ids)
        if norms:
            assert mb.norms is not None and torch.equal(mb.norms, token_norms(states["h1"]))
        else:
            assert NORMS not in mb.tensors
