"""The shell's folder checks on both stores: `filecount` names a hook missing a file, `sizecheck` an
odd size apart from a machine's partial last file, and a compressed hook's varying sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from activault.tools.recompress import recompress_run
from activault.tools.shell_checks import filecount, megabatch_sizes, sizecheck
from activault.vault import codec as codecs
from support.synth import SynthRun, s3_env, write_synthetic_run

HOOKS = ["h1", "h2"]


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, SynthRun]:
    """A run of 2 machines x 2 files in each hook, on each kind of store."""
    if request.param == "local":
        store: Store = LocalStore(tmp_path / "vault", fsync=False)
    else:
        url, bucket = request.getfixturevalue("moto_url"), request.getfixturevalue("moto_bucket")
        store = S3Store(f"s3://{bucket}", env=s3_env(url))
    return store, write_synthetic_run(store, "run", HOOKS, machines=2, files=2)


def lines(check, store: Store, cwd: str) -> list[str]:
    return list(check(store, cwd, *store.list_dir(cwd)))


def test_filecount_flags_the_hook_missing_a_file(vault) -> None:
    store, run = vault
    assert not any("❌" in ln for ln in lines(filecount, store, "run"))
    store.delete(f"run/{HOOKS[1]}/{run.names[1]}")
    out = lines(filecount, store, "run")
    h1, h2 = (next(ln for ln in out if ln.startswith(f"{h}/")) for h in HOOKS)
    assert "4 megabatches" in h1 and "❌" not in h1
    assert "3 megabatches" in h2 and "❌ differs (expected 4)" in h2 and f"missing {run.names[1]}" in h2
    assert lines(filecount, store, f"run/{HOOKS[0]}") == [f"no subfolders; {len(run.names) + 2} files here"]


def test_sizecheck_tells_an_odd_size_from_a_partial_last_file(vault) -> None:
    store, run = vault
    odd, last = f"run/{HOOKS[0]}/{run.names[0]}", f"run/{HOOKS[0]}/{run.names[3]}"  # machine 1's last file
    store.put(odd, bytes(store.get(odd)) + b"extra")
    store.put(last, bytes(store.get(last))[:-10])
    out = lines(sizecheck, store, "run")
    assert any(ln.startswith(f"{HOOKS[0]}/") and "4 megabatches" in ln and "(2 differ)" in ln for ln in out), out
    assert any(f"❌ {run.names[0]}" in ln and "odd size" in ln for ln in out)
    assert any(f"⚠️  {run.names[3]}" in ln and "last file of its machine (partial)" in ln for ln in out)
    assert any(ln.startswith(f"{HOOKS[1]}/") and "differ" not in ln for ln in out)
    common, found = megabatch_sizes(store.list_dir(f"run/{HOOKS[0]}")[1])
    assert common == store.size(f"run/{HOOKS[0]}/{run.names[1]}")
    assert sorted(why for _, _, why in found) == ["last file of its machine (partial)", "odd size"]
    assert lines(sizecheck, store, "") == ["no megabatches here or one level down"]


def test_sizecheck_says_compressed_sizes_vary(vault) -> None:
    store, _ = vault
    recompress_run(store, "run", codecs.Codec("zstd"))
    out = lines(sizecheck, store, "run")
    assert len(out) == len(HOOKS) and all("zstd-compressed: sizes vary" in ln for ln in out), out
