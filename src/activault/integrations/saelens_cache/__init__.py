"""`activault export` / `activault import`: a run to and from SAELens's cached activations.

`export_saelens` writes hooks of a run as the HF `datasets` folder that SAELens's
`CacheActivationsRunner` writes and trains from (`use_cached_activations=True`,
`cached_activations_path=...`); `import_saelens` turns such a folder into a normal run.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from activault.errors import ConfigError

if TYPE_CHECKING:
    from activault.integrations.saelens_cache.exporter import ExportResult, export_saelens
    from activault.integrations.saelens_cache.importer import ImportResult, import_saelens

__all__ = ["ExportResult", "ImportResult", "add_subcommands", "export_saelens", "import_saelens"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI builds its parser with add_subcommands without importing torch or datasets.
    if name in ("ExportResult", "export_saelens"):
        from activault.integrations.saelens_cache import exporter

        return getattr(exporter, name)
    if name in ("ImportResult", "import_saelens"):
        from activault.integrations.saelens_cache import importer

        return getattr(importer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """`activault export` and `activault import`, for the CLI's subparsers."""
    ex = sub.add_parser("export", help="write hooks of a run as a SAELens activation cache (HF datasets folder)")
    ex.add_argument("run_uri", help="the run folder: PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    ex.add_argument("out_dir", help="a new folder for the cache (SAELens's cached_activations_path)")
    ex.add_argument(
        "--hook",
        action="append",
        required=True,
        help="a hook to export (repeat for a transcoder's pair)",
    )
    ex.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="HOOK=NAME",
        help="column name for a hook, e.g. models.layers.6.post=blocks.6.hook_resid_post",
    )
    ex.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default=None,
        help="default: as stored (bf16 -> float32)",
    )
    ex.add_argument(
        "--positions",
        action="store_true",
        help="add a positions column (keeps document boundaries)",
    )
    ex.add_argument("--shard-mb", type=int, default=500, help="MiB per Arrow file (default 500)")
    ex.set_defaults(func=_export_cmd)

    im = sub.add_parser("import", help="write a SAELens activation cache as a run (resumes if killed)")
    im.add_argument("cache_dir", help="the cache folder (SAELens's cached_activations_path)")
    im.add_argument("run_uri", help="the new run: PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    im.add_argument(
        "--hook",
        action="append",
        default=None,
        metavar="COLUMN[=HOOK]",
        help="a column to import, optionally renamed (default: every activation column)",
    )
    im.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="stored dtype")
    im.add_argument(
        "--rows-per-file",
        type=int,
        default=None,
        help="rows per megabatch (default ~256 MiB files)",
    )
    im.add_argument("--model", default=None, help="the model's name or path, recorded in cfg.json")
    im.set_defaults(func=_import_cmd)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or (sep and not value):
            raise ConfigError(f"{flag} {item!r}: write NAME or NAME=OTHER")
        out[key] = value or key
    return out


def _export_cmd(args: argparse.Namespace) -> int:
    from activault.integrations.saelens_cache.exporter import export_saelens

    r = export_saelens(
        args.run_uri,
        args.hook,
        args.out_dir,
        columns=_pairs(args.column, "--column"),
        dtype=args.dtype,
        positions=args.positions,
        shard_bytes=args.shard_mb << 20,
    )
    print(
        f"exported {r.rows:,} rows ({r.tokens:,} tokens) to {r.out_dir} in {r.arrow_files or 'its'} Arrow "
        f"file(s), {r.seconds:.1f}s"
        + (
            f"; {r.padding_rows} row(s) end in padding ({r.padding_tokens} tokens: pad id, zero activations; "
            "SAELens skips them with exclude_special_tokens=True, import keeps them as padding)"
            if r.padding_rows
            else ""
        )
    )
    return 0


def _import_cmd(args: argparse.Namespace) -> int:
    from activault.integrations.saelens_cache.importer import import_saelens

    hooks = _pairs(args.hook, "--hook") if args.hook else None
    r = import_saelens(
        args.cache_dir,
        args.run_uri,
        hooks=hooks,
        dtype=args.dtype,
        rows_per_file=args.rows_per_file,
        model=args.model,
    )
    bad = {h: n for h, n in r.nonfinite.items() if n}  # as collect's on_nonfinite: warn reports them
    print(
        f"imported {r.rows:,} rows ({r.tokens:,} tokens) into {r.run}: {r.files} files"
        + (f", resumed at row {r.resumed_at_row:,}" if r.resumed_at_row else "")
        + (f"; tokens with NaN or Inf stored (left out of the statistics): {bad}" if bad else "")
    )
    print(f"  note: {r.provenance}")
    return 0
