"""`activault demo`: an offline, self-contained collection on a laptop CPU, then a look at the data."""

from __future__ import annotations

import logging
import shutil
import textwrap
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel

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


def _shown(path: Path) -> str:
    """`path` as a config writes it: relative to the working folder when inside it, else absolute."""
    path = path.absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _comment(text: str | None, pad: str) -> list[str]:
    """A field's help as YAML comment lines: its first sentence, wrapped at 100 columns."""
    first = " ".join((text or "").split()).split(". ")[0].rstrip(".")
    return [pad + "# " + line for line in textwrap.wrap(first, 100 - len(pad))] if first else []


def _fields(model: BaseModel, pad: str = "") -> list[str]:
    """YAML lines of the fields of `model` that differ from their defaults, each under its help."""
    out: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += ["", *_comment(field.description, pad), f"{pad}{name}:", *_fields(value, pad + "  ")]
        elif field.is_required() or value != field.get_default(call_default_factory=True):
            out += _comment(field.description, pad)
            if name == "hooks":
                out.append(f"{pad}# `activault hooks MODEL` lists every hook of a model, with its width")
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()
            out.append(f"{pad}{name}: {text}")
    return out


def config_text(cfg: Config, path: str, folder: str | None) -> str:
    """A short commented config: the fields that differ from the defaults, under their help.

    Args:
        path: how to name this file in the command that runs it.
        folder: where to run it from, when its paths are relative to a folder.
    """
    where = f"from {folder} " if folder else ""
    head = [
        f"# The activault demo's config. Run it {where}with: activault collect --config {path}",
        *(["# (its paths are relative to that folder)."] if folder else []),
        "# Fields left out have their defaults; configs/README.md documents every field.",
    ]
    return "\n".join(head + _fields(cfg)) + "\n"


def prepare(storage: str, keep: str | None = None) -> tuple[Config, Path]:
    """The demo's model, tokenizer and config; with `keep`, all of it (and the corpus) in that folder.

    Without `keep`, they go to a visible folder beside the store (`./vault` -> `./vault-demo`),
    never into the store, whose listing would show them.
    """
    folder = Path(_local_folder(storage))  # refused before anything is built, even where `keep` replaces it
    from activault.tools.tiny import build_tiny

    home = Path(keep).expanduser().absolute() if keep else folder.absolute().with_name(folder.absolute().name + "-demo")
    model_dir, model_name = home / "model", _shown(home / "model")
    legacy = folder / ".demo-model"  # where demos before 0.x built it; their runs name it, absolute
    if not keep and (legacy / "config.json").exists() and not (model_dir / "config.json").exists():
        model_dir, model_name = legacy.absolute(), str(legacy.absolute())
    if not (model_dir / "config.json").exists():
        log.info("building a tiny Llama-style model and tokenizer in %s (no download)", model_dir)
        build_tiny(model_dir, "llama", layers=4, d=64)
    home.mkdir(parents=True, exist_ok=True)
    corpus = None
    if keep:
        corpus = home / "corpus.jsonl"
        shutil.copyfile(str(resources.files("activault").joinpath("demo_corpus.jsonl")), corpus)
    cfg = demo_config(
        Path(model_name),
        storage if not keep else _shown(home / "vault"),
        corpus=_shown(corpus) if corpus else None,
    )
    cfg_path = home / "config.yaml"
    relative = _shown(home) != str(home)
    cfg_path.write_text(config_text(cfg, _shown(cfg_path), str(Path.cwd()) if relative else None))
    log.info("the demo's model is in %s, its config in %s", model_dir, cfg_path)
    return cfg, cfg_path


def next_steps(cfg: Config, cfg_path: Path) -> list[str]:
    """What to run next: look at the run, read it, then collect a run of one's own."""
    store = cfg.storage or "./vault"
    run, config = f"{store}/{cfg.run_name}", _shown(cfg_path)
    hook = f"{run}/{HOOKS[0]}"
    commands = [
        (f"activault ls {store}", "runs, hooks and files"),
        (f"activault verify {run}", "every file and record checked"),
        (f"activault stats {hook}", "mean, std and norms of one hook"),
        (f"activault shell --root {store}", "browse: ls, cd, cat, inspect"),
        (
            f"activault hooks {cfg.transformer_config.model_name} --dtype {cfg.transformer_config.dtype}",
            "every hook the model offers",
        ),
    ]
    size = max(len(c) for c, _ in commands)
    return [
        "next steps:",
        *(f"  {c:<{size}}  # {why}" for c, why in commands),
        "  read it in Python:",
        "    from activault import RCache",
        f'    with RCache("{hook}") as cache:',
        "        for states in cache: ...  # one megabatch at a time: [rows, 128, 64] float32",
        f"  a run of your own: edit {config} (model_name, data_key, hooks, sizes, run_name), then",
        f"    activault collect --config {config}",
    ]


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
    if result.bytes_written:
        print(
            f"\n{result.files} files, {result.tokens:,} tokens, "
            f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f}s"
        )
    else:  # collect found the machine finished: the figures above are the stored run's
        print(
            f"\nthe run {result.destination} was already complete, so nothing was collected this time "
            f"(it holds {result.files} files, {result.tokens:,} tokens); to collect it anew, pass another "
            "--storage folder or --keep DIR"
        )
    if keep:
        print(f"\nkept in {keep}: model/ (weights and tokenizer), corpus.jsonl, config.yaml and vault/.")
    else:
        print(f"\nthe demo's model and tokenizer are in {model_dir}, its config is {_shown(cfg_path)}.")
    print("\n".join(next_steps(cfg, cfg_path)))
