"""tools/shuffle.py: `activault shuffle` writes a seeded uniform permutation of a run's tokens (hooks
aligned, statistics the source's, padding last) in bounded memory, resumes after SIGKILL with the
same bytes, refuses bad inputs before writing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from activault.cli import main
from activault.errors import ConfigError, NotFoundError
from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from activault.tools.shuffle import bound_tokens, choose_buckets, read_source, shuffle_run
from activault.tools.shuffle_passes import PIECES
from activault.tools.shuffle_plan import bucket_counts, permuted
from activault.tools.shuffle_tokens import Tokens
from activault.tools.verify import verify_run
from activault.vault import megabatch as fmt
from activault.vault.norms import token_norms
from activault.vault.writer import RunWriter
from support.interrupted import kill_when_reached
from support.synth import s3_env, write_synthetic_run

HOOKS = ["h1", "h2"]


def tokens(store: Store, run: str) -> list[tuple[bytes, ...]]:
    """Every stored token slot in file order: (each hook's state bytes, id, position)."""
    _, progress = store.list_dir(f"{run}/progress")
    names = sorted(e.key.rsplit("/", 1)[1] for e in store.list(f"{run}/{HOOKS[0]}") if e.key.endswith(fmt.SUFFIX))
    out = []
    for name in names:
        mbs = [fmt.decode(store.get(f"{run}/{h}/{name}"), name, verify_checksums=True) for h in HOOKS]
        ids, pos = mbs[0].input_ids.reshape(-1), mbs[0].positions.reshape(-1)
        for mb in mbs[1:]:  # every hook's file holds the same tokens
            assert torch.equal(mb.input_ids.reshape(-1), ids) and torch.equal(mb.positions.reshape(-1), pos)
        states = [mb.states.reshape(ids.numel(), -1).view(torch.uint8).numpy() for mb in mbs]
        for i in range(ids.numel()):
            out.append((*(s[i].tobytes() for s in states), int(ids[i]), int(pos[i])))
    return out


def contents(store: Store, run: str) -> dict[str, bytes]:
    """Every object of `run` but locks, the store's own URL (in cfg.json's provenance) left out."""
    url = store.url().encode()
    return {e.key: bytes(store.get(e.key)).replace(url, b"") for e in store.list(run) if "/.locks/" not in e.key}


def make_source(store: Store) -> None:
    write_synthetic_run(store, "run", HOOKS, machines=2, files=12, dtype=torch.float32)


def check_order(store: Store, buckets: int, seed: int, dst: str = "dst") -> None:
    """DST holds the source's slots in the order `permuted` states (random states: each real
    token is one of a kind)."""
    src = tokens(store, "run")
    real = np.array([t[-1] >= 0 for t in src])
    where = {t: i for i, t in enumerate(src) if t[-1] >= 0}
    out = [where.get(t, -1) for t in tokens(store, dst)]
    want = permuted([64] * 24, buckets, seed, real)  # 24 files of 4 rows x 16 slots
    assert out[: int(real.sum())] == want[: int(real.sum())].tolist()


def test_shuffle_is_a_seeded_permutation_with_hooks_aligned(stores: tuple[Store, Store]) -> None:
    a, b = stores
    for s in stores:
        make_source(s)
    r = shuffle_run(a, "run", a, "dst", seed=1, buckets=8)
    check_order(a, 8, 1)
    src, out = tokens(a, "run"), tokens(a, "dst")
    # The same rows (every hook's state, id, position together: hooks stay aligned), in another order.
    assert Counter(out) == Counter(src) and out != src and r.tokens == len(src)
    # Real tokens mixed across files and documents; padding only ends the data.
    pos = np.array([t[-1] for t in out])
    pad = int((pos < 0).sum())
    assert pad > 0 and (pos[-pad:] < 0).all() and (pos[:-pad] >= 0).all()
    # Memory: the counted peak within the stated bound, far below the run.
    assert 0 < r.peak_tokens <= r.bound_tokens <= r.tokens // 2
    # Seeded: the same seed in another store gives the same bytes; another seed another order.
    shuffle_run(b, "run", b, "dst", seed=1, buckets=8)
    assert contents(b, "dst") == contents(a, "dst")
    shuffle_run(a, "run", a, "other", seed=2, buckets=8)
    assert tokens(a, "other") != out and Counter(tokens(a, "other")) == Counter(src)
    # Statistics are the source's (the same tokens), provenance kept, the buckets removed.
    for h in HOOKS:
        got, want = (json.loads(a.get_text(f"{run}/{h}/statistics.json")) for run in ("dst", "run"))
        assert {k: v for k, v in got.items() if k not in ("machines", "num_runs")} == {
            k: v for k, v in want.items() if k not in ("machines", "num_runs")
        }
    cfg = json.loads(a.get_text("dst/cfg.json"))
    assert cfg["config"]["shuffled_from"] == {
        "run": a.url("run"),
        "seed": 1,
        "buckets": 8,
        "machines": 2,
        "plan": 2,
    }
    assert cfg["num_runs"] == 1 and not [e for e in a.list("dst/.shuffle")]
    assert verify_run(a, "dst").problems == []
    # Run again: already finished, nothing written.
    before = contents(a, "dst")
    assert shuffle_run(a, "run", a, "dst", seed=1).already and contents(a, "dst") == before


def test_a_run_that_fits_one_bucket_is_shuffled_in_one_pass(
    stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = stores
    make_source(store)
    written: list[tuple[str, int]] = []
    real = RunWriter.write_file

    def spied(self: RunWriter, *a: Any, **k: Any) -> Any:
        written.append((self.run, self.machine))
        return real(self, *a, **k)

    monkeypatch.setattr(RunWriter, "write_file", spied)
    allocated: list[int] = []
    empty = Tokens.empty

    def counted(like: Tokens, n: int) -> Tokens:
        allocated.append(n)
        return empty(like, n)

    monkeypatch.setattr(Tokens, "empty", staticmethod(counted))
    # 1536 slots of 72 bytes (2 hooks x 8 float32 + ids, positions): the run, pass 1's 4 files of 64
    # slots and the padding (2 x 16 slots) need 131,328 bytes; half of memory would not do.
    r = shuffle_run(store, "run", store, "dst", seed=6, memory=150_000)
    assert r.buckets == 1 and ("dst/.shuffle", PIECES) not in written  # no temporary pieces
    # Where the store maps files (locally) they are the bucket: no buffer of the run's size (S3: read).
    key = next(e.key for e in store.list("run/h1") if e.key.endswith(fmt.SUFFIX))
    mapped = store.map(key) is not None  # a local store (where the kernel populates mappings)
    assert (max(allocated) >= r.tokens) != mapped
    assert written.count(("dst", 0)) == r.files == 24
    check_order(store, 1, 6)
    assert r.peak_tokens <= r.bound_tokens and r.bound_tokens * 72 <= 150_000


def test_the_fewest_buckets_whose_bound_fits_memory_are_taken(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    make_source(store)
    src = read_source(store, "run")
    assert src.token_bytes == 72  # 2 hooks x 8 float32, ids and positions int32

    def bound(buckets: int) -> int:
        return bound_tokens(src, bucket_counts(src.slots, buckets, 2)) * 72

    for memory in (60_000, 90_000, 150_000):
        b = choose_buckets(src, memory, seed=2)
        assert bound(b) <= memory and (b == 1 or bound(b - 1) > memory)
    r = shuffle_run(store, "run", store, "dst", seed=2, memory=60_000)
    assert r.buckets == choose_buckets(src, 60_000, 2) and r.peak_tokens <= r.bound_tokens <= 60_000 // 72
    with pytest.raises(ConfigError, match="memory=20000 bytes cannot hold the shuffle's files") as e:
        choose_buckets(src, 20_000, 2)
    found = re.search(r"pass memory >= (\d+)", str(e.value))
    assert found is not None
    need = int(found.group(1))
    assert bound(choose_buckets(src, need, 2)) <= need  # the advice is enough


KILLED = """
import sys
from activault.storage import open_store
from activault.tools import shuffle
from activault.vault.writer import RunWriter

calls = 0
real = RunWriter.write_file

def counted(self, *a, **k):
    global calls
    if self.run == TARGET:
        calls += 1
        if calls == AT:
            self.flush()
            stop_here()
    return real(self, *a, **k)

RunWriter.write_file = counted
store = open_store(sys.argv[1])
shuffle.shuffle_run(store, "run", store, "dst", seed=4, buckets=BUCKETS)
"""


@pytest.mark.parametrize(
    ("target", "at", "buckets"),
    [("dst/.shuffle", 7, 5), ("dst", 4, 5), ("dst", 12, 5), ("dst", 4, 1)],
    ids=["pass1", "pass2-bucket0", "pass2-later", "one-pass"],
)
def test_a_killed_shuffle_resumes_to_the_same_bytes(
    stores: tuple[Store, Store],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    target: str,
    at: int,
    buckets: int,
) -> None:
    """Killed in pass 1, in pass 2 within bucket 0 (kept in memory: gathered from SRC again) or
    after it, and in a one-pass shuffle."""
    killed, whole = stores
    for s in stores:
        make_source(s)
    env = s3_env(request.getfixturevalue("moto_url")) if isinstance(killed, S3Store) else {}
    code = KILLED.replace("TARGET", repr(target)).replace("AT", str(at)).replace("sys.argv[1]", repr(killed.uri))
    kill_when_reached(code.replace("BUCKETS", str(buckets)), tmp_path / "reached", env)
    assert killed.exists("dst/cfg.json") and not killed.exists("dst/h1/statistics.json")  # killed mid-way
    shuffle_run(killed, "run", killed, "dst", seed=4, buckets=buckets)
    shuffle_run(whole, "run", whole, "dst", seed=4, buckets=buckets)
    assert contents(killed, "dst") == contents(whole, "dst")
    assert Counter(tokens(killed, "dst")) == Counter(tokens(killed, "run"))


def test_bad_inputs_are_refused_before_anything_is_written(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    make_source(store)
    with pytest.raises(ConfigError, match="is SRC or inside it: the shuffle writes a new run; name another DST"):
        shuffle_run(store, "run", store, "run")
    store.put("dst/notes.txt", b"mine")
    with pytest.raises(ConfigError, match="already holds other data: nothing written; name a new DST"):
        shuffle_run(store, "run", store, "dst")
    assert [e.key for e in store.list("dst")] == ["dst/notes.txt"]
    shuffle_run(store, "run", store, "done", seed=3, buckets=2)
    with pytest.raises(ConfigError, match="with seed 3, not 4: rerun with --seed 3 to resume it, or name a new DST"):
        shuffle_run(store, "run", store, "done", seed=4)
    with pytest.raises(ConfigError, match="already holds a run that is not a shuffle of"):
        shuffle_run(store, "done", store, "run")
    # Begun by a version that laid out its buckets otherwise (no plan 2): not resumed over.
    cfg = json.loads(store.get_text("done/cfg.json"))
    del cfg["config"]["shuffled_from"]["plan"]
    store.put("done/cfg.json", json.dumps(cfg).encode())
    with pytest.raises(ConfigError, match="begun by an earlier activault.*name a new DST"):
        shuffle_run(store, "run", store, "done", seed=3)
    with pytest.raises(NotFoundError, match="holds no run"):
        shuffle_run(store, "nothing", store, "new")
    progress = json.loads(store.get_text("run/progress/machine-00001.json"))
    store.put("run/progress/machine-00001.json", json.dumps({**progress, "finished": False}).encode())
    with pytest.raises(ConfigError, match="machine 1 of .* has not finished collecting: shuffle once collection"):
        shuffle_run(store, "run", store, "new")
    assert not store.list("new")


def test_the_command_shuffles_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_synthetic_run(LocalStore(tmp_path, fsync=False), "run", HOOKS, files=2)
    assert main(["shuffle", str(tmp_path / "run"), str(tmp_path / "dst"), "--seed", "2"]) == 0
    assert "uniformly permuted (seed 2, 1 bucket(s)" in capsys.readouterr().out
    assert main(["shuffle", str(tmp_path / "run"), str(tmp_path / "dst"), "--seed", "2"]) == 0
    assert "already a finished shuffle" in capsys.readouterr().out
    assert main(["shuffle", str(tmp_path / "run"), str(tmp_path / "dst"), "--seed", "5"]) == 2


@pytest.fixture(scope="module")
def collected_two(tiny_model_dir, tmp_path_factory) -> Path:
    """A run collected by 2 machines over a local corpus (documents, positions: provenance)."""
    from activault.collection.pipeline import collect
    from support.collecting import make_cfg
    from support.packing import corpus_rows, write_jsonl

    out = tmp_path_factory.mktemp("prov")
    corpus = write_jsonl(out / "corpus.jsonl", corpus_rows()[:25])
    cfg = make_cfg(tiny_model_dir("llama"), out, num_runs=2, data={"data_key": str(corpus), "n_batches": 12})
    for m in range(2):
        collect(cfg, machine=m, show_progress=False)
    return out


def by_token(root: Path, hook: str) -> dict[tuple[int, int, bytes], tuple[str, int, int]]:
    """(token id, position, state bytes) -> (file, row, column) of every real token of a hook."""
    out = {}
    for f in sorted((root / hook).glob("*.safetensors")):
        mb = fmt.decode(f.read_bytes(), f.name)
        for r, c in (mb.positions >= 0).nonzero().tolist():
            key = (int(mb.input_ids[r, c]), int(mb.positions[r, c]), mb.states[r, c].numpy().tobytes())
            out[key] = (f.name, r, c)
    return out


def test_a_shuffled_token_keeps_its_documents_context(collected_two: Path) -> None:
    from activault.tools.context import token_context

    hook = "models.layers.1.post"
    local = LocalStore(collected_two, fsync=False)
    shuffle_run(local, "run", local, "dst", seed=3, buckets=3)
    src, dst = by_token(collected_two / "run", hook), by_token(collected_two / "dst", hook)
    assert set(src) == set(dst)
    rng = np.random.default_rng(0)
    keys = list(dst)
    sample = [keys[i] for i in rng.choice(len(keys), 12, replace=False)]
    machines = set()
    for key in sample:
        a = token_context(str(collected_two / "run"), hook, *src[key], window=6)
        b = token_context(str(collected_two / "dst"), hook, *dst[key], window=6)
        assert (b.machine, b.document, b.position, b.text(), b.ids) == (
            a.machine,
            a.document,
            a.position,
            a.text(),
            a.ids,
        )
        machines.add(a.machine)
    assert machines == {0, 1}  # tokens of both source machines traced back to their own stream


def test_deep_verify_knows_a_shuffled_run_and_finds_tampering(collected_two: Path) -> None:
    local = LocalStore(collected_two, fsync=False)
    shuffle_run(local, "run", local, "dst2", seed=5, buckets=2)
    assert verify_run(local, "dst2", deep=True).problems == []
    # The same files under a record that does not say "shuffled": their order is refused.
    cfg = json.loads(local.get_text("dst2/cfg.json"))
    plain = {**cfg, "config": {k: v for k, v in cfg["config"].items() if k != "shuffled_from"}}
    local.put("dst2/cfg.json", json.dumps(plain).encode())
    assert any("provenance out of order" in p for p in verify_run(local, "dst2", deep=True).problems)
    local.put("dst2/cfg.json", json.dumps(cfg).encode())
    # A token's document duplicated onto another (checksums rewritten): named, in every hook.
    for h in cfg["hooks"]:
        key = f"dst2/{h}/m00000-000000.safetensors"
        mb = fmt.decode(local.get(key), key)
        t = {k: v.clone() for k, v in mb.tensors.items()}
        t["documents"][0, 1], t["positions"][0, 1] = t["documents"][0, 0], t["positions"][0, 0]
        local.put(key, b"".join(fmt.encode(t, mb.metadata)))
    found = [p for p in verify_run(local, "dst2", deep=True).problems if "occurs more than once" in p]
    assert len(found) == len(cfg["hooks"])


def test_the_temporary_run_holds_no_norms_and_dsts_are_its_states_norms(
    stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = stores
    write_synthetic_run(store, "run", HOOKS, machines=2, files=6, documents=True)
    temp: list[tuple[str, bool]] = []  # (format version, holds norms) of each temporary file written
    real = type(store).put

    def spied(self: Store, key: str, data: Any) -> None:
        if "/.shuffle/" in key and key.endswith(fmt.SUFFIX):
            parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
            mb = fmt.decode(b"".join(bytes(p) for p in parts), key, verify_checksums=True)
            assert mb.header is not None
            temp.append((mb.header.metadata["format_version"], fmt.NORMS in mb.tensors))
        real(self, key, data)

    monkeypatch.setattr(type(store), "put", spied)
    r = shuffle_run(store, "run", store, "dst", seed=3, buckets=4)
    assert r.buckets == 4 and len(temp) > 2 * 6 and set(temp) == {("4", False)}  # pieces: format 4, no norms
    names = [e.key for e in store.list("dst/h1") if e.key.endswith(fmt.SUFFIX)]
    assert len(names) == r.files > 0
    for h in HOOKS:
        for name in names:
            mb = fmt.decode(store.get(name.replace("/h1/", f"/{h}/")), name, verify_checksums=True)
            assert mb.header is not None and mb.header.metadata["format_version"] == str(fmt.FORMAT_VERSION)
            assert mb.norms is not None and torch.equal(mb.norms, token_norms(mb.states))  # computed again


def test_a_one_bucket_shuffle_whose_files_stop_mapping_reads_them_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that cannot be mapped (e.g. out of descriptors) is read into a buffer of its own, never
    into one reused while bucket 0 still holds it: the order is the same."""
    from activault.storage import local

    store = LocalStore(tmp_path, fsync=False)
    make_source(store)
    real, calls = local._LocalFile.map, [0]

    def flaky(self: Any) -> Any:
        calls[0] += 1
        return real(self) if calls[0] % 3 else None

    monkeypatch.setattr(local._LocalFile, "map", flaky)
    r = shuffle_run(store, "run", store, "dst", seed=6, memory=150_000)
    assert r.buckets == 1 and calls[0] >= 24 * len(HOOKS)  # every source file was to be mapped
    check_order(store, 1, 6)


@pytest.mark.parametrize("codec", ["zstd", "fp8"])
def test_dst_is_stored_with_the_sources_codec_and_the_same_values(stores: tuple[Store, Store], codec: str) -> None:
    """A compressed source gives a DST stored the same way (was: raw, 1.45-2.3x the bytes), whose
    tokens are the source's decoded ones, bit for bit (fp8 too: encoding decoded fp8 values again
    picks the same scales and codes)."""
    from activault.tools.recompress import recompress_run
    from activault.vault import codec as codecs

    store, _ = stores
    make_source(store)
    recompress_run(store, "run", codecs.Codec(codec))
    shuffle_run(store, "run", store, "dst", seed=3, buckets=4)
    assert Counter(tokens(store, "dst")) == Counter(tokens(store, "run"))
    for h in HOOKS:
        meta = json.loads(store.get_text(f"dst/{h}/metadata.json"))
        assert meta["compression"]["codec"] == codec
        for e in store.list(f"dst/{h}"):
            if e.key.endswith(fmt.SUFFIX):
                header = fmt.parse_header(bytes(store.get(e.key)), e.key)
                assert json.loads(header.metadata[fmt.CODECS_KEY])["states"]["codec"] == codec
    assert verify_run(store, "dst", deep=True).problems == []
