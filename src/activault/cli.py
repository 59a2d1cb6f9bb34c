"""Command line: parses arguments and calls library functions; nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from activault.errors import ActivaultError
from activault.version import __version__


def _collect(args: argparse.Namespace) -> int:
    from activault.collection.pipeline import collect
    from activault.config import load_config

    cfg = load_config(args.config)
    collect(cfg, machine=args.machine, storage=args.storage, show_progress=not args.quiet, repair=args.repair)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from activault.tools.demo import run_demo

    run_demo(storage=args.storage, keep=args.keep)
    return 0


def _shell(args: argparse.Namespace) -> int:
    from activault.tools.shell import run_shell

    return run_shell(args.root)


def _hooks(args: argparse.Namespace) -> int:
    from activault.tools.hook_names import run_hooks

    return run_hooks(args.model, dtype=args.dtype, as_json=args.json)


def _ls(args: argparse.Namespace) -> int:
    from activault.tools.inspection import run_ls

    return run_ls(args.uri, files=args.files)


def _inspect(args: argparse.Namespace) -> int:
    from activault.tools.inspection import run_inspect

    return run_inspect(args.uri, as_json=args.json)


def _verify(args: argparse.Namespace) -> int:
    from activault.tools.verify import run_verify

    return run_verify(args.uri, deep=args.deep)


def _context(args: argparse.Namespace) -> int:
    from activault.tools.context import run_context

    return run_context(args.run_uri, args.hook, args.file, args.row, args.column, args.window, args.json)


def _stats(args: argparse.Namespace) -> int:
    from activault.tools.inspection import run_stats

    return run_stats(args.uri, plot=args.plot, sample_files=args.sample_files)


def _estimate(args: argparse.Namespace) -> int:
    from activault.collection.preflight import run_estimate

    return run_estimate(args.config, price=args.price, bandwidth=args.bandwidth, storage=args.storage)


def _shuffle(args: argparse.Namespace) -> int:
    from activault.tools.shuffle import run_shuffle

    return run_shuffle(args.src, args.dst, seed=args.seed, memory=int(args.memory_gib * (1 << 30)))


def _recompress(args: argparse.Namespace) -> int:
    from activault.tools.recompress import run_recompress

    return run_recompress(args.run_uri, args.compression, args.level, args.chunk_kib, args.threads, args.force)


def _evaluate(args: argparse.Namespace) -> int:
    from activault.evaluation.api import run_evaluate

    lm = not args.no_lm
    split = (args.split, args.test_fraction, args.split_seed)
    return run_evaluate(args.uri, args.sae, args.hook, args.max_tokens, lm, args.model, args.device, args.json, *split)


def _launch(args: argparse.Namespace) -> int:
    from activault.tools.launch import (
        RayLauncher,
        SlurmLauncher,
        check_launch,
        parse_env,
        parse_resources,
        run_launch,
    )

    launcher: RayLauncher | SlurmLauncher
    if args.launcher == "ray":
        launcher = RayLauncher(args.address, parse_resources(args.resources), Path(args.log_dir))
    else:
        launcher = SlurmLauncher(args.script, args.array, args.max_parallel, args.sbatch_arg or [], Path(args.log_dir))
    launch = check_launch(args.config, args.n, args.start, args.end, env=parse_env(args.env), storage=args.storage)
    results = run_launch(launcher, launch, wait=args.wait, results_path=args.results)
    for r in results:
        if r.status == "submitted":
            print(f"{r.machine} | {r.handle}")
    return 1 if any(r.status == "failed" for r in results) else 0


def _merge_stats(args: argparse.Namespace) -> int:
    from activault.vault.runs import merge_run_statistics

    machines = merge_run_statistics(args.run_uri, finished_only=args.finished_only)
    print(f"statistics merged over finished machines {machines}")
    return 0


def _add_launch(sub: argparse._SubParsersAction) -> None:
    la = sub.add_parser("launch", help="run machines START..END of N on Slurm or Ray (N must equal num_runs)")
    kinds = la.add_subparsers(dest="launcher", required=True)
    for name in ("ray", "slurm"):
        k = kinds.add_parser(name, help=f"one {name} rank per machine, each running `activault collect --machine i`")
        k.add_argument("config", help="YAML config (the same path must be readable by the workers)")
        k.add_argument("n", type=int, help="machines in the run: must equal the config's num_runs")
        k.add_argument("start", type=int, nargs="?", default=0, help="first machine (default 0)")
        k.add_argument("end", type=int, nargs="?", default=None, help="last machine, inclusive (default N-1)")
        k.add_argument(
            "--wait",
            action="store_true",
            help="wait for the machines and report each one's result (Ray always waits: it ends a driver's tasks)",
        )
        k.add_argument(
            "--env",
            action="append",
            default=None,
            metavar="NAME[=VALUE]",
            help="environment variable for the workers (NAME alone passes this one's value; repeatable)",
        )
        k.add_argument("--storage", default=None, help="override the destination (as for collect)")
        k.add_argument("--log-dir", default="logs", help="machine -> job list, results and job output (default logs)")
        k.add_argument("--results", default=None, help="results JSON (default LOG_DIR/{ray,slurm}_results_TIME.json)")
        k.set_defaults(func=_launch)
        if name == "ray":
            k.add_argument("--address", default=None, help="Ray cluster address (default: auto-detect or start local)")
            k.add_argument(
                "--resources", default=None, help='per-worker resources as JSON, e.g. \'{"CPU": 8, "GPU": 1}\''
            )
        else:
            k.add_argument("--script", default=None, help="the batch script (default: the packaged collect.slurm)")
            k.add_argument("--array", action="store_true", help="submit one job array instead of one job per machine")
            k.add_argument("--max-parallel", type=int, default=None, help="with --array: at most this many at once")
            k.add_argument(
                "--sbatch-arg",
                action="append",
                default=None,
                metavar="ARG",
                help="extra sbatch option, e.g. --sbatch-arg=--partition=gpu (repeatable)",
            )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="activault",
        description="Collect, store and stream LLM activations. Start here: `activault demo` (offline, on a "
        "CPU), then `activault estimate --config YOUR.yaml` (tokens, bytes, cost; no weights load), then "
        "`activault collect --config YOUR.yaml`; `activault hooks MODEL` lists the hook names a config may use.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"activault {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="collect activations as a config says")
    c.add_argument("--config", required=True, help="YAML config (see configs/README.md)")
    c.add_argument("--machine", type=int, default=0, help="this machine's index, 0 <= i < num_runs")
    c.add_argument(
        "--storage", default=None, help="override the destination: PATH, file://PATH or s3://BUCKET[/PREFIX]"
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument(
        "--repair",
        action="store_true",
        help="collect again exactly this machine's counted files that are damaged or missing (the same "
        "bytes), leaving intact files untouched",
    )
    c.set_defaults(func=_collect)

    d = sub.add_parser("demo", help="offline demo: tiny model, local store, read back")
    d.add_argument("--storage", default="./vault", help="local store folder (default ./vault)")
    d.add_argument(
        "--keep",
        default=None,
        metavar="DIR",
        help="leave the tiny model, tokenizer, corpus and a config in DIR to start your own run from",
    )
    d.set_defaults(func=_demo)
    sh = sub.add_parser(
        "shell",
        aliases=["s3"],
        help="interactive shell (ls, cd, cat, rm, inspect) on --root, a local folder or s3://BUCKET[/PREFIX] "
        "(default s3://$S3_BUCKET_NAME); `s3` is another name for it",
    )
    sh.add_argument(
        "--root", default=None, help="s3://BUCKET[/PREFIX] or a local store folder (default s3://$S3_BUCKET_NAME)"
    )
    sh.set_defaults(func=_shell)

    hk = sub.add_parser(
        "hooks",
        help="the hook names a config may use on a model, with width, bytes per token and module (no weights load)",
    )
    hk.add_argument(
        "model",
        help="a local folder holding config.json, a shipped config's hub id (e.g. HuggingFaceTB/SmolLM2-135M), "
        "or a hub id in the Hugging Face cache",
    )
    hk.add_argument("--dtype", default="bfloat16", help="the config's transformer_config.dtype (default bfloat16)")
    hk.add_argument("--json", action="store_true", help="print JSON: every hook of every block")
    hk.set_defaults(func=_hooks)

    ls = sub.add_parser("ls", help="list runs, hooks and files under a URI")
    ls.add_argument("uri", help="PATH, file://PATH or s3://BUCKET[/PREFIX]")
    ls.add_argument("--files", action="store_true", help="list every megabatch, not only counts per hook")
    ls.set_defaults(func=_ls)

    ins = sub.add_parser("inspect", help="describe one megabatch: shapes, NaN/Inf checks, range, rows as text")
    ins.add_argument("uri", help="a megabatch file: PATH or s3://BUCKET/RUN/HOOK/FILE.safetensors")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=_inspect)

    ver = sub.add_parser("verify", help="check a stored run; exits 1 and lists the problems if any")
    ver.add_argument("uri", help="the run folder: PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    ver.add_argument(
        "--deep",
        action="store_true",
        help="read every file whole: check each tensor's checksum, count NaN/Inf per hook",
    )
    ver.set_defaults(func=_verify)

    cx = sub.add_parser("context", help="a stored token's document text around it, the token marked")
    cx.add_argument("run_uri", help="the run folder: PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    cx.add_argument("hook", help="the hook folder's name")
    cx.add_argument("file", help="the megabatch, e.g. m00000-000003.safetensors")
    cx.add_argument("row", type=int, help="the token's row in the file")
    cx.add_argument("column", type=int, help="the token's column in the row")
    cx.add_argument("--window", type=int, default=32, help="tokens shown on each side (default 32)")
    cx.add_argument("--json", action="store_true", help="print JSON")
    cx.set_defaults(func=_context)

    st = sub.add_parser("stats", help="a hook's statistics; --plot draws mean, std and token norms")
    st.add_argument("uri", help="the hook folder: PATH/RUN/HOOK or s3://BUCKET/RUN/HOOK")
    st.add_argument("--plot", default=None, help="write a PNG here")
    st.add_argument("--sample-files", type=int, default=4, help="megabatches read for the norm histogram")
    st.set_defaults(func=_stats)

    est = sub.add_parser("estimate", help="tokens, bytes, files, cost and upload time of a config (no weights load)")
    est.add_argument("--config", required=True, help="YAML config")
    est.add_argument("--price", type=float, default=None, help="USD per GB-month (default: the config's)")
    est.add_argument("--bandwidth", default="1Gbps", help="upload bandwidth, e.g. 1Gbps, 500Mbps, 100MB/s")
    est.add_argument("--storage", default=None, help="the destination collect would use (its free space is checked)")
    est.set_defaults(func=_estimate)

    _add_launch(sub)
    # export / import: SAELens activation caches
    from activault.integrations.saelens_cache import add_subcommands

    add_subcommands(sub)
    ms = sub.add_parser(
        "merge-stats",
        help="recompute a run's statistics.json from its finished machines (recounting from their files "
        "statistics that counted NaN/Inf tokens in)",
    )
    ms.add_argument("run_uri", help="the run folder: PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    ms.add_argument(
        "--finished-only",
        action="store_true",
        help="merge the finished machines alone (statistics.json lists them); without it, a machine that has "
        "not finished or whose record is damaged is an error naming it",
    )
    ms.set_defaults(func=_merge_stats)

    rc = sub.add_parser("recompress", help="store a run's files with another codec, in place, verified, resumable")
    rc.add_argument("run_uri", help="the run folder: PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    rc.add_argument(
        "--compression",
        required=True,
        choices=["none", "zstd", "fp8"],
        help="zstd: lossless; fp8: LOSSY (e4m3, a scale per token); none: back to raw",
    )
    rc.add_argument("--level", type=int, default=None, help="zstd level (default 1, as for collect)")
    rc.add_argument("--chunk-kib", type=int, default=None, help="raw KiB per compressed chunk (default 4096)")
    rc.add_argument("--threads", type=int, default=2, help="files converted at once (default 2)")
    rc.add_argument("--force", action="store_true", help="convert even while machines are still collecting")
    rc.set_defaults(func=_recompress)

    sh = sub.add_parser("shuffle", help="a new run: a uniform random permutation of a run's tokens, bounded memory")
    sh.add_argument("src", help="the run: PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    sh.add_argument("dst", help="the new run (empty, or a killed shuffle of SRC to resume)")
    sh.add_argument("--seed", type=int, default=0, help="the permutation's seed (default 0)")
    sh.add_argument("--memory-gib", type=float, default=4.0, help="GiB of tokens held at once (default 4)")
    sh.set_defaults(func=_shuffle)

    ev = sub.add_parser("evaluate", help="an SAE on a run's tokens: explained variance, L0, dead latents, CE recovered")
    ev.add_argument("uri", help="the run (PATH/RUN, s3://BUCKET/RUN; then --hook) or a hook's folder (PATH/RUN/HOOK)")
    ev.add_argument("sae", help="the folder a library saved the SAE in (SAELens, dictionary_learning, sparsify)")
    ev.add_argument("--hook", help="the hook the SAE reads (needed for a run of several hooks)")
    ev.add_argument("--split", choices=["test", "train"], help="only this side's documents (held out as readers split)")
    ev.add_argument("--test-fraction", type=float, help="with --split: as trained with (default 0.01, as readers)")
    ev.add_argument("--split-seed", type=int, help="with --split: as trained with (default 0, as readers)")
    ev.add_argument("--max-tokens", type=int, help="at most this many tokens for each measure (default: all)")
    ev.add_argument("--model", help="a local copy of the run's model, where cfg.json names one not on this machine")
    ev.add_argument("--no-lm", action="store_true", help="skip the language-model loss (no model loaded)")
    ev.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ev.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    ev.set_defaults(func=_evaluate)
    return p


def _setup_logging(verbose: bool) -> None:
    """Our messages through one handler on the `activault` logger; libraries keep their own.

    A handler on the root logger would print a second copy of every message from libraries that
    install their own handler and propagate (huggingface_hub's retries were printed twice). Ours
    still propagates, to no handler, so test and embedding tools that listen on the root see it.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s" if verbose else "%(message)s"))
    ours = logging.getLogger("activault")
    ours.handlers = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone shows here, handled below, not in Python's flush at exit
        return rc
    except ActivaultError as e:
        print(f"activault: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("activault: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `activault ls ... | head`: the reader has what it wanted
        # Python would report the pipe again when it flushes stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
