"""Which files a reader reads: every hook holds each file; foreign objects are skipped, named."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from activault import RCache, TokenLoader
from activault.errors import FormatError
from activault.reading.listing import Catalog
from activault.reading.options import ReadOptions
from activault.storage import Store
from activault.storage.s3 import S3Store
from activault.vault import megabatch as fmt
from support.runstate import store_at
from support.synth import write_synthetic_run


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, str, dict[str, Any]]:
    """(store, its URI, store_options) on the local store and on a fresh moto bucket."""
    return store_at(request.param, request, tmp_path)


def test_file_missing_from_a_hook_is_named_or_skipped(
    where: tuple[Store, str, dict[str, Any]],
) -> None:
    store, root, options = where
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=3)
    gone = run.names[1]
    store.delete(f"run/h2/{gone}")
    opts: dict[str, Any] = {"hooks": ["h1", "h2"], "store_options": options}
    for make in (
        lambda **kw: RCache(f"{root}/run", **kw),
        lambda **kw: TokenLoader(f"{root}/run", batch_tokens=8, **kw),
    ):
        with pytest.raises(FormatError, match=f"{gone} lacks h2.*skip_bad_files=True"):
            make(**opts)
    with pytest.warns(UserWarning, match=f"skipping 1 file.*{gone} lacks h2"):
        cache = RCache(f"{root}/run", skip_bad_files=True, **opts)
    kept = [n for n in run.names if n != gone]
    out = list(cache)
    assert cache.bad_files == 1 and list(cache.incomplete_files.values()) == [["h2"]]
    assert gone in next(iter(cache.incomplete_files))
    for h in ("h1", "h2"):
        assert torch.equal(torch.cat([b[h] for b in out]), run.tensor(h, names=kept))


def test_a_reader_of_one_hook_checks_its_files_against_the_progress_records(
    where: tuple[Store, str, dict[str, Any]],
) -> None:
    store, root, options = where
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=3)
    gone = run.names[4]
    store.delete(f"run/h1/{gone}")  # h2 and machine 1's progress record still have it
    for make in (
        lambda **kw: RCache(f"{root}/run", hooks=["h1"], **kw),  # was: read without it, in silence
        lambda **kw: TokenLoader(f"{root}/run", hooks=["h1"], batch_tokens=8, **kw),
    ):
        with pytest.raises(FormatError, match=f"{gone} lacks h1.*skip_bad_files=True"):
            make(store_options=options)
    store.delete(f"run/h2/{gone}")  # now lost from every hook: the record still counts it
    with pytest.raises(FormatError, match=f"{gone} lacks h1, h2"):
        RCache(f"{root}/run", hooks=["h1", "h2"], store_options=options)
    with pytest.warns(UserWarning, match=f"skipping 1 file.*{gone} lacks h1"):
        cache = RCache(f"{root}/run", hooks=["h1"], skip_bad_files=True, store_options=options)
    kept = [n for n in run.names if n != gone]
    assert cache.bad_files == 1 and torch.equal(torch.cat([b["h1"] for b in cache]), run.tensor("h1", names=kept))
    store.put_text("run/progress/machine-00001.json", "{garbage")  # a damaged record tells nothing
    assert len(RCache(f"{root}/run", hooks=["h1"], store_options=options)) == len(kept)


def test_file_being_written_waits_for_sync(where: tuple[Store, str, dict[str, Any]]) -> None:
    store, root, options = where
    run = write_synthetic_run(store, "run", ["h1", "h2"], files=3)
    # Machine 0 is writing its third file: in h1 already, not yet in h2 nor counted by its record.
    last = run.names[-1]
    store.delete(f"run/h2/{last}")
    record = json.loads(store.get_text("run/progress/machine-00000.json"))
    store.put_text(
        "run/progress/machine-00000.json",
        json.dumps({**record, "files_done": 2, "finished": False}),
    )
    cache = RCache(f"{root}/run", hooks=["h1", "h2"], store_options=options)
    assert len(cache) == 2 and cache.bad_files == 0
    store.put(f"run/h2/{last}", fmt.encode(run.files["h2"][last], {}))
    assert cache.sync() == 1
    assert torch.equal(torch.cat([b["h2"] for b in cache]), run.tensor("h2"))


def test_foreign_objects_are_skipped_and_named(where: tuple[Store, str, dict[str, Any]]) -> None:
    store, root, options = where
    run = write_synthetic_run(store, "run", ["h"], files=3)
    store.put("run/h/m00000-000099.safetensors", b"")  # empty
    store.put("run/h/notes.txt", b"not a megabatch")
    store.put("run/h/.DS_Store" if isinstance(store, S3Store) else "run/h/Icon", b"\0" * 10)
    with pytest.warns(UserWarning, match="skipping 3 object"):
        cache = RCache(f"{root}/run/h", store_options=options)
    assert torch.equal(torch.cat(list(cache)), run.tensor("h"))
    reasons = {url.rsplit("/", 1)[-1]: why for url, why in cache.foreign_objects.items()}
    assert reasons["m00000-000099.safetensors"] == "empty" and reasons["notes.txt"] == "not a megabatch"
    assert cache.bad_files == 0
    with pytest.warns(UserWarning, match="skipping 3 object"):  # TokenLoader: the same listing
        tokens = torch.cat(list(TokenLoader(f"{root}/run/h", batch_tokens=8, drop_last=False, store_options=options)))
    assert tokens.shape[0] == int((run.tensor("h", "positions") >= 0).sum())


def test_a_counted_file_emptied_in_a_hook_is_an_error_naming_it(where: tuple[Store, str, dict[str, Any]]) -> None:
    store, root, options = where
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=3)
    lost = run.names[4]  # machine 1's progress record counts it
    store.put(f"run/h1/{lost}", b"")
    for make in (
        lambda: RCache(f"{root}/run", hooks=["h1", "h2"], store_options=options),
        lambda: RCache(f"{root}/run", hooks=["h1"], store_options=options),
        lambda: RCache(f"{root}/run/h1", store_options=options),  # was: skipped as a foreign object
    ):
        with pytest.raises(FormatError, match=rf"{lost} is empty \(0 bytes\) in h1.*skip_bad_files=True"):
            make()
    with pytest.warns(UserWarning, match=rf"skipping 1 file.*{lost} is empty \(0 bytes\) in h1"):
        cache = RCache(f"{root}/run/h1", skip_bad_files=True, store_options=options)
    assert cache.bad_files == 1 and not cache.foreign_objects
    kept = [n for n in run.names if n != lost]
    assert torch.equal(torch.cat(list(cache)), run.tensor("h1", names=kept))


def test_a_reader_of_a_hook_folder_checks_its_files_against_the_runs_progress_records(
    where: tuple[Store, str, dict[str, Any]],
) -> None:
    store, root, options = where
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=3)
    gone = run.names[1]
    store.delete(f"run/h1/{gone}")
    with pytest.raises(FormatError, match=f"{gone} lacks h1.*skip_bad_files=True"):
        RCache(f"{root}/run/h1", store_options=options)  # was: read without it, in silence
    with pytest.warns(UserWarning, match=f"skipping 1 file.*{gone} lacks h1"):
        cache = RCache(f"{root}/run/h1", skip_bad_files=True, store_options=options)
    kept = [n for n in run.names if n != gone]
    assert torch.equal(torch.cat(list(cache)), run.tensor("h1", names=kept))
    assert torch.equal(torch.cat(list(RCache(f"{root}/run/h2", store_options=options))), run.tensor("h2"))
    # A file its machine is still writing (the record does not count it yet) is waited for.
    record = json.loads(store.get_text("run/progress/machine-00000.json"))
    store.put_text("run/progress/machine-00000.json", json.dumps({**record, "files_done": 1, "finished": False}))
    assert len(RCache(f"{root}/run/h1", store_options=options)) == len(kept)


def test_a_reader_refuses_a_progress_record_counting_more_files_than_planned(
    where: tuple[Store, str, dict[str, Any]],
) -> None:
    from support.runstate import edit_progress, with_plan

    store, root, options = where
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=3)
    with_plan(store, "run", n_batches=6)
    edit_progress(store, "run", 1, files_done=99)
    for uri, hooks in ((f"{root}/run", ["h1", "h2"]), (f"{root}/run/h2", None)):
        # was: 96 files "lacking" from every hook, an error about files that never existed
        with pytest.warns(UserWarning, match="damaged progress record.*'files_done' is 99, more than the 3"):
            cache = RCache(uri, hooks=hooks, store_options=options)
        assert len(cache) == len(run.names) and cache.bad_files == 0


def test_local_records_are_read_on_the_callers_thread_and_s3_ones_in_parallel(
    where: tuple[Store, str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, root, options = where
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=3)
    started: list[str] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    catalog = Catalog(f"{root}/run", hooks=["h1", "h2"], options=ReadOptions(store_options=options))
    assert sorted(f.name for block in catalog.blocks for f in block) == sorted(run.names)
    assert catalog.shapes[0] is not None and catalog.shapes[1] is not None
    pools = [n for n in started if n.startswith("activault-records")]
    # Was: a pool for the 2 metadata records, another for the 2 progress records, locally too.
    assert pools if root.startswith("s3://") else not pools


@pytest.mark.s3
def test_s3_hooks_are_listed_beside_the_records_and_again_when_a_record_counts_what_they_lack(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each listing a round trip: the hook folders are listed while the progress records are read.
    A file written between the two (listed in no hook, counted by its record) is not taken as lost:
    the folders are listed again, after the records, and it is read."""
    store, root, options = store_at("moto", request, tmp_path)
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=3)
    late, calls, hidden = run.names[-1], [], []
    real = Catalog._list

    def listing(self: Catalog, prefix: Any, folder: str) -> Any:
        files, empty, odd = real(self, prefix, folder)
        calls.append(folder.rsplit("/", 1)[-1])
        if folder.endswith("h2") and not hidden:  # the first listing of h2: before `late` was written there
            hidden.append(files.pop(late))
        return files, empty, odd

    monkeypatch.setattr(Catalog, "_list", listing)
    catalog = Catalog(f"{root}/run", hooks=["h1", "h2"], options=ReadOptions(store_options=options))
    assert sorted(f.name for block in catalog.blocks for f in block) == sorted(run.names)  # none lost, none refused
    assert sorted(calls) == ["h1", "h1", "h2", "h2"]  # listed again, after the records
    calls.clear()
    assert catalog.sync() == 0 and sorted(calls) == ["h1", "h2"]  # once, when no counted file is missing


def test_a_full_files_bound_covers_its_documents_and_norms(tmp_path: Path) -> None:
    """The bound a reader requests a file whole under (fetch.py `expect`) counts every tensor of a
    format 5 file: each token's states, ids, positions, document and norm."""
    from activault.storage import LocalStore
    from activault.vault import records

    KEPT = {
        "run_name",
        "hook",
        "d_model",
        "dtype",
        "seq_length",
        "rows_per_file",
        "batch_size",
        "batches_per_upload",
        "model",
    }

    store = LocalStore(tmp_path, fsync=False)
    run = write_synthetic_run(store, "run", ["h"], files=1, rows=8, seq=64, d=16, pad=0, documents=True)
    meta = records.read_metadata(store, "run/h")
    assert meta is not None
    with_docs = records.hook_metadata(**{**meta.model_dump(include=KEPT), "provenance": True})  # as collect writes it
    records.write_record(store, records.metadata_key("run/h"), with_docs)
    catalog = Catalog(str(tmp_path / "run"), hooks=["h"])
    header = fmt.fetch_header(store, f"run/h/{run.names[0]}")
    assert header.version == 5 and catalog.tensor_bytes(0, 0) == header.size - header.data_offset
