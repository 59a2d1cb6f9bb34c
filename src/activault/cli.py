"""Command line: parses arguments and calls library functions; nothing else."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import ActivaultError


def _collect(args: argparse.Namespace) -> int:
    from .collect import collect
    from .config import load_config

    cfg = load_config(args.config)
    collect(cfg, machine=args.machine, storage=args.storage, show_progress=not args.quiet)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(storage=args.storage)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="activault", description="Collect, store and stream LLM activations.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="collect activations as a config says")
    c.add_argument("--config", required=True, help="YAML config (see configs/README.md)")
    c.add_argument("--machine", type=int, default=0, help="this machine's index, 0 <= i < num_runs")
    c.add_argument("--storage", default=None, help="override the destination: PATH, file://PATH or s3://BUCKET[/PREFIX]")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_collect)

    d = sub.add_parser("demo", help="offline demo: tiny model, local store, read back")
    d.add_argument("--storage", default="./vault", help="local store folder (default ./vault)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "datasets", "httpx", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ActivaultError as e:
        print(f"activault: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("activault: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
