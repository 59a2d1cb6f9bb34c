"""`activault demo`: an offline, self-contained collection on a laptop CPU, then a look at the data."""

from __future__ import annotations

import logging
import shutil
from importlib import resources
from pathlib import Path

import yaml

from activault.config import Config, parse_config
from activault.errors import ConfigError
from activault.storage.uri import parse_uri

log = logging.getLogger(__name__)

HOOKS = ["models.layers.1.post", "models.layers.2.mlp.post", "models.layers.3.self_attn.pre"]


def demo_config(model_dir: Path, storage: str, run_name: str = "demo", corpus: str | None = None) -> Config:
    corpus = corpus or str(resources.files("activault").joinpath("demo_corpus.jsonl"))
    return parse_config(
        {
            "run_name": run_name,
            "num_runs": 1,
            "storage": storage,
            "transformer_config": {"model_name": str(model_dir), "dtype": "float32", "device": "cpu"},
            "data_config": {
                "data_key": corpus,
                "n_batches": 12,
                "seq_length": 128,
                "batch_size": 8,
                "seed": 0,
                "clean_added_tokens": True,
                "clean_default_system_prompt": True,
            },
            "upload_config": {"batches_per_upload": 4, "hooks": HOOKS},
        },
        "(demo)",
    )


def _local_folder(storage: str) -> str:
    """The absolute folder of a local store URI (PATH or file://PATH); ConfigError for S3 or garbage."""
    parsed = parse_uri(storage)
    if parsed.scheme != "file":
        raise ConfigError(
            f"--storage {storage}: the demo is offline and collects into a local folder (its tiny model is "
            "built there); pass --storage PATH or file://PATH. To collect into S3, keep the demo's model and "
            "config with --keep DIR, then run `activault collect --config DIR/config.yaml --storage s3://...`"
        )
    return parsed.path


def prepare(storage: str, keep: str | None = None) -> tuple[Config, Path]:
    """The demo's model, tokenizer and config; with `keep`, all of it (and the corpus) in that folder."""
    folder = _local_folder(storage)  # refused before anything is built, even where `keep` replaces it
    from activault.tools.tiny import build_tiny

    # Absolute, so the run's record names the same tokenizer whichever way the storage path is written.
    home = Path(keep).expanduser().absolute() if keep else None
    model_dir = (home / "model") if home else Path(folder) / ".demo-model"
    if not (model_dir / "config.json").exists():
        log.info("building a tiny Llama-style model and tokenizer in %s (no download)", model_dir)
        build_tiny(model_dir, "llama", layers=4, d=64)
    corpus = None
    if home:
        corpus = str(home / "corpus.jsonl")
        shutil.copyfile(str(resources.files("activault").joinpath("demo_corpus.jsonl")), corpus)
    cfg = demo_config(model_dir, storage if not home else str(home / "vault"), corpus=corpus)
    cfg_path = (home / "config.yaml") if home else model_dir / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    log.info("config written to %s (run it yourself with: activault collect --config %s)", cfg_path, cfg_path)
    return cfg, cfg_path


def run_demo(storage: str = "./vault", keep: str | None = None) -> None:
    """Build a tiny model, collect into `storage`, read a megabatch back and print what it holds."""
    import torch
    from transformers import AutoTokenizer

    from activault.collection.pipeline import collect
    from activault.reading.rcache import RCache

    cfg, cfg_path = prepare(storage, keep)
    model_dir = Path(cfg.transformer_config.model_name)
    result = collect(cfg)
    hook = HOOKS[0]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    with RCache(f"{result.destination}/{hook}", return_ids=True, shuffle=False) as cache:
        batch = next(iter(cache))
    states, ids, pos = batch["states"], batch["input_ids"], batch["positions"]
    stats = result.stats[hook]
    print(f"\nread back one megabatch of {result.destination}/{hook}")
    print(f"  states     {list(states.shape)} {str(states.dtype).removeprefix('torch.')}")
    print(f"  input_ids  {list(ids.shape)}")
    print(f"  positions  {list(pos.shape)} (index of each token in its document)")
    # A new document starts wherever the position does not follow the previous one.
    row_ids, row_pos = ids[0].tolist(), pos[0].tolist()
    starts = [i for i in range(len(row_pos)) if row_pos[i] >= 0 and (i == 0 or row_pos[i] != row_pos[i - 1] + 1)]
    docs = [tok.decode(row_ids[a:b]) for a, b in zip(starts, starts[1:] + [len(row_ids)], strict=True)]
    print(f"  row 0 holds {len(docs)} documents; the first:")
    print(f"    {docs[0][:300]!r}{'...' if len(docs[0]) > 300 else ''}")
    print(f"statistics of {hook} over {stats.count:,} tokens:")
    print(
        f"  mean norm {stats.mean_norm:.4f}; |mean| "
        f"{float(stats.mean.norm()):.4f}; mean std {float(stats.std.mean()):.4f}"
    )
    print(
        f"  value range in this megabatch [{float(states.min()):.3f}, {float(states.max()):.3f}], "
        f"finite: {bool(torch.isfinite(states).all())}"
    )
    print(
        f"\n{result.files} files, {result.tokens:,} tokens, "
        f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f}s"
    )
    if keep:
        print(f"\nkept in {keep}: model/ (weights and tokenizer), corpus.jsonl, config.yaml and vault/.")
        print(f"Edit {cfg_path} (hooks, data_key, sizes, run_name) and run: activault collect --config {cfg_path}")
