"""config.py: the typed config tree: defaults, aliases, the YAML round trip, the machine split, where a
run is stored, and every kind of garbage refused with one ConfigError naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from activault.config import (
    Config,
    DataConfig,
    TransformerConfig,
    UploadConfig,
    check_machine,
    load_config,
    memory_bytes,
    parse_config,
    resolve_storage,
)
from activault.errors import ConfigError

BASE: dict[str, Any] = {
    "run_name": "r",
    "transformer_config": {"model_name": "m"},
    "data_config": {"data_key": "x", "n_batches": 6, "seq_length": 8, "batch_size": 2},
    "upload_config": {"batches_per_upload": 4, "hooks": ["models.layers.0.post"]},
}


N_BATCHES = "use a whole number of batches > 0, or all to collect until the data runs out"


def raw(**changes: Any) -> dict[str, Any]:
    """BASE with dotted paths set ("data_config.seq_length": 4)."""
    out = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = out
        *sections, leaf = path.split(".")
        for s in sections:
            node = node[s]
        node[leaf] = value
    return out


def test_a_minimal_config_gets_the_documented_defaults():
    cfg = parse_config(raw())
    assert (cfg.num_runs, cfg.storage) == (1, None)
    t, d, u = cfg.transformer_config, cfg.data_config, cfg.upload_config
    assert (t.dtype, t.attn_implementation, t.device, t.kwargs) == ("bfloat16", "sdpa", "auto", {})
    assert (d.seed, d.start_batch, d.shuffle_buffer, d.on_bad_record, d.skip_cache) == (42, 0, 0, "skip", False)
    assert (u.max_pending, u.write_threads, u.compression, u.compression_level, u.on_nonfinite) == (
        2,
        4,
        "none",
        1,
        "warn",
    )
    assert cfg.rows_per_file == 2 * 4


@pytest.mark.parametrize("alias,canonical", [("bf16", "bfloat16"), ("FP16", "float16"), ("float", "float32")])
def test_dtype_aliases_are_stored_by_their_canonical_name(alias, canonical):
    cfg = parse_config(raw(**{"transformer_config.dtype": alias}))
    assert cfg.transformer_config.dtype == canonical
    assert cfg.to_public_dict()["transformer_config"]["dtype"] == canonical


def test_the_public_dict_and_yaml_round_trip_to_the_same_config(tmp_path):
    cfg = parse_config(
        raw(
            num_runs=3,
            storage="s3://bucket/prefix",
            **{
                "transformer_config.kwargs": {"revision": "main", "trust_remote_code": True},
                "transformer_config.max_per_device_memory": "70GiB",
                "data_config.text_field": "body",
                "upload_config.compression": "zstd",
            },
        )
    )
    public = cfg.to_public_dict()
    assert parse_config(public) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(public))
    assert load_config(path) == cfg
    assert load_config(path, {"run_name": "other"}).run_name == "other"


def test_every_section_field_has_its_help_next_to_it():
    for section in (Config, TransformerConfig, DataConfig, UploadConfig):
        for name, field in section.model_fields.items():
            assert field.description and len(field.description) > 10, f"{section.__name__}.{name}"


@pytest.mark.parametrize(
    "n_batches,num_runs", [(6, 1), (6, 4), (7, 3), (3, 3), (100, 7), (1, 1), (1000003, 16)], ids=str
)
def test_machine_batches_and_files_equal_a_round_robin_deal(n_batches, num_runs):
    cfg = parse_config(raw(num_runs=num_runs, **{"data_config.n_batches": n_batches}))
    dealt = [0] * num_runs
    for batch in range(n_batches):  # an independent split: deal the batches like cards
        dealt[batch % num_runs] += 1
    assert [cfg.machine_batches(m) for m in range(num_runs)] == dealt
    per_file = cfg.upload_config.batches_per_upload
    assert [cfg.machine_files(m) for m in range(num_runs)] == [(b + per_file - 1) // per_file for b in dealt]


@pytest.mark.parametrize("num_runs", [1, 3, 16])
def test_n_batches_all_collects_every_machines_share_until_the_data_runs_out(num_runs):
    """`all`: no batch count and no file count for any machine (was: a made-up n_batches), and
    more machines than any count would allow are fine."""
    cfg = parse_config(raw(num_runs=num_runs, **{"data_config.n_batches": "all"}))
    assert cfg.data_config.until_exhausted and not parse_config(raw()).data_config.until_exhausted
    assert [cfg.machine_batches(m) for m in range(num_runs)] == [None] * num_runs
    assert [cfg.machine_files(m) for m in range(num_runs)] == [None] * num_runs
    assert parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_public_dict()))) == cfg  # YAML round trip


@pytest.mark.parametrize("machine,num_runs", [(-1, 2), (2, 2), (5, 1), (10**9, 3)])
def test_a_machine_index_out_of_range_names_the_flag_and_the_range(machine, num_runs):
    with pytest.raises(ConfigError) as e:
        check_machine(machine, num_runs, "--rank")
    assert str(e.value) == (f"--rank {machine} is out of range: num_runs is {num_runs}, so use 0..{num_runs - 1}")
    cfg = parse_config(raw(num_runs=num_runs, **{"data_config.n_batches": 10}))
    with pytest.raises(ConfigError, match=f"--machine {machine} is out of range"):
        cfg.check_machine(machine)


def test_every_machine_in_range_is_accepted():
    for m in range(4):
        check_machine(m, 4)


# ---- where the run is stored ----


def test_storage_is_the_flag_then_the_config_then_s3_from_the_environment_then_local():
    cfg = parse_config(raw(storage="/data/vault"))
    assert resolve_storage(cfg, "/flag", env={"AWS_ACCESS_KEY_ID": "k"}) == "/flag"
    assert resolve_storage(cfg, env={"AWS_ACCESS_KEY_ID": "k"}) == "/data/vault"
    bare = parse_config(raw())
    assert resolve_storage(bare, env={}) == "./vault"
    s3_env = {"S3_ENDPOINT_URL": "http://127.0.0.1:9000", "S3_BUCKET_NAME": "from-env"}
    assert resolve_storage(bare, env=s3_env) == "s3://from-env"
    named = parse_config(raw(**{"data_config.bucket_name": "from-config"}))
    assert resolve_storage(named, env=s3_env) == "s3://from-config"
    assert resolve_storage(named, env={}) == "./vault", "a bucket name alone does not mean S3"


def test_s3_credentials_without_a_bucket_name_both_fixes():
    with pytest.raises(ConfigError) as e:
        resolve_storage(parse_config(raw()), env={"AWS_ACCESS_KEY_ID": "k"})
    assert "data_config.bucket_name" in str(e.value) and "S3_BUCKET_NAME" in str(e.value)
    assert "--storage" in str(e.value)


# ---- garbage: one ConfigError naming the field ----

GARBAGE = [
    ("bogus", 1, "bogus: unknown key"),
    ("transformer_config.bogus", 1, "transformer_config.bogus: unknown key"),
    ("data_config.seq_len", 8, "data_config.seq_len: unknown key"),
    ("aws_secret_access_key", "s3cr3t", "aws_secret_access_key: unknown key"),  # no secrets in configs
    ("run_name", "", "run_name: String should have at least 1 character"),
    ("run_name", "../escape", "run_name: use letters, digits"),
    ("run_name", "a/b", "run_name: use letters, digits"),
    ("run_name", ".hidden", "run_name: use letters, digits"),
    ("run_name", "run\x00name", "run_name: use letters, digits"),
    ("run_name", "run\nname", "run_name: use letters, digits"),
    ("run_name", "r" * 201, "run_name: it becomes a folder name: at most 200 bytes (UTF-8), it has 201; shorten it"),
    ("run_name", "r" * 5000, "at most 200 bytes (UTF-8), it has 5000"),  # was: accepted, then a raw OSError
    ("run_name", ".", "run_name: use letters, digits"),
    ("run_name", "..", "run_name: use letters, digits"),
    ("run_name", 5, "run_name: Input should be a valid string"),
    ("run_name", None, "run_name: Input should be a valid string"),
    ("num_runs", 0, "num_runs: Input should be greater than or equal to 1"),
    ("num_runs", -2, "num_runs: Input should be greater than or equal to 1"),
    ("num_runs", 7, "data_config.n_batches (6) is less than num_runs (7)"),
    ("storage", 5, "storage: Input should be a valid string"),
    ("transformer_config", None, "transformer_config: Input should be a valid dictionary"),
    ("data_config", [1, 2], "data_config: Input should be a valid dictionary"),
    ("transformer_config.model_name", "", "transformer_config.model_name: String should have at least 1"),
    ("transformer_config.dtype", "float8", "transformer_config.dtype: unknown dtype 'float8'; use one of"),
    ("transformer_config.dtype", "bf16\x00", "transformer_config.dtype: unknown dtype 'bf16\\x00'"),
    ("transformer_config.dtype", "x" * 5000, "transformer_config.dtype: unknown dtype 'xxxx"),
    ("transformer_config.dtype", 16, "transformer_config.dtype: Input should be a valid string"),
    ("transformer_config.device", "gpu", "transformer_config.device: unknown device 'gpu'"),
    ("transformer_config.device", "cuda:x", "transformer_config.device: unknown device"),
    ("transformer_config.device", "cpu\x00", "transformer_config.device: unknown device"),
    ("transformer_config.device", "x" * 5000, "transformer_config.device: unknown device"),
    ("transformer_config.attn_implementation", "flash", "transformer_config.attn_implementation: Input should be"),
    ("transformer_config.max_per_device_memory", "lots", "transformer_config.max_per_device_memory: 'lots' is not"),
    ("transformer_config.max_per_device_memory", "-5GiB", "is not a memory size"),
    ("transformer_config.max_per_device_memory", "70GiB\x00", "is not a memory size"),
    ("transformer_config.max_per_device_memory", 70, "Input should be a valid string"),
    ("transformer_config.kwargs", "trust_remote_code", "transformer_config.kwargs: Input should be a valid dict"),
    ("data_config.data_key", "", "data_config.data_key: String should have at least 1 character"),
    ("data_config.n_batches", 0, f"data_config.n_batches: {N_BATCHES} (got 0)"),
    ("data_config.n_batches", -1, f"data_config.n_batches: {N_BATCHES} (got -1)"),
    ("data_config.n_batches", 2.5, f"data_config.n_batches: {N_BATCHES} (got 2.5)"),
    ("data_config.n_batches", "many", f"data_config.n_batches: {N_BATCHES} (got 'many')"),
    ("data_config.n_batches", None, f"data_config.n_batches: {N_BATCHES} (got None)"),
    ("data_config.n_batches", True, f"data_config.n_batches: {N_BATCHES} (got True)"),
    ("data_config.n_batches", "ALL", f"data_config.n_batches: {N_BATCHES} (got 'ALL')"),
    ("data_config.seq_length", -1, "data_config.seq_length: Input should be greater than 0"),
    ("data_config.seq_length", (1 << 20) + 1, "data_config.seq_length: Input should be less than or equal"),
    ("data_config.batch_size", 0, "data_config.batch_size: Input should be greater than 0"),
    ("data_config.batch_size", [4], "data_config.batch_size: Input should be a valid integer"),
    ("data_config.start_batch", -1, "data_config.start_batch: Input should be greater than or equal to 0"),
    ("data_config.shuffle_buffer", -8, "data_config.shuffle_buffer: Input should be greater than or equal to 0"),
    ("data_config.seed", "forty-two", "data_config.seed: Input should be a valid integer"),
    ("data_config.skip_cache", "maybe", "data_config.skip_cache: Input should be a valid boolean"),
    ("data_config.on_bad_record", "ignore", "data_config.on_bad_record: Input should be 'skip' or 'error'"),
    ("data_config.text_field", 3, "data_config.text_field: Input should be a valid string"),
    ("upload_config.batches_per_upload", 0, "upload_config.batches_per_upload: Input should be greater than 0"),
    ("upload_config.hooks", [], "upload_config.hooks: List should have at least 1 item"),
    ("upload_config.hooks", "models.layers.0.post", "upload_config.hooks: Input should be a valid list"),
    ("upload_config.hooks", ["a", "b", "a"], "upload_config.hooks: hooks listed twice: ['a']"),
    ("upload_config.hooks", ["a/b"], "upload_config.hooks: invalid hook names ['a/b']"),
    ("upload_config.hooks", [""], "upload_config.hooks: invalid hook names ['']"),
    ("upload_config.hooks", [".."], "upload_config.hooks: invalid hook names ['..']"),
    ("upload_config.hooks", ["a", "progress"], "hook names ['progress'] are the run folder's own entries"),
    ("upload_config.hooks", ["cfg.json"], "hook names ['cfg.json'] are the run folder's own entries"),
    ("upload_config.hooks", ["a\x00b"], "invalid hook names ['a\\x00b']: each becomes a folder name: no control"),
    ("upload_config.hooks", ["a\nb"], "each becomes a folder name: no control character (it holds '\\n')"),
    ("upload_config.hooks", ["h" * 201], "each becomes a folder name: at most 200 bytes (UTF-8), it has 201"),
    ("upload_config.hooks", ["ü" * 101], "at most 200 bytes (UTF-8), it has 202"),  # bytes, not characters
    ("upload_config.hooks", [7], "upload_config.hooks.0: Input should be a valid string"),
    ("upload_config.max_pending", 0, "upload_config.max_pending: Input should be greater than or equal to 1"),
    ("upload_config.write_threads", -1, "upload_config.write_threads: Input should be greater than or equal to 1"),
    ("upload_config.price_per_gb_month", -0.01, "upload_config.price_per_gb_month: Input should be greater"),
    ("upload_config.price_per_gb_month", float("nan"), "upload_config.price_per_gb_month: Input should be"),
    ("upload_config.lease_seconds", 0.5, "upload_config.lease_seconds: Input should be greater than or equal to 1"),
    ("upload_config.compression", "gzip", "upload_config.compression: Input should be 'none', 'zstd' or 'fp8'"),
    ("upload_config.compression", "zstd\x00", "upload_config.compression: Input should be"),
    ("upload_config.compression_level", 23, "upload_config.compression_level: Input should be less than"),
    ("upload_config.compression_level", -8, "upload_config.compression_level: Input should be greater than"),
    ("upload_config.compression_chunk_kib", 0, "upload_config.compression_chunk_kib: Input should be greater"),
    ("upload_config.on_nonfinite", "ignore", "upload_config.on_nonfinite: Input should be 'error' or 'warn'"),
]


@pytest.mark.parametrize("path,value,message", GARBAGE, ids=[f"{p}={v!r}"[:60] for p, v, _ in GARBAGE])
def test_garbage_is_one_config_error_naming_the_field(path, value, message):
    with pytest.raises(ConfigError) as e:
        parse_config(raw(**{path: value}), "cfg.yaml")
    text = str(e.value)
    assert text.startswith("invalid config cfg.yaml:\n  ") and message in text, text
    assert len(text.splitlines()) == 2, "one line for the one bad field"


def test_every_bad_field_is_listed_at_once():
    bad = raw(
        **{
            "run_name": "no/slash",
            "transformer_config.dtype": "float8",
            "data_config.seq_length": 0,
            "upload_config.hooks": [],
            "extra": True,
        }
    )
    del bad["data_config"]["n_batches"]
    with pytest.raises(ConfigError) as e:
        parse_config(bad, "c.yaml")
    lines = str(e.value).splitlines()[1:]
    fields = sorted(line.split(":")[0].strip() for line in lines)
    assert fields == sorted(
        [
            "run_name",
            "transformer_config.dtype",
            "data_config.seq_length",
            "data_config.n_batches",
            "upload_config.hooks",
            "extra",
        ]
    )
    assert "  data_config.n_batches: required key is missing" in lines


@pytest.mark.parametrize("data", [[1, 2], "run_name: r", None, 5])
def test_a_config_that_is_not_a_mapping_is_refused(data):
    with pytest.raises(ConfigError, match="must be a mapping of keys to values"):
        parse_config(data, "c.yaml")


def test_config_files_that_cannot_be_read_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass an existing YAML file with --config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a folder
    (tmp_path / "bad.yaml").write_text("run_name: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "tab.yaml").write_text("run_name:\n\t- x\n")
    with pytest.raises(ConfigError, match=r"tab.yaml is not valid YAML"):
        load_config(tmp_path / "tab.yaml")
    (tmp_path / "list.yaml").write_text("- run_name\n- r\n")
    with pytest.raises(ConfigError, match=r"list.yaml must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "empty.yaml")
    for key in ("run_name", "transformer_config", "data_config", "upload_config"):
        assert f"  {key}: required key is missing" in str(e.value)


def test_the_longest_names_are_accepted():
    cfg = parse_config(raw(**{"run_name": "r" * 200, "upload_config.hooks": ["h" * 200, "ü" * 100]}))
    assert len(cfg.run_name) == 200 and cfg.upload_config.hooks == ["h" * 200, "ü" * 100]


def test_a_config_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("run_name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 14 is b'\\xe9'\); save it as UTF-8"):
        load_config(tmp_path / "latin1.yaml")


@pytest.mark.parametrize("text", ["- run_name\n- r\n", "just a string\n", "5\n"])
def test_a_file_that_is_not_a_mapping_is_refused_with_overrides_too(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"c.yaml must be a mapping of keys to values"):
        load_config(tmp_path / "c.yaml", {"run_name": "other"})


@pytest.mark.parametrize("text,n", [("70GiB", 70 << 30), (" 80 GB ", 80 * 10**9), ("1.5KiB", 1536), ("3b", 3)])
def test_memory_bytes(text, n):
    assert memory_bytes(text) == n


def test_memory_bytes_refuses_what_the_config_refuses():
    with pytest.raises(ValueError, match="is not a memory size"):
        memory_bytes("lots")
