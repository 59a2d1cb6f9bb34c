"""Collection to and reading from real S3 servers (moto, s3rver) equals the local store byte for byte,
through outages, a fault-injecting proxy and permanent errors; bad settings give one clear message."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from activault import cli
from activault.collection.pipeline import collect
from activault.collection.plan import cost_notes, is_local_endpoint
from activault.errors import ConfigError, NotFoundError, StorageError
from activault.reading.rcache import RCache
from activault.storage import LocalStore, open_store
from activault.storage import s3 as s3mod
from activault.storage.base import ObjectChanged
from activault.storage.s3 import S3Store
from activault.vault.megabatch import decode
from support.collecting import make_cfg, tree_bytes
from support.s3servers import FaultProxy, S3Server, free_port, start_server
from support.synth import make_public, s3_env, write_synthetic_run

pytestmark = pytest.mark.s3
HOOKS = ["models.layers.1.post", "models.layers.0.mlp.post"]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory) -> dict[str, bytes]:
    """Every file of the same config collected to the local store."""
    out = tmp_path_factory.mktemp("local")
    collect(make_cfg(llama, out), show_progress=False)
    return tree_bytes(out / "run")


@pytest.fixture(scope="module", params=["moto", "s3rver"])
def server(request, tmp_path_factory) -> Iterator[S3Server]:
    srv = start_server(request.param, tmp_path_factory.mktemp(f"{request.param}-data"))
    yield srv
    srv.stop()


@pytest.fixture
def moto_bucket(moto: S3Server, moto_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's fresh moto bucket, with this process's environment pointing at moto."""
    use_env(monkeypatch, moto.env())
    return moto_bucket


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k in list(os.environ):
        if k.startswith("AWS_") or k.startswith("S3_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def bucket(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    use_env(monkeypatch, server.env())
    return name


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeouts so stalls and outages are seen in seconds (production waits minutes)."""
    monkeypatch.setattr(s3mod, "TIMEOUT", "1500ms")
    monkeypatch.setattr(s3mod, "CONNECT_TIMEOUT", "1s")
    monkeypatch.setattr(s3mod, "RETRY_TIMEOUT", timedelta(seconds=40))


def s3_cfg(llama: Path, storage: str | None, **over):
    cfg = make_cfg(llama, Path("unused"), **over)
    cfg.storage = storage
    return cfg


def stored(server: S3Server, bucket: str) -> dict[str, bytes]:
    """The run's objects keyed like tree_bytes (cfg.json without `storage`)."""
    out = {k.removeprefix("run/"): v for k, v in sorted(server.objects(bucket).items()) if k.startswith("run/")}
    rec = json.loads(out["cfg.json"])
    rec["config"].pop("storage")
    rec["config"]["data_config"]["bucket_name"] = None
    out["cfg.json"] = json.dumps(rec).encode()
    return out


def assert_same(server: S3Server, bucket: str, reference: dict[str, bytes]) -> None:
    got = stored(server, bucket)
    assert sorted(got) == sorted(reference)
    for k in reference:
        assert got[k] == reference[k], k
    if server.name == "moto":  # s3rver has no ListMultipartUploads
        assert server.multipart_uploads(bucket) == []


def is_megabatch_put(method: str, path: str) -> bool:
    return method == "PUT" and ".safetensors" in path


def test_collect_then_read_equals_local(server, bucket, llama, reference, caplog, capsys) -> None:
    """Bucket from data_config.bucket_name (no storage): objects equal the local run's bytes."""
    caplog.set_level(logging.INFO)
    cfg = s3_cfg(llama, None, data={"bucket_name": bucket})
    result = collect(cfg, show_progress=False)
    assert result.destination == f"s3://{bucket}/run"
    assert_same(server, bucket, reference)
    # Read back through the reader: the same tensors as the local files.
    with RCache(f"s3://{bucket}/run", hooks=HOOKS, return_ids=True) as cache:
        got = list(cache)
    for h in HOOKS:
        names = sorted(k for k in reference if k.startswith(h + "/") and k.endswith(".safetensors"))
        want = [decode(reference[n], n).tensors for n in names]
        assert torch.equal(torch.cat([b["states"][h] for b in got]), torch.cat([w["states"] for w in want]))
        assert torch.equal(torch.cat([b["input_ids"] for b in got]), torch.cat([w["input_ids"] for w in want]).long())
    # A second run of the same command finds the machine finished and changes nothing.
    collect(cfg, show_progress=False)
    assert_same(server, bucket, reference)
    out = caplog.text + capsys.readouterr().err
    assert "s3://" + bucket in out and "uploading" not in out  # loopback: no cost warning
    assert server.secret_key not in out
    if server.name == "moto":  # s3rver's secret is its (public) key name
        assert all(server.secret_key.encode() not in v for v in server.objects(bucket).values())


def test_server_restart_during_collection(server, bucket, llama, reference, fast_retries) -> None:
    """The server goes away after the second megabatch upload starts and comes back 2 s later."""
    puts = []

    def outage(method: str, path: str) -> None:
        if is_megabatch_put(method, path):
            puts.append(path)
            if len(puts) == 2:
                if server.name == "s3rver":  # keeps its objects on disk: a real stop and start
                    server.stop()
                    threading.Timer(2.0, server.start).start()
                else:  # moto keeps objects in memory only: the proxy plays the outage
                    proxy.down = True
                    threading.Timer(2.0, lambda: setattr(proxy, "down", False)).start()

    with FaultProxy(server.url, on_request=outage) as proxy:
        os.environ["S3_ENDPOINT_URL"] = proxy.url
        collect(s3_cfg(llama, f"s3://{bucket}"), show_progress=False)
    time.sleep(0.1)
    assert len(puts) >= 2
    assert_same(server, bucket, reference)


def test_permanent_error_stops_and_same_command_resumes(
    server, bucket, llama, reference, fast_retries, monkeypatch
) -> None:
    monkeypatch.setattr(s3mod, "MAX_RETRIES", 2)
    monkeypatch.setattr(s3mod, "RETRY_TIMEOUT", timedelta(seconds=3))
    puts = []

    def fail_from_third(method: str, path: str) -> None:
        if is_megabatch_put(method, path):
            puts.append(path)
            if len(puts) == 3:
                proxy.down = True

    cfg = s3_cfg(llama, f"s3://{bucket}")
    with FaultProxy(server.url, on_request=fail_from_third) as proxy:
        os.environ["S3_ENDPOINT_URL"] = proxy.url
        with pytest.raises(StorageError, match="run the same command again"):
            collect(cfg, show_progress=False)
        # Whatever reached the store is consistent: no record, or one that is not finished.
        rec = server.objects(bucket).get("run/progress/machine-00000.json")
        assert rec is None or not json.loads(rec)["finished"]
        proxy.down = False
        collect(cfg, show_progress=False)
    assert_same(server, bucket, reference)


def test_fault_proxy_everything_retried(moto, moto_bucket, llama, reference, fast_retries) -> None:
    """503 SlowDown, connection resets and stalls past the timeout on a quarter of the requests."""
    with FaultProxy(moto.url, rate=0.25, seed=3, stall_s=2.0, skip=3) as proxy:
        os.environ["S3_ENDPOINT_URL"] = proxy.url
        collect(s3_cfg(llama, f"s3://{moto_bucket}"), show_progress=False)
    assert all(proxy.counts[f] > 0 for f in ("503", "reset", "stall")), proxy.counts
    assert_same(moto, moto_bucket, reference)


def test_multipart_parts_retried_and_failed_upload_aborted(moto, moto_bucket, fast_retries, monkeypatch) -> None:
    data = os.urandom(13 << 20)
    opts: dict[str, Any] = {"part_size": 5 << 20, "multipart_threshold": 6 << 20, "part_concurrency": 3}
    with FaultProxy(moto.url, rate=0.5, faults=("503", "reset"), seed=1) as proxy:
        store = S3Store(f"s3://{moto_bucket}/p", env=moto.env(proxy.url), **opts)
        store.put("big", [memoryview(data[:100]), memoryview(data[100:])])
    assert proxy.counts["503"] + proxy.counts["reset"] > 0
    assert bytes(S3Store(f"s3://{moto_bucket}/p", env=moto.env()).get("big")) == data
    # Every part upload fails: the run gets the error, and the upload is aborted (no hidden parts).
    monkeypatch.setattr(s3mod, "MAX_RETRIES", 1)
    with FaultProxy(moto.url, rate=1.0, faults=("503",), when=lambda m, p: m == "PUT" and "partNumber" in p) as proxy:
        store = S3Store(f"s3://{moto_bucket}/p", env=moto.env(proxy.url), **opts)
        with pytest.raises(StorageError, match="cannot upload s3://.*/p/big2"):
            store.put("big2", [memoryview(data)])
    assert moto.multipart_uploads(moto_bucket) == []
    assert S3Store(f"s3://{moto_bucket}/p", env=moto.env()).size("big2") is None


def _cli_collect(tmp_path: Path, llama: Path, storage: str, monkeypatch, capsys) -> tuple[int, str, float]:
    import activault.collection.model

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the storage check")

    monkeypatch.setattr(activault.collection.model, "load_model", no_weights)
    raw = s3_cfg(llama, storage).to_public_dict()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.monotonic()
    rc = cli.main(["collect", "--config", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err, time.monotonic() - t0


def test_bad_settings_give_one_clear_message(server, bucket, llama, tmp_path, monkeypatch, capsys) -> None:
    secret = server.secret_key
    rc, err, _ = _cli_collect(tmp_path, llama, "s3://no-such-bucket-x1", monkeypatch, capsys)
    assert rc == 2 and "bucket 'no-such-bucket-x1' does not exist" in err, err
    if server.name == "s3rver":  # moto accepts any credentials; s3rver checks the key id
        use_env(
            monkeypatch, {**server.env(), "AWS_ACCESS_KEY_ID": "WRONGKEY", "AWS_SECRET_ACCESS_KEY": "wrong-secret-5a1e"}
        )
        rc, err, _ = _cli_collect(tmp_path, llama, f"s3://{bucket}", monkeypatch, capsys)
        assert rc == 2 and "refused" in err and "AWS_SECRET_ACCESS_KEY" in err, err
        assert "wrong-secret-5a1e" not in err
    use_env(monkeypatch, {"S3_ENDPOINT_URL": server.url})
    rc, err, _ = _cli_collect(tmp_path, llama, f"s3://{bucket}", monkeypatch, capsys)
    assert rc == 2 and "no S3 credentials" in err, err
    use_env(monkeypatch, {**server.env(), "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    rc, err, seconds = _cli_collect(tmp_path, llama, f"s3://{bucket}", monkeypatch, capsys)
    assert rc == 2 and "cannot reach the S3 endpoint" in err and seconds < 15, (err, seconds)
    if server.name == "moto":
        assert secret not in err


def test_no_credentials_are_named_before_any_request(moto, moto_bucket, tmp_path, monkeypatch, capsys) -> None:
    """No AWS_* keys, no ~/.aws: one message naming what is missing and how to give it, and no request
    sent (they used to go out unsigned, a 503 retried for the whole budget); anonymous access, asked
    for by the store option or AWS_SKIP_SIGNATURE, still works."""
    S3Store(f"s3://{moto_bucket}", env=moto.env()).put("run/cfg.json", b"{}")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ACTIVAULT_S3_RETRY_TIMEOUT", "1")
    with FaultProxy(moto.url, rate=1.0, faults=("503",)) as proxy:
        use_env(monkeypatch, {"S3_ENDPOINT_URL": proxy.url})
        missing = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set; set both in the environment"
        with pytest.raises(StorageError, match=f"no S3 credentials for s3://{moto_bucket} at {proxy.url}: {missing}"):
            open_store(f"s3://{moto_bucket}").list("run")
        for args in (["ls", f"s3://{moto_bucket}/run"], ["verify", f"s3://{moto_bucket}/run"]):
            assert cli.main(args) == 2
            err = capsys.readouterr().err
            assert err.count("activault: error:") == 1 and missing in err and "Traceback" not in err, err
            assert "AWS_SKIP_SIGNATURE=true or the store option unsigned=True" in err and ".aws" not in err
        with pytest.raises(StorageError, match="no S3 credentials"):
            open_store(f"s3://{moto_bucket}", unsigned=False).get("run/cfg.json")  # signed by nothing
        assert proxy.counts["requests"] == 0
        (home / ".aws").mkdir()
        (home / ".aws" / "credentials").write_text("[default]\n")
        with pytest.raises(StorageError, match=r"credentials are not read: export the keys, e.g. `eval"):
            open_store(f"s3://{moto_bucket}").size("run/cfg.json")
    use_env(monkeypatch, {"S3_ENDPOINT_URL": moto.url})
    with pytest.raises(StorageError, match="the bucket refuses anonymous .unsigned. requests: set AWS_ACCESS_KEY_ID"):
        open_store(f"s3://{moto_bucket}", unsigned=True).get("run/cfg.json")
    make_public(moto.url, moto_bucket)
    assert bytes(open_store(f"s3://{moto_bucket}", unsigned=True).get("run/cfg.json")) == b"{}"
    monkeypatch.setenv("AWS_SKIP_SIGNATURE", "true")
    assert [e.key for e in open_store(f"s3://{moto_bucket}").list("run")] == ["run/cfg.json"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # half a key pair: one message, no traceback
    monkeypatch.delenv("AWS_SKIP_SIGNATURE")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both"):
        open_store(f"s3://{moto_bucket}")
    with pytest.raises(StorageError, match="cannot set up S3 for .*: Missing SecretAccessKey; fix the AWS_"):
        open_store(f"s3://{moto_bucket}", unsigned=True)  # obstore reads the environment's half pair itself


def test_cost_notes() -> None:
    assert is_local_endpoint("http://127.0.0.1:9000") and is_local_endpoint("http://localhost")
    assert is_local_endpoint("http://10.1.2.3:9000") and is_local_endpoint("http://192.168.0.5")
    assert not is_local_endpoint("https://s3.us-east-1.amazonaws.com") and not is_local_endpoint("")
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1"}
    assert "egress" in cost_notes(S3Store("s3://bkt", env=env), 10**10)[0]
    remote = S3Store("s3://bkt", env={**env, "S3_ENDPOINT_URL": "https://acct.r2.cloudflarestorage.com"})
    assert "remote endpoint acct.r2.cloudflarestorage.com" in cost_notes(remote, 10**10)[0]
    assert cost_notes(S3Store("s3://bkt", env={**env, "S3_ENDPOINT_URL": "http://127.0.0.1:1"}), 10**10) == []
    assert "s" not in repr(S3Store("s3://bkt", env={**env, "AWS_SECRET_ACCESS_KEY": "zzsecret"})).split("zz")[1:]


# ---- the tools against faults and foreign objects ----

TOOL_HOOKS = ["h1", "h2"]


@pytest.fixture
def moto_run(moto: S3Server, moto_bucket: str) -> tuple[S3Store, Any]:
    store = S3Store(f"s3://{moto_bucket}", env=moto.env())
    return store, write_synthetic_run(store, "run", TOOL_HOOKS, machines=1, files=2)


def test_writes_a_job_resumes_from_say_run_the_same_command_again(moto, moto_bucket, monkeypatch) -> None:
    """A megabatch upload and a progress record's conditional write fail alike: whichever a dying
    endpoint hits first, a collection stops with the advice that resumes it (CI saw the record's)."""
    monkeypatch.setattr(s3mod, "MAX_RETRIES", 1)
    with FaultProxy(moto.url, rate=1.0, faults=("503",)) as proxy:
        store = S3Store(f"s3://{moto_bucket}/w", env=moto.env(proxy.url), retry_timeout=1)
        for write in (lambda: store.put("mb", [memoryview(b"x")]), lambda: store.swap("rec", b"{}", None)):
            resume = r"failed 2 attempt\(s\).*then run the same command again to resume$"
            with pytest.raises(StorageError, match=resume):
                write()


@pytest.mark.parametrize("fault", ["503", "unreachable"])
def test_tools_say_they_are_retrying_then_end_in_one_message(
    moto, moto_bucket, moto_run, fault, monkeypatch, caplog, capsys
) -> None:
    """ls, verify and inspect against repeated 503s or a closed port: a retry notice naming what and how
    many attempts, then one error naming the endpoint and the last error, within the env's budget."""
    store, run = moto_run
    monkeypatch.setattr(s3mod, "NOTICE_AFTER_S", 0.5)
    monkeypatch.setattr(s3mod, "NOTICE_EVERY_S", 0.0)
    monkeypatch.setenv("ACTIVAULT_S3_RETRY_TIMEOUT", "2")
    monkeypatch.setenv("ACTIVAULT_S3_MAX_RETRIES", "50")
    with FaultProxy(moto.url, rate=1.0, faults=("503",)) as proxy:
        endpoint = proxy.url if fault == "503" else f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
        last = "503 Service Unavailable" if fault == "503" else "Connection refused"
        for args in (
            ["ls", f"s3://{moto_bucket}/run"],
            ["verify", f"s3://{moto_bucket}/run"],
            ["inspect", f"s3://{moto_bucket}/run/h1/{run.names[0]}"],
        ):
            caplog.clear()
            rc = cli.main(args)
            err = capsys.readouterr().err
            # The notices are log lines (on stderr through the CLI's handler); the error is one line.
            errors = [line for line in err.splitlines() if line.startswith("activault: error:")]
            assert rc == 2 and "Traceback" not in err and len(errors) == 1, err
            err = errors[0]
            what = re.match(rf"activault: error: cannot (\w+ s3://{moto_bucket}/run\S*): ", err)
            assert what and f"the S3 endpoint {endpoint} failed" in err and f"last with: {last}" in err, err
            assert "ACTIVAULT_S3_RETRY_TIMEOUT=2 " in err and "ACTIVAULT_S3_MAX_RETRIES=50" in err
            notices = [r.getMessage() for r in caplog.records if "retrying for up to" in r.getMessage()]
            assert notices and all(endpoint in n and what.group(1) in n for n in notices), notices
            counts = [int(n.split(" failed ")[1].split(" ")[0]) for n in notices]
            assert counts == sorted(counts) and counts[-1] >= 2  # attempts so far, growing
    if fault == "503":
        assert proxy.counts["503"] > 3 and "moto-secret" not in caplog.text


def test_retry_budget_from_options_then_env_then_defaults(monkeypatch) -> None:
    env = {"ACTIVAULT_S3_MAX_RETRIES": "4", "ACTIVAULT_S3_RETRY_TIMEOUT": "7.5"}
    assert s3mod.retry_budget(env) == (4, 7.5)
    assert s3mod.retry_budget(env, max_retries=1, retry_timeout=timedelta(seconds=3)) == (1, 3.0)
    assert s3mod.retry_budget({}) == (s3mod.MAX_RETRIES, s3mod.RETRY_TIMEOUT.total_seconds())
    store = S3Store("s3://bkt", env={**env, "S3_ENDPOINT_URL": "http://127.0.0.1:1"}, retry_timeout=9)
    assert (store.max_retries, store.retry_timeout) == (4, 9.0)
    for bad in ({"ACTIVAULT_S3_MAX_RETRIES": "many"}, {"ACTIVAULT_S3_RETRY_TIMEOUT": "-1"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            s3mod.retry_budget(bad)


GARBAGE = [
    *(("max_retries", bad) for bad in (-1, 2.5, True, "3")),
    *(("retry_timeout", bad) for bad in (-1, "5", True)),
    *(("timeout", bad) for bad in (120, " ")),
    *(("unsigned", bad) for bad in ("yes", 1)),
    *(("part_size", bad) for bad in (1024, 0, 8.0 * 2**20)),
    *(("multipart_threshold", bad) for bad in (0, -5)),
    *(("part_concurrency", bad) for bad in (0, 1.5, False)),
]


def test_store_options_are_checked_by_name_type_and_range(moto_url: str, moto_bucket: str) -> None:
    """A mistyped option is named with those the S3 store takes (it used to vanish into `**_`); a value of
    the wrong type or range is one ConfigError naming it; the credentials are never shown."""
    env, uri = s3_env(moto_url), f"s3://{moto_bucket}"
    takes = "the S3 store takes env, unsigned, max_retries, retry_timeout, timeout, part_size, multipart"
    with pytest.raises(ConfigError, match=rf"unknown store option\(s\) 'retry_timout': {takes}"):
        open_store(uri, env=env, retry_timout=3)
    with pytest.raises(ConfigError, match=r"'map_reads' \(map_reads: for another kind of store\): the S3 store"):
        open_store(uri, env=env, map_reads=False)
    with pytest.raises(TypeError, match="retry_timout"):  # the constructor itself takes no catch-all
        S3Store(uri, env=env, retry_timout=3)  # type: ignore[call-arg]
    for name, bad in GARBAGE:
        with pytest.raises(ConfigError, match=f"^{re.escape(f'{name}={bad!r}')} is not accepted: the S3 store"):
            open_store(uri, env=env, **{name: bad})
    for bad_env in ({**env, "AWS_SECRET_ACCESS_KEY": 123}, "AWS_SECRET_ACCESS_KEY=moto-secret"):
        with pytest.raises(ConfigError, match=r"^env=\{\.\.\.\} is not accepted") as e:
            S3Store(uri, env=bad_env)  # type: ignore[arg-type]
        assert "secret" not in str(e.value)
    store = open_store(uri, env=env, max_retries=0, retry_timeout=timedelta(seconds=1), part_concurrency=2)
    assert (store.max_retries, store.retry_timeout, store.part_concurrency) == (0, 1.0, 2)  # type: ignore[attr-defined]


def test_readers_check_store_options_per_source(moto_url: str, moto_bucket: str, tmp_path: Path) -> None:
    """Sources of both kinds share one store_options: each store takes its own; a name no store takes, or
    a bad value, is refused before anything is read."""
    env = s3_env(moto_url)
    remote = write_synthetic_run(S3Store(f"s3://{moto_bucket}", env=env), "run", ["h"], files=2)
    local = write_synthetic_run(LocalStore(tmp_path, fsync=False), "run", ["h"], machines=2, files=1)
    sources = [str(tmp_path / "run/h"), f"s3://{moto_bucket}/run/h"]
    with RCache(sources, store_options={"env": env, "map_reads": False, "max_retries": 2}) as cache:
        got = torch.cat(list(cache))
    assert torch.equal(got, torch.cat([local.tensor("h"), remote.tensor("h")]))
    with pytest.raises(ConfigError, match=r"^max_retries=-1 is not accepted: the S3 store option max_retries"):
        RCache(sources[1], store_options={"env": env, "max_retries": -1})
    with pytest.raises(ConfigError, match=r"'part_size' \(part_size: for another kind of store\): the local store"):
        RCache(sources[0], store_options={"part_size": 8 << 20})
    with pytest.raises(ConfigError, match="'retries'.*the local store takes fsync, map_reads; the S3 store takes env"):
        RCache(sources, store_options={"env": env, "retries": 2})


def test_permanent_errors_are_not_retried(moto, moto_bucket, moto_run, monkeypatch) -> None:
    """A 404 or a range past the end fails at once: the proxy sees one request each."""
    store, run = moto_run
    with FaultProxy(moto.url) as proxy:
        s = S3Store(f"s3://{moto_bucket}", env=moto.env(proxy.url))
        with pytest.raises(NotFoundError):
            s.get("run/none")
        assert s.size("run/none") is None
        with pytest.raises(StorageError, match="416"):
            s.get_range("run/cfg.json", 10**6, 10**6 + 8)
        assert bytes(s.get_range("run/cfg.json", 5, 5)) == b"" and proxy.counts["requests"] == 3


def test_ranged_reads_arrive_whole_through_connections_lost_mid_answer(moto, moto_bucket) -> None:
    """read_into streams a range into the caller's buffer: exact bytes, short at the object's end,
    nothing asked for an empty buffer, and an answer cut halfway (headers sent, body not) started again."""
    data = os.urandom((3 << 20) + 5)
    S3Store(f"s3://{moto_bucket}", env=moto.env()).put("k", data)
    with FaultProxy(moto.url, rate=0.5, faults=("cut",), seed=3, when=lambda m, p: m == "GET") as proxy:
        s = S3Store(f"s3://{moto_bucket}", env=moto.env(proxy.url), retry_timeout=30)
        for offset, n in [(0, len(data)), (7, (2 << 20) + 1), (len(data) - 9, 4096), (5, 0)]:
            out = bytearray(b"\xee" * n)
            got = s.read_into("k", offset, memoryview(out))
            assert got == min(n, len(data) - offset) and bytes(out[:got]) == data[offset : offset + got]
            assert out[got:] == b"\xee" * (n - got)  # past the object's end: untouched
        assert proxy.counts["cut"] >= 2 and proxy.counts["requests"] == proxy.counts["forwarded"]
        with pytest.raises(NotFoundError, match="does not exist"):
            s.read_into("none", 0, memoryview(bytearray(8)))


def test_an_opened_object_reads_one_version_or_says_it_changed(moto, moto_bucket) -> None:
    """`open` pins the object's ETag and sends it as If-Match with every read: once the object is
    overwritten, a read is refused (412: ObjectChanged), never answered with the new bytes at the
    old offsets. Opened with a listed size (no HEAD), the first answer pins the version, and an
    object that is no longer the listed size is ObjectChanged, not a short file."""
    store = S3Store(f"s3://{moto_bucket}", env=moto.env())
    old, new = os.urandom(10_000), os.urandom(3_000)
    store.put("k", old)
    obj = store.open("k")
    assert obj.size == len(old) and obj.version and obj.url == f"s3://{moto_bucket}/k"
    assert bytes(obj.read(0, 100)) == old[:100]
    store.put("k", new)  # overwritten between two ranged reads
    with pytest.raises(ObjectChanged, match=f"s3://{moto_bucket}/k was replaced while it was read .*412"):
        obj.read(100, 200)
    now = store.open("k")
    assert now.size == len(new) and now.version != obj.version and bytes(now.read(0, now.size)) == new
    stale = store.open("k", size=len(old))  # a listing from before the overwrite
    with pytest.raises(ObjectChanged, match=f"it had {len(old)} bytes.*now {len(new)} bytes"):
        stale.read(0, 10)
    listed = store.open("k", size=len(new))
    assert listed.version is None  # not asked: the first answer tells
    assert bytes(listed.read(0, 10)) == new[:10] and listed.version == now.version
    store.put("k", old)
    with pytest.raises(ObjectChanged, match="412"):
        listed.read(10, 20)
    with pytest.raises(NotFoundError):
        store.open("none")


DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


@pytest.mark.parametrize(
    ("status", "answer", "fix"),
    [
        (200, bytes(range(256)) * 64, "reading needs ranges: serve the run from an S3 server that honours Range"),
        (403, DENIED, "refused these credentials for this object: check AWS_ACCESS_KEY_ID"),
    ],
    ids=["range ignored", "access denied"],
)
def test_a_refused_read_names_its_fix_and_fills_nothing(moto, status: int, answer: bytes, fix: str) -> None:
    """An endpoint answering a ranged GET with the whole object (200) must not fill the buffer with
    the object's first bytes as if they were the range's; one refusing the read (403) is not
    retried. Either way the message names what to do."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests = []

    class Refusing(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.send_header("ETag", '"e"')
            self.end_headers()
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        s = S3Store("s3://bkt", env=moto.env(f"http://127.0.0.1:{server.server_address[1]}"), retry_timeout=2)
        out = bytearray(100)
        with pytest.raises(StorageError, match=f"cannot download s3://bkt/k at .*; .*{fix}.*, then try again$"):
            s.read_into("k", 1000, memoryview(out))
        assert out == bytearray(100)  # nothing of the wrong bytes kept
        assert len(requests) == 1  # refused for good: not retried
    finally:
        server.shutdown()
        server.server_close()


_FAULTS_PER_READ = """
import json, resource, sys
import numpy as np
from activault.storage.base import Store
from activault.storage.s3 import S3Store

store = S3Store(sys.argv[1], env=json.loads(sys.argv[2]))
out = np.ones(48 << 20, np.uint8).data.cast("B")

def faults(read) -> int:
    read(store, "big", 0, out)  # the first read sets up connections and the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        assert read(store, "big", 0, out) == out.nbytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(Store.read_into), faults(S3Store.read_into))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc")
def test_ranged_reads_fault_in_no_memory_of_their_size(moto, moto_bucket) -> None:
    # Page faults, not time: a range fetched whole is a new allocation of its size, and glibc maps one
    # over 32 MiB afresh each time, faulted in page by page (12,288 pages for 48 MiB). Streamed into
    # the caller's buffer, the pieces come from the heap and are reused.
    S3Store(f"s3://{moto_bucket}", env=moto.env()).put("big", os.urandom(48 << 20))
    args = [f"s3://{moto_bucket}", json.dumps(moto.env())]
    env = {**os.environ, "PYTHONPATH": str(Path(s3mod.__file__).parents[2])}  # this activault, wherever it is
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_READ, *args], capture_output=True, text=True, check=True, env=env
    )
    whole, streamed = map(int, out.stdout.split())
    assert whole > 3 * 12288 * 0.9 and streamed < whole // 4, out.stdout


def test_foreign_keys_and_empty_megabatches_are_named_and_deletable(moto, moto_bucket, moto_run, capsys) -> None:
    """Keys object_store refuses (`..`, `.`, empty parts; made with boto3) and a zero-byte megabatch under a run:
    listed as foreign, skipped by ls and verify, and deleted like any object."""
    store, run = moto_run
    odd = ["run/h1/../x", "run/h1//y", "run/h2/./z.safetensors", "run/../escape"]
    for k in odd:
        moto.client().put_object(Bucket=moto_bucket, Key=k, Body=b"odd")
    store.put("run/h1/m00009-000000.safetensors", b"")
    kinds = {e.key: e.kind for e in store.list("run")}
    assert {k for k, v in kinds.items() if v == "badkey"} == set(odd)  # S3 keys are text: all under run/
    sub = S3Store(f"s3://{moto_bucket}/run", env=moto.env())
    dirs, files = sub.list_dir("h1")
    assert dirs == [] and [e.key for e in files if e.kind == "badkey"] == ["h1/../x", "h1//y"]
    assert sub.list_dir("")[0] == ["h1", "h2", "progress"]
    rc = cli.main(["ls", f"s3://{moto_bucket}/run"])
    out = capsys.readouterr().out
    assert rc == 0 and "foreign objects, skipped" in out and "h1/../x  (its key has an empty, '.' or '..' part)" in out
    assert "h1/m00009-000000.safetensors  (0 bytes, too short for a megabatch)" in out and "h1/  2 files" in out
    rc = cli.main(["verify", f"s3://{moto_bucket}/run"])
    out = capsys.readouterr().out
    problems = [ln for ln in out.splitlines() if ln.startswith("  - ")]
    assert rc == 1 and len(problems) == 5 and all("foreign object" in p for p in problems), out
    sub.delete("../escape")  # through a prefixed store: the literal key run/../escape
    assert "run/../escape" not in moto.objects(moto_bucket) and "escape" not in moto.objects(moto_bucket)
    for e in store.list("run"):
        store.delete(e.key)
    assert moto.objects(moto_bucket) == {}


def test_uploads_send_the_object_checksum(moto, moto_bucket) -> None:
    """Each PUT names its body's SHA-256 (x-amz-checksum-sha256): S3 refuses a body that differs."""
    import base64
    import hashlib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    headers: list[dict[str, str]] = []

    class Recorder(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("ETag", '"e"')
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**moto.env(f"http://127.0.0.1:{server.server_address[1]}")}
        S3Store("s3://bkt", env=env).put("k", b"a megabatch")
        S3Store("s3://bkt", env={**env, "AWS_CHECKSUM_ALGORITHM": "none"}).put("k", b"a megabatch")
    finally:
        server.shutdown()
        server.server_close()
    want = base64.b64encode(hashlib.sha256(b"a megabatch").digest()).decode()
    assert headers[0]["x-amz-checksum-sha256"] == want
    assert "x-amz-checksum-sha256" not in headers[1] and "x-amz-content-sha256" in headers[1]
    # Multipart: each part carries its checksum, and the object keeps one (composite) checksum.
    data = os.urandom(13 << 20)
    store = S3Store(f"s3://{moto_bucket}/p", env=moto.env(), part_size=5 << 20, multipart_threshold=6 << 20)
    store.put("big", [memoryview(data)])
    head = moto.client().head_object(Bucket=moto_bucket, Key="p/big", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")


def test_a_missing_bucket_is_named_with_the_command_that_creates_it(moto, moto_bucket, tmp_path, capsys) -> None:
    """ls, verify, RCache and every store operation on a bucket that does not exist say so (not a
    `404 Not Found: <?xml` cut before its NoSuchBucket code), with a command that creates it; running
    that command makes the same URI an empty bucket."""
    missing = f"no-such-{uuid.uuid4().hex[:10]}"
    said = f"bucket '{missing}' does not exist at {moto.url}: create it with `aws s3 mb s3://{missing} --endpoint-url"
    for argv in (["ls", f"s3://{missing}/run"], ["verify", f"s3://{missing}/run"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and "<?xml" not in err and "Traceback" not in err, err
    with pytest.raises(StorageError, match=re.escape(said)):
        RCache(f"s3://{missing}/run/{HOOKS[0]}")
    store = S3Store(f"s3://{missing}/run", env=moto.env())
    for op in (
        lambda: store.get("k"),
        lambda: store.put("k", b"x"),
        lambda: store.list("k"),
        lambda: store.delete("k"),
    ):
        with pytest.raises(StorageError, match=re.escape(said)) as e:
            op()
        assert not isinstance(e.value, NotFoundError), "a missing bucket is no missing object"
    with pytest.raises(StorageError, match=re.escape(said)):
        store.check()
    python = re.search(r'`python -c "(.+?)"`', str(e.value))
    assert python, e.value
    subprocess.run([sys.executable, "-c", python.group(1)], env={**os.environ, **moto.env()}, check=True)
    assert store.list() == [] and cli.main(["ls", f"s3://{missing}/run"]) == 2
    assert "does not exist" in capsys.readouterr().err and missing in [
        b["Name"] for b in moto.client().list_buckets()["Buckets"]
    ]
