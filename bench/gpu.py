"""The GPU check (issue 14): correctness and speed of the CUDA path, one JSON and one summary.

    scripts/gpu_check.sh OUTDIR [--cpu]     # installs missing wheels, then runs this module
    python -m bench.gpu OUTDIR [--cpu] [--budget SECONDS] [--keep]

On CUDA: a random-weight Llama (16 layers, d_model 2048, bf16, sdpa) is collected with several hook
kinds into a local store and checked against independent computations (section 1), then timed
against its own limits in the same run (section 2, bench/gpu_speed.py). Without CUDA, or with
--cpu, the same checks run on a tiny fp32 model on the CPU and the GPU-only entries are reported
as skipped. Writes OUTDIR/gpu_check.json (after every entry, so a timeout keeps what ran) and
OUTDIR/summary.md; exits 1 when a correctness entry failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.gpu_common import CPU, GPU, Context, Report, Sizes, environment, hook_names, log, tiny
from bench.gpu_correctness import correctness
from bench.gpu_speed import speed


def build_model(path: Path, sz: Sizes) -> None:
    """Tokenizer (trained locally) and random-weight Llama, saved as a local checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny().build_tokenizer(path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=sz.d,
        intermediate_size=sz.ffn,
        num_hidden_layers=sz.layers,
        num_attention_heads=sz.heads,
        num_key_value_heads=sz.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(sz.device):  # initialising 0.8B weights on the CPU would take longer than the check
        model = AutoModelForCausalLM.from_config(cfg, dtype=sz.torch_dtype)
    model.save_pretrained(str(path))
    del model


def write_corpus(path: Path, tokens: int, tokenizer: Any) -> None:
    """A local JSONL corpus of at least `tokens` tokens: the demo texts, shuffled and joined."""
    texts = tiny().demo_texts()
    per_char = sum(len(ids) for ids in tokenizer(texts)["input_ids"]) / sum(len(t) for t in texts)
    rng, chars = random.Random(0), 0
    with path.open("w") as f:
        while chars * per_char < 1.2 * tokens:
            doc = "\n\n".join(rng.sample(texts, rng.randint(1, 4)))
            f.write(json.dumps({"text": doc}) + "\n")
            chars += len(doc)


def setup(sz: Sizes, work: Path, deadline: float) -> Context:
    from transformers import AutoTokenizer

    model_dir, corpus = work / "model", work / "corpus.jsonl"
    log(f"building a random Llama ({sz.layers} layers, d_model {sz.d}, {sz.dtype}) in {model_dir}")
    build_model(model_dir, sz)
    seq, batch, n = sz.speed
    write_corpus(corpus, seq * batch * n, AutoTokenizer.from_pretrained(str(model_dir)))
    return Context(sz, work, model_dir, corpus, hook_names(sz.layers), deadline)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for gpu_check.json and summary.md")
    ap.add_argument("--cpu", action="store_true", help="run the CPU mode even where CUDA is available")
    ap.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds from the start; speed entries not started by then are skipped",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, stores)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a GPU run's output tail holds the check's lines, not load bars
    hf_logging.disable_progress_bar()
    sz = GPU if torch.cuda.is_available() and not args.cpu else CPU
    report = Report(args.out, environment(sz, args.cpu))
    work = Path(tempfile.mkdtemp(prefix="activault-gpu-check-", dir=os.environ.get("GPU_CHECK_TMP")))
    try:
        ctx = setup(sz, work, report.t0 + args.budget)
        for section, run in (("correctness", correctness), ("speed", speed)):
            try:
                run(report, ctx)
            except Exception as e:  # noqa: BLE001 - recorded; the other section still runs
                report.run(section, f"{section}_aborted", partial(_raise, e), device=sz.device)
    except Exception as e:  # noqa: BLE001 - no model or corpus: say so in the report too
        report.run("correctness", "setup", partial(_raise, e), device=sz.device)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        report.write_json()
        report.write_summary()
    log(
        f"wrote {args.out / 'gpu_check.json'} and {args.out / 'summary.md'}; correctness "
        f"{'passed' if report.ok else 'FAILED'}"
    )
    return 0 if report.ok else 1


def _raise(e: Exception) -> tuple[str, str, dict]:
    """Hands an exception caught outside an entry to Report.run, which records it as an error."""
    raise e


if __name__ == "__main__":
    sys.exit(main())
