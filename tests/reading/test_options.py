"""ReadOptions: one validated value from the public constructors down to FileStream and the Catalog;
garbage (a mistyped name, a value of the wrong type or range) is one ConfigError naming it."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import pytest
import torch

from activault import ActivationDataset, RCache, S3RCache, TokenLoader
from activault.errors import ConfigError
from activault.reading import options as options_module
from activault.reading.options import FIELDS, ReadArgs, ReadOptions, TokenFilter, keywords, read_options
from activault.storage import STORE_OPTIONS, LocalStore
from support.synth import SynthRun

WHOLE = {  # numeric options: garbage, and the phrase of what each accepts
    "buffer_size": "a whole number >= 1",
    "range_size": "a positive number of bytes",
    "world_size": "a whole number >= 1",
    "rank": r"a whole number in \[0, world_size=1\)",
}
NOT_WHOLE: list[Any] = [0, -1, 2.5, 4.0, True, False, "4", None]


def garbage() -> list[tuple[str, Any]]:
    out = [(name, bad) for name in WHOLE for bad in NOT_WHOLE if not (name == "rank" and bad in (0, False))]
    out += [("seed", bad) for bad in (1.5, True, "7", None)]
    out += [(name, bad) for name in ("skip_bad_files", "verify_checksums") for bad in ("false", 0, 1, None)]
    out += [("preserve_file_order", bad) for bad in ("false", 0, 1)]
    return [(n, b) for n, b in out if not (n == "range_size" and b is None)]  # None: the default


@pytest.mark.parametrize(("name", "bad"), garbage())
def test_each_bad_value_is_one_error_naming_the_field_value_and_what_is_accepted(name: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{name}={bad!r}')} is not accepted: {name} must be"):
        ReadOptions(**{name: bad})


@pytest.mark.parametrize(("name", "bad"), [g for g in garbage() if g[0] in ("buffer_size", "rank", "range_size")])
def test_the_public_constructors_refuse_it_before_any_io(tmp_path: Path, name: str, bad: Any) -> None:
    """The same message through every constructor, before anything is listed (the path does not exist)."""
    gone = tmp_path / "no-such-run/h"
    match = f"^{re.escape(f'{name}={bad!r}')} is not accepted"
    for make in (
        lambda: RCache(gone, **{name: bad}),
        lambda: TokenLoader(gone, batch_tokens=8, **{name: bad}),
        lambda: ActivationDataset(gone, batch_tokens=8, **{name: bad}),
        lambda: S3RCache("run/h", bucket_name="b", **{name: bad}),
    ):
        with pytest.raises(ConfigError, match=match):
            make()


def test_accepted_values_are_normalised_and_the_value_is_frozen() -> None:
    opts = ReadOptions(buffer_size=np.int64(3), rank=np.int32(1), world_size=2, range_size=1 << 20)
    assert (opts.buffer_size, opts.rank, opts.world_size) == (3, 1, 2) and type(opts.buffer_size) is int
    assert ReadOptions(seed=-5).seed == -5 and ReadOptions().store_options == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.buffer_size = 4  # type: ignore[misc]
    secret = ReadOptions(store_options={"env": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}})
    assert "s3cr3t" not in repr(secret) and hash(secret) == hash(ReadOptions())
    assert pickle.loads(pickle.dumps(secret)) == secret  # DataLoader workers receive it
    with pytest.raises(
        ConfigError, match=r"rank=2 is not accepted: rank must be a whole number in \[0, world_size=2\)"
    ):
        ReadOptions(rank=2, world_size=2)


def test_every_field_is_documented_and_a_typed_keyword() -> None:
    assert tuple(get_type_hints(ReadArgs)) == FIELDS
    text = Path(options_module.__file__).read_text()
    for name in FIELDS:  # an attribute docstring right under each field
        assert re.search(rf"\n    {name}: [^\n]+\n    \"\"\"", text), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("unsigned", "store_options='unsigned' is not accepted: store_options must be a dict"),
        ({1: "s3cr3t"}, "^store_options key 1 is not accepted: store options are named by strings$"),
        ({"unsinged": True}, "unknown store option.*'unsinged'.*the local store takes fsync, map_reads; the S3"),
        ({"fsync": False, "retries": 3}, r"unknown store option\(s\) 'retries':.*the S3 store takes env, unsigned"),
    ],
)
def test_store_options_of_no_store_are_refused_on_construction(options: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReadOptions(store_options=options)


def test_store_options_the_local_store_does_not_take_are_an_error(run: SynthRun, local: LocalStore) -> None:
    uri = local.url("run/h1")
    with pytest.raises(ConfigError, match=r"'unsigned' \(unsigned: for another kind of store\): the local store takes"):
        RCache(uri, store_options={"unsigned": True})
    with pytest.raises(ConfigError, match="local store option map_reads must be True or False, got 'no'"):
        TokenLoader(uri, batch_tokens=8, store_options={"map_reads": "no"})
    with pytest.raises(ConfigError, match="every source here is a Store already: pass them to its constructor"):
        RCache(LocalStore(local.path_of("run/h1")), store_options={"map_reads": False})
    cache = RCache(uri, store_options={"map_reads": False, "fsync": False})
    assert cache.files.catalog.prefixes[0].store.map_reads is False  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("make", "owner", "hint"),
    [
        (lambda u: RCache(u, bufer_size=3), "RCache", "buffer_size"),
        (lambda u: RCache(u, shufle=True), "RCache", "shuffle"),
        (lambda u: TokenLoader(u, batch_tokens=8, windw=2), "TokenLoader", "window"),
        (lambda u: TokenLoader(u, batch_tokens=8, store_option={}), "TokenLoader", "store_options"),
        (lambda u: ActivationDataset(u, batch_tokens=8, windw=2), "ActivationDataset", "window"),
        (lambda u: ActivationDataset(u, shuffel=True), "ActivationDataset", "shuffle"),
        (lambda u: S3RCache("r/h", bucket_name="b", verify_checksum=True), "S3RCache", "verify_checksums"),
    ],
)
def test_a_mistyped_reader_option_is_named_with_what_is_accepted(tmp_path: Path, make: Any, owner: str, hint: str):
    with pytest.raises(
        ConfigError, match=f"^{owner} has no option '.*' \\(did you mean '{hint}'\\?\\); it accepts"
    ) as e:
        make(tmp_path / "r/h")  # refused before anything is listed
    assert "options=ReadOptions(...) and the reading options buffer_size, preserve_file_order" in str(e.value)


def test_options_object_and_keywords_build_one_value(run: SynthRun, tmp_path: Path) -> None:
    base = ReadOptions(buffer_size=3, seed=5, verify_checksums=True)
    cache = RCache(tmp_path / "run/h1", options=base, buffer_size=4)  # keywords override its fields
    assert cache.files.options == dataclasses.replace(base, buffer_size=4, preserve_file_order=True)
    assert (cache.files.buffer_size, cache.seed, cache.files.verify_checksums) == (4, 5, True)
    loader = TokenLoader(tmp_path / "run/h1", batch_tokens=8, options=base)
    assert loader.files.options.preserve_file_order is False  # TokenLoader's default order: shuffled
    kept = TokenLoader(tmp_path / "run/h1", batch_tokens=8, preserve_file_order=True)
    assert kept.files.order(0) == RCache(tmp_path / "run/h1").files.order(0)
    with pytest.raises(ConfigError, match="options={'buffer_size': 3} is not accepted: options must be a ReadOptions"):
        RCache(tmp_path / "run/h1", options={"buffer_size": 3})  # type: ignore[arg-type]
    read, rest = read_options("X", base, {"window": 2, "seed": 1}, own=["window"])
    assert read == dataclasses.replace(base, seed=1) and rest == {"window": 2}


def test_activation_dataset_checks_everything_on_construction(run: SynthRun, tmp_path: Path) -> None:
    uri = str(tmp_path / "run/h1")
    with pytest.raises(ConfigError, match="^batch_tokens=0 is not accepted"):
        ActivationDataset(uri, batch_tokens=0)
    ds = ActivationDataset(uri, options=ReadOptions(rank=1, world_size=2), return_ids=True)
    assert (ds.rank, ds.world_size, ds.reader_options) == (1, 2, {"return_ids": True})
    ids = [b["input_ids"] for b in ds]
    assert torch.equal(
        torch.cat(ids), torch.cat([b["input_ids"] for b in RCache(uri, rank=1, world_size=2, return_ids=True)])
    )


@pytest.mark.parametrize(
    ("kw", "name", "bad"),
    [
        *((dict(batch_tokens=b), "batch_tokens", b) for b in (0, -8, 8.0, True, "8")),
        *((dict(batch_tokens=8, window=b), "window", b) for b in (0, 1.5, False, "2")),
        *((dict(batch_tokens=8, drop_positions_below=b), "drop_positions_below", b) for b in (-1, 0.5, "1")),
        *(
            (dict(batch_tokens=8, norm_target=b), "norm_target", b)
            for b in (0, -1.0, float("nan"), float("inf"), True, "1")
        ),
        *((dict(batch_tokens=8, center=b), "center", b) for b in ("yes", 1)),
        *((dict(batch_tokens=8, dtype=b), "dtype", b) for b in ("float32", np.float32)),
    ],
)
def test_token_loader_numbers_and_flags_are_checked(tmp_path: Path, kw: dict[str, Any], name: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{name}={bad!r}')} is not accepted: {name} must be"):
        TokenLoader(tmp_path / "nothing-here", **kw)


def test_store_option_lists_match_the_store_signatures() -> None:
    from activault.storage.s3 import S3Store

    assert tuple(keywords(LocalStore.__init__, "root")) == STORE_OPTIONS["file"]
    assert tuple(keywords(S3Store.__init__, "uri")) == STORE_OPTIONS["s3"]


def test_read_options_are_public() -> None:
    import activault

    assert activault.ReadOptions is ReadOptions and "ReadOptions" in activault.__all__


def test_token_filters_are_validated_and_fold_in_the_aliases() -> None:
    f = TokenFilter(positions_below=1, first=2, drop_ids=[1, 2, 2], max_norm_ratio=50)
    assert f.drop_ids == frozenset({1, 2}) and f.max_norm_ratio == 50.0 and f.active and not TokenFilter().active
    assert f.describe() == {"positions_below": 1, "first": 2, "drop_ids": [1, 2], "max_norm_ratio": 50.0}
    assert ReadOptions(token_filter={"first": 2}).token_filter == TokenFilter(first=2)  # from YAML
    assert ReadOptions(drop_nonfinite=True).tokens == TokenFilter(nonfinite=True)  # the alias, folded in
    assert ReadOptions(drop_nonfinite=True, token_filter=f).tokens == dataclasses.replace(f, nonfinite=True)
    for bad, match in [
        (dict(first=-1), "first=-1 is not accepted"),
        (dict(drop_ids="12"), "drop_ids='12' is not accepted: drop_ids must be a set of token ids"),
        (dict(drop_ids=[3, -1]), "drop_ids=-1 is not accepted"),
        (dict(positions_below=4, positions_from=4), "positions_from=4 is not accepted: .*> positions_below=4"),
        (dict(max_norm_ratio=0), "max_norm_ratio=0 is not accepted: max_norm_ratio must be a finite number > 0"),
        (dict(nonfinite="yes"), "nonfinite='yes' is not accepted"),
    ]:
        with pytest.raises(ConfigError, match=match):
            TokenFilter(**bad)
    with pytest.raises(ConfigError, match="token_filter has no field 'frist'; a TokenFilter has positions_below"):
        ReadOptions(token_filter={"frist": 1})
    with pytest.raises(ConfigError, match="token_filter=3 is not accepted"):
        ReadOptions(token_filter=3)  # type: ignore[arg-type]
