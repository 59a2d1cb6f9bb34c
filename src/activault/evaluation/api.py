"""`evaluate`: one evaluation of any sparse coder on a held-out run, whichever library trained it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from activault.collection.arch import is_causal_lm
from activault.config import TransformerConfig
from activault.dtypes import to_torch
from activault.errors import ConfigError, NotFoundError
from activault.evaluation.metrics import Reconstruction, ReconstructionMeter
from activault.evaluation.saved import check_coder, load_sae
from activault.evaluation.splice import LMLoss, lm_loss, stored_rows
from activault.reading.options import ReadOptions
from activault.reading.splits import Split
from activault.reading.tokens import TokenLoader
from activault.storage import Store, locate
from activault.vault.records import RunRecord, read_run


@dataclass(frozen=True)
class Evaluation:
    """An SAE measured on a run's tokens at one hook."""

    run: str
    hook: str
    library: str | None  # the library whose saved files were loaded; None for an object passed in
    reconstruction: Reconstruction
    lm: LMLoss | None  # None when skipped (lm=False) or impossible (lm_note says why)
    lm_note: str | None = None
    split: dict[str, object] | None = None  # the held-out side measured (Split.describe()); None: every document

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.lm is not None:
            out["lm"]["recovered"] = self.lm.recovered
        return out


@dataclass(frozen=True)
class _Target:
    store: Store
    run: str  # the run folder's key in store
    run_uri: str
    record: RunRecord
    hook: str


def _target(uri: str, hook: str | None) -> _Target:
    """The run and hook named by a run URI (+ hook) or a hook folder's URI."""
    store, key = locate(uri)
    base = uri.rstrip("/")
    record = read_run(store, key)
    if record is None and "/" in key.strip("/"):
        run_key, _, folder = key.strip("/").rpartition("/")
        record = read_run(store, run_key)
        if record is not None:
            if hook is not None and hook != folder:
                raise ConfigError(f"{uri} is the folder of hook {folder!r}, but hook {hook!r} was asked for")
            hook, key, base = folder, run_key, base.rpartition("/")[0]
    if record is None:
        raise NotFoundError(
            f"{uri} holds no cfg.json: pass a run folder (./vault/RUN) or a hook folder (./vault/RUN/HOOK)"
        )
    if hook is None:
        if len(record.hooks) != 1:
            raise ConfigError(f"{uri} has hooks {', '.join(record.hooks)}: name one (--hook H, or hook=)")
        hook = record.hooks[0]
    if hook not in record.hooks:
        raise NotFoundError(f"{base} has no hook {hook!r}; its hooks: {', '.join(record.hooks)}")
    return _Target(store, key, base, record, hook)


def _coder_dtype(sae: Any) -> torch.dtype:
    param = next(sae.parameters(), None) if isinstance(sae, nn.Module) else None
    return param.dtype if param is not None else torch.float32


def reconstruct_fn(sae: Any) -> Any:
    """x [..., d] -> decode(encode(x)) in the SAE's dtype, returned in x's."""
    dtype = _coder_dtype(sae)

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        return sae.decode(sae.encode(flat)).to(x.dtype).reshape(x.shape)

    return fn


def read_options(split: str | None, test_fraction: float | None, split_seed: int | None) -> ReadOptions:
    """How `evaluate` reads tokens: shuffled with seed 0, tokens with NaN or Inf left out (they would
    make every sum NaN; statistics.json leaves them out too), and the split checked and defaulted as
    every reader's."""
    given = {k: v for k, v in (("test_fraction", test_fraction), ("split_seed", split_seed)) if v is not None}
    if given and split is None:
        raise ConfigError(
            f"{' and '.join(given)} given without split: pass split='test' (--split test) to measure the "
            "held-out documents, with the test_fraction and split_seed the SAE was trained with"
        )
    return ReadOptions(seed=0, drop_nonfinite=True, split=split, **given)  # type: ignore[arg-type]  # checked there


def reconstruction(
    run_uri: str, hook: str, sae: Any, max_tokens: int | None, batch_tokens: int, device: str, options: ReadOptions
) -> Reconstruction:
    """Explained variance, MSE, L0, dead latents and density over the run's tokens read with `options`."""
    meter, dtype = ReconstructionMeter(), _coder_dtype(sae)
    loader = TokenLoader(
        run_uri, hooks=[hook], batch_tokens=batch_tokens, drop_last=False, device=device, options=options
    )
    with loader, torch.no_grad():
        for batch in loader:
            x = batch[hook]
            if max_tokens is not None:
                x = x[: max_tokens - meter.tokens]
            latents = sae.encode(x.to(dtype))
            meter.add(x, latents, sae.decode(latents))
            if max_tokens is not None and meter.tokens >= max_tokens:
                break
    if meter.tokens == 0:
        split = options.held_out
        where = "" if split is None else f" in split={split.name!r} ({_describe(split)})"
        fix = ": the run holds no data" if split is None else ": raise test_fraction, or evaluate without split"
        raise ConfigError(f"{run_uri} holds no finite token at {hook}{where} to evaluate on{fix}")
    return meter.result()


def _describe(split: Split) -> str:
    return _side(split.describe())


def _side(described: dict[str, object]) -> str:
    return f"test_fraction {described['test_fraction']}, split_seed {described['split_seed']}"


def load_lm(record: RunRecord, model: str | None, device: str) -> nn.Module | str:
    """The run's model with its LM head, from this machine only (never the Hub); or why there is none."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = record.config.get("transformer_config")
    if not isinstance(raw, dict) and model is None:
        return f"the run records no model (imported from {record.imported_from or 'elsewhere'}): pass model=PATH"
    tcfg = TransformerConfig.model_validate(
        {**(raw if isinstance(raw, dict) else {}), **({"model_name": model} if model else {})}
    )
    opts = {"cache_dir": tcfg.cache_dir, **tcfg.kwargs, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(tcfg.model_name, **opts)
        if not is_causal_lm(config):
            return f"{tcfg.model_name} is not a causal language model: no next-token loss"
        # flash_attention_2 needs CUDA; SDPA takes the same packed mask on every device.
        attn = (
            tcfg.attn_implementation if tcfg.attn_implementation != "flash_attention_2" or "cuda" in device else "sdpa"
        )
        config._attn_implementation = attn
        dtype = "auto" if tcfg.dtype == "auto" else to_torch(tcfg.dtype)
        lm = AutoModelForCausalLM.from_pretrained(tcfg.model_name, config=config, dtype=dtype, **opts)
    except OSError as e:
        raise ConfigError(
            f"the run's model {tcfg.model_name!r} is not on this machine ({str(e)[:200]}); evaluate loads local "
            "models only, never from the Hub: pass model=PATH (--model PATH) of a local copy, or lm=False (--no-lm)"
        ) from None
    module: nn.Module = lm  # transformers' typed .to() takes the model only as a PreTrainedModel
    return module.to(device).eval().requires_grad_(False)


def evaluate(
    uri: str,
    sae: Any,
    *,
    hook: str | None = None,
    split: str | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    max_tokens: int | None = None,
    lm: bool = True,
    model: str | None = None,
    batch_tokens: int = 4096,
    rows_per_forward: int = 8,
    device: str = "cpu",
) -> Evaluation:
    """Evaluate `sae` on the tokens of a run (URI of the run + `hook`, or of the hook's folder).

    Args:
        sae: an object with encode(x) -> latents and decode(latents) -> x_hat, or the folder a
            library saved it in (SAELens, dictionary_learning, sparsify: told from its files).
        split: "test" (or "train"): only that side's documents, for every measure, split as the
            readers split them (reading/splits.py); `test_fraction` and `split_seed` default to
            the readers' defaults: pass those the SAE was trained with.
        max_tokens: at most this many tokens for each measure (None: all of them).
        lm: also the language-model loss with the SAE spliced in (the run's model, local only).
        model: a local copy of the run's model, where cfg.json names one not on this machine.
    """
    if max_tokens is not None and max_tokens <= 0:
        raise ConfigError(f"max_tokens {max_tokens} is not a positive number of tokens")
    options = read_options(split, test_fraction, split_seed)
    side = options.held_out
    target = _target(uri, hook)
    library = None
    if isinstance(sae, (str, Path)):
        sae, library = load_sae(sae, device)
    check_coder(sae)
    rec = reconstruction(target.run_uri, target.hook, sae, max_tokens, batch_tokens, device, options)

    def result(loss: LMLoss | None, note: str | None = None) -> Evaluation:
        described = None if side is None else side.describe()
        return Evaluation(target.run_uri, target.hook, library, rec, loss, note, described)

    if not lm:
        return result(None, "not asked for")
    loaded = load_lm(target.record, model, device)
    if isinstance(loaded, str):
        return result(None, loaded)
    folder = f"{target.run}/{target.hook}" if target.run else target.hook
    rows = stored_rows(target.store, folder, max_tokens, side)
    return result(lm_loss(loaded, target.hook, reconstruct_fn(sae), rows, rows_per_forward))


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4f}"


def run_evaluate(
    uri: str,
    sae_path: str,
    hook: str | None,
    max_tokens: int | None,
    lm: bool,
    model: str | None,
    device: str,
    as_json: bool,
    split: str | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
) -> int:
    """`activault evaluate`: print the evaluation (or JSON)."""
    ev = evaluate(
        uri,
        sae_path,
        hook=hook,
        split=split,
        test_fraction=test_fraction,
        split_seed=split_seed,
        max_tokens=max_tokens,
        lm=lm,
        model=model,
        device=device,
    )
    if as_json:
        print(json.dumps(ev.to_dict(), indent=1))
        return 0
    r = ev.reconstruction
    side = "" if ev.split is None else f" of split {ev.split['split']} ({_side(ev.split)})"
    print(f"{ev.run} {ev.hook}: {ev.library or 'SAE'} {sae_path}, {r.tokens:,} tokens{side}")
    print(f"  explained variance  {_fmt(r.explained_variance)}   MSE {r.mse:.6g}   L0 {r.l0:.2f}")
    print(f"  dead latents        {r.dead:,} of {r.d_sae:,}   median density {r.density_median:.3g}")
    print("  density             " + "  ".join(f"{k}: {v}" for k, v in r.density.items()))
    if ev.lm is None:
        print(f"  LM loss             not measured: {ev.lm_note}")
    else:
        m = ev.lm
        print(f"  CE loss             clean {_fmt(m.clean)}   SAE {_fmt(m.sae)}   zero {_fmt(m.zero)}")
        print(f"  CE loss recovered   {_fmt(m.recovered)} ({m.tokens:,} predicted tokens)")
    return 0
