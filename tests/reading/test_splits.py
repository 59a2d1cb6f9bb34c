"""Held-out splits by document: disjoint and covering, the asked fraction, the same for every reader,
rank and resume, composed with the filters; files without provenance refused."""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from activault.errors import ConfigError
from activault.reading.options import ReadOptions, TokenFilter
from activault.reading.rcache import RCache
from activault.reading.splits import Split, document_hashes
from activault.reading.tokens import TokenLoader
from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from activault.vault import records
from support.synth import SynthRun, s3_env, write_synthetic_run

HOOKS = ["h1", "h2"]
Token = tuple[str, int, int]  # (file name, row, column)


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def docs_run(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str | Store, SynthRun]:
    """A two-hook run with provenance on two machines (about 190 documents): its folder, locally or on moto."""
    shape = dict(machines=2, files=5, rows=8, seq=32, documents=True)
    if request.param == "local":
        return str(tmp_path / "r"), write_synthetic_run(LocalStore(tmp_path), "r", HOOKS, **shape)  # type: ignore[arg-type]
    env = s3_env(request.getfixturevalue("moto_url"))
    store = S3Store(f"s3://{request.getfixturevalue('moto_bucket')}", env=env)
    return S3Store(store.url("r"), env=env), write_synthetic_run(store, "r", HOOKS, **shape)  # type: ignore[arg-type]


def splitmix(x: int) -> int:
    """splitmix64's finaliser in Python integers: the reference the numpy version must equal."""
    m = (1 << 64) - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def reference_hash(machine: int, ordinal: int, seed: int) -> int:
    m = (1 << 64) - 1
    key = splitmix(splitmix((seed & m) ^ 0x9E3779B97F4A7C15) ^ machine)
    return splitmix((ordinal & m) ^ key)


def documents_of(run: SynthRun) -> dict[Token, tuple[int, int]]:
    """(file, row, column) -> (machine, ordinal) of every real token of the run."""
    out = {}
    for name in run.names:
        machine = records.parse_file_name(name)[0]  # type: ignore[index]
        docs = run.files["h1"][name]["documents"]
        for r, c in (docs >= 0).nonzero().tolist():
            out[name, r, c] = (machine, int(docs[r, c]))
    return out


def loader_tokens(loader: TokenLoader) -> list[Token]:
    """The (file, row, column) of every token the loader yields, in order."""
    out = []
    for b in loader:
        for f, r, c in b["index"].tolist():
            out.append((loader.indexed_file(f)[1], r, c))
    return out


def test_the_hash_is_splitmix_of_the_pair_in_any_process() -> None:
    ordinals = np.array([0, 1, 2, 5, 2**40, 2**62], np.int64)
    for machine, seed in ((0, 0), (3, 7), (99999, -5)):
        got = document_hashes(machine, ordinals, seed).tolist()
        assert got == [reference_hash(machine, int(o), seed) for o in ordinals]
    # 100,000 documents: the fraction in test is the asked one, to sampling error (sd 0.0009)
    many = np.arange(100_000, dtype=np.int64)
    for fraction in (0.01, 0.1, 0.5):
        test = document_hashes(1, many, 0) < Split("test", fraction, 0).threshold
        assert abs(test.mean() - fraction) < 0.005
    assert not np.array_equal(document_hashes(1, many, 0), document_hashes(1, many, 1))  # the seed matters
    assert not np.array_equal(document_hashes(0, many, 0), document_hashes(1, many, 0))  # and the machine


def test_train_and_test_are_disjoint_and_cover_every_token_by_document(
    docs_run: tuple[str | Store, SynthRun],
) -> None:
    uri, run = docs_run
    truth = documents_of(run)
    sides = {}
    for side in ("train", "test"):
        loader = TokenLoader(uri, hooks=HOOKS, batch_tokens=16, drop_last=False, return_index=True, split=side)
        got = loader_tokens(loader)
        assert len(got) == len(set(got))  # each token once
        sides[side] = set(got)
        assert loader.filtered["split"] == len(truth) - len(got)
    assert not sides["train"] & sides["test"]
    assert sides["train"] | sides["test"] == set(truth)  # every real token, padding never
    docs = {side: {truth[t] for t in toks} for side, toks in sides.items()}
    assert not docs["train"] & docs["test"] and docs["test"]  # no document on both sides
    for machine, ordinal in docs["test"]:  # test: the hash below the fraction (default 0.01 of 2^64)
        assert reference_hash(machine, ordinal, 0) < 0.01 * 2**64


def test_the_fraction_of_documents_in_test_is_the_asked_one(tmp_path: Path) -> None:
    # About 2,800 documents; the fraction's sd is 0.008 at 0.2.
    run = write_synthetic_run(
        LocalStore(tmp_path), "r", ["h1"], machines=3, files=6, rows=16, seq=64, d=2, documents=True
    )
    everything = set(documents_of(run).values())
    cache = RCache(tmp_path / "r/h1", return_ids=True, split="test", test_fraction=0.2, split_seed=3)
    test = set()
    for f, item in zip(cache.files.order(0), cache, strict=True):
        machine = records.parse_file_name(f.name)[0]  # type: ignore[index]
        test |= {(machine, int(d)) for d in item["documents"][item["keep"]].unique()}
    assert len(everything) > 2500 and abs(len(test) / len(everything) - 0.2) < 0.03


def test_rcache_masks_the_documents_token_loader_keeps(docs_run: tuple[str | Store, SynthRun]) -> None:
    uri, run = docs_run
    loader = TokenLoader(uri, hooks=HOOKS, batch_tokens=8, drop_last=False, return_index=True, split="test")
    want = set(loader_tokens(loader))
    cache = RCache(uri, hooks=HOOKS, return_ids=True, split="test", shuffle=False)
    got = set()
    for name, item in zip([f.name for f in cache.files.order(0)], cache, strict=True):
        got |= {(name, r, c) for r, c in item["keep"].nonzero().tolist()}
        # the same documents as the stored ones, masked where the split leaves them out
        assert torch.equal(item["documents"], run.files["h1"][name]["documents"])
    assert got == want and cache.filtered["split"] == loader.filtered["split"]


def test_the_split_is_the_same_for_every_rank_and_resume(docs_run: tuple[str | Store, SynthRun]) -> None:
    uri, _ = docs_run
    opts = dict(hooks=HOOKS, batch_tokens=8, drop_last=False, return_index=True, split="train", window=2, seed=4)
    one = loader_tokens(TokenLoader(uri, **opts))  # type: ignore[arg-type]
    ranks = [loader_tokens(TokenLoader(uri, rank=r, world_size=2, **opts)) for r in range(2)]  # type: ignore[arg-type]
    assert sorted(ranks[0] + ranks[1]) == sorted(one) and not set(ranks[0]) & set(ranks[1])
    first = TokenLoader(uri, **opts)  # type: ignore[arg-type]
    with first:
        head = [b["index"].clone() for b in islice(first, 3)]
        state = first.state_dict()
    again = TokenLoader(uri, **opts)  # type: ignore[arg-type]
    again.load_state_dict(state)
    rest = [(again.indexed_file(f)[1], r, c) for b in again for f, r, c in b["index"].tolist()]
    resumed = [(first.indexed_file(f)[1], r, c) for b in head for f, r, c in b.tolist()] + rest
    assert resumed == one
    other = TokenLoader(uri, **{**opts, "split": "test"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="state was saved with split .*'train'.* this loader has .*'test'"):
        other.load_state_dict(state)
    unsplit = TokenLoader(uri, **{**opts, "split": None})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="same split, test_fraction and split_seed"):
        unsplit.load_state_dict(state)


def test_the_split_composes_with_the_filters(tmp_path: Path) -> None:
    write_synthetic_run(LocalStore(tmp_path), "r", HOOKS, machines=2, files=4, documents=True)
    opts = dict(hooks=HOOKS, batch_tokens=4, drop_last=False, return_index=True, split_seed=1, test_fraction=0.4)
    split = TokenLoader(tmp_path / "r", split="train", **opts)  # type: ignore[arg-type]
    filt = TokenLoader(tmp_path / "r", token_filter=TokenFilter(first=2, drop_ids=range(0, 1000, 3)), **opts)  # type: ignore[arg-type]
    both = TokenLoader(  # type: ignore[arg-type]
        tmp_path / "r", split="train", token_filter={"first": 2, "drop_ids": range(0, 1000, 3)}, **opts
    )
    a, b, c = (set(loader_tokens(x)) for x in (split, filt, both))
    assert c == a & b and c and a - c and b - c
    # The split is counted first; the filters count the split's own tokens.
    assert both.filtered["split"] == split.filtered["split"]
    assert both.filtered["first"] + both.filtered["ids"] == len(a) - len(c)


def test_files_without_provenance_are_refused_naming_the_file(tmp_path: Path) -> None:
    write_synthetic_run(LocalStore(tmp_path), "r", HOOKS)  # format version 3: no documents
    a_file = re.escape(f"{tmp_path}/r/h1/") + r"m\d{5}-\d{6}\.safetensors"
    for make in (
        lambda: list(TokenLoader(tmp_path / "r", hooks=HOOKS, batch_tokens=8, split="test")),
        lambda: list(RCache(tmp_path / "r", hooks=HOOKS, split="train", skip_bad_files=True)),
    ):
        with pytest.raises(ConfigError, match=f"{a_file} was written before provenance.*split=.*without split"):
            make()
    assert len(list(RCache(tmp_path / "r", hooks=HOOKS, return_ids=True))) == 3  # unsplit: read as before
    assert next(iter(RCache(tmp_path / "r/h1", return_ids=True)))["documents"] is None


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("split", "val", '"train", "test", or None'),
        ("split", True, '"train", "test", or None'),
        ("test_fraction", 0, "between 0 and 1, both excluded"),
        ("test_fraction", 1.0, "between 0 and 1, both excluded"),
        ("test_fraction", True, "between 0 and 1, both excluded"),
        ("test_fraction", "0.1", "between 0 and 1, both excluded"),
        ("split_seed", 1.5, "a whole number"),
    ],
)
def test_split_options_are_validated(field: str, value: object, accepted: str) -> None:
    with pytest.raises(ConfigError, match=f"{field}=.* is not accepted: {field} must be .*{accepted}"):
        ReadOptions(**{field: value})  # type: ignore[arg-type]
    opts = ReadOptions(split="test", test_fraction=0.25, split_seed=2)
    assert opts.held_out == Split("test", 0.25, 2) and ReadOptions().held_out is None
