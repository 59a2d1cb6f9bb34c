"""Looking at stored activations: inspect a megabatch, list a store, hook statistics, estimates.

The shell (`shell.py`), the scriptable commands (`activault ls|inspect|stats|estimate`) and the run
checker (`verify.py`) share these functions; each takes a `Store` and keys relative to it, and raises ActivaultError
subclasses for anything a user can get wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from activault import dtypes
from activault.collection.model import hub_offline
from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import Entry, Store, locate
from activault.storage.base import join
from activault.units import human_bytes
from activault.vault import original as orig
from activault.vault.megabatch import (
    CODECS_KEY,
    DTYPES,
    Megabatch,
    decode,
    fetch_header,
    is_megabatch,
    megabatch_files,
)
from activault.vault.original import OriginalStatistics
from activault.vault.records import (
    HookStatistics,
    read_original_statistics,
    read_run,
    read_statistics,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PREVIEW_ROWS = 4
PREVIEW_CHARS = 250


def parent(key: str, levels: int = 1) -> str:
    for _ in range(levels):
        key = key.rsplit("/", 1)[0] if "/" in key else ""
    return key


def printable(name: str) -> str:
    """A name as printed: as it is, or escaped in quotes (repr) when it holds a newline or another
    character a terminal would act on rather than show."""
    return name if name.isprintable() else repr(name)


def list_dir(store: Store, key: str) -> tuple[list[str], list[Entry]]:
    """`Store.list_dir` with its types spelled out (inside `Store`, `list` names the method)."""
    dirs, files = store.list_dir(key)
    return dirs, files


# ---- tokenizers ---------------------------------------------------------------------------------


class Tokenizers:
    """Tokenizers by name, loaded on first use (from a local folder or the local HF cache first)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, str]] = {}

    def get(self, name: str | None) -> tuple[Any, str]:
        """(tokenizer or None, why not)."""
        if not name:
            return None, "the run names no tokenizer"
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    @staticmethod
    def _load(name: str) -> tuple[Any, str]:
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            try:
                return AutoTokenizer.from_pretrained(name, local_files_only=True), ""
            except Exception:  # noqa: BLE001 - not local: try the hub unless it is off limits
                if _local_path(name):  # a damaged folder's own error says more than "offline"
                    raise
                if hub_offline():  # checked in 2 s: the hub client itself retries for ~50 s
                    return None, offline_note(name)
                return AutoTokenizer.from_pretrained(name), ""
        except Exception as e:  # noqa: BLE001 - any failure: show ids instead
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return None, f"cannot load tokenizer {name!r} ({msg[:160]})"


def _local_path(name: str) -> bool:
    try:
        return Path(name).is_absolute() or Path(name).exists()
    except (OSError, ValueError):  # a name no path can have: a hub id, refused as one
        return False


def offline_note(name: str) -> str:
    """Why a hub tokenizer cannot decode the rows here, and how to get the text."""
    return (
        f"cannot decode the text: tokenizer {name!r} is not in the local Hugging Face cache and the Hub is "
        f"unreachable (or HF_HUB_OFFLINE is set); to see text, fill the cache here (`hf download {name}` on "
        "a connected machine, then copy its HF_HOME), or run with network and HF_HUB_OFFLINE unset"
    )


# ---- inspect ------------------------------------------------------------------------------------


@dataclass
class Inspection:
    """What one megabatch holds: tensors, checks, and its rows as text (or ids)."""

    url: str
    model: str
    tokenizer: str | None
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    checks: dict[str, Any]
    rows: list[list[int]] = field(repr=False)
    decoded: bool = False
    decode_note: str = ""
    provenance: str = ""  # an imported run's source, and whether its documents attended to each other
    _decode: Callable[[list[int]], str] | None = field(default=None, repr=False)

    def row_text(self, i: int) -> str:
        if not 0 <= i < len(self.rows):
            raise IndexError(i)
        if self._decode is not None:
            return self._decode(self.rows[i])
        return " ".join(map(str, self.rows[i]))

    def preview(self, n: int = PREVIEW_ROWS, width: int = PREVIEW_CHARS) -> list[str]:
        out = []
        for i in range(min(n, len(self.rows))):
            text = self.row_text(i).replace("\n", "\\n")
            out.append(text[:width] + ("... (truncated)" if len(text) > width else ""))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.url,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "tensors": self.tensors,
            "metadata": self.metadata,
            "checks": self.checks,
            "rows": len(self.rows),
            "decoded": self.decoded,
            "decode_note": self.decode_note,
            "provenance": self.provenance,
            "preview": self.preview(),
        }

    def lines(self) -> list[str]:
        def mark(ok: bool) -> str:
            return "✅" if ok else "❌"

        c = self.checks
        out = [f"Inspecting file: {printable(self.url)}", "-" * 40, f"Model: {self.model}"]
        out += [f"Provenance: {self.provenance}"] if self.provenance else []
        out += ["", "Tensor Shapes:"]
        out += [
            f"  {k}: {v['shape']} {v['dtype']}" + (f"  (stored {v['stored']})" if "stored" in v else "")
            for k, v in self.tensors.items()
        ]
        out += ["", "States Tensor Check:", f"  No NaNs: {mark(not c['nan'])}", f"  No Infs: {mark(not c['inf'])}"]
        if c["nonfinite_tokens"]:
            out.append(f"  Tokens with NaN/Inf: {c['nonfinite_tokens']:,}")
        out.append(f"  Checksums: {c['checksums']}")
        if c["min"] is not None:
            out.append(f"  Value range: [{c['min']:.3f}, {c['max']:.3f}]")
        n = min(PREVIEW_ROWS, len(self.rows))
        what = "text" if self.decoded else "token ids"
        out += ["", f"First {n} rows as {what} (first {PREVIEW_CHARS} chars each):", "-" * 40]
        if not self.decoded:
            out.append(f"  ({self.decode_note}; showing ids)")
        out += [f"Row {i}: {t}" for i, t in enumerate(self.preview())]
        return out


def read_megabatch(
    store: Store, key: str, size: int | None = None, verify: bool = True, d_model: int | None = None
) -> Megabatch:
    """A whole megabatch, its header validated before the body is fetched, checksums checked.

    Args:
        d_model: the hook's width from cfg.json's hook_dims, if known: a header that says otherwise
            is refused before anything is decoded from it.
    """
    name = store.url(key)
    if not is_megabatch(key):
        raise FormatError(f"{name} is not a megabatch (.safetensors or .pt); inspect a file inside a hook folder")
    size = store.size(key) if size is None else size
    if size is None:
        dirs, files = list_dir(store, key)
        if dirs or files:
            raise FormatError(f"{name} is a folder; inspect a megabatch file inside it")
        raise NotFoundError(f"{name} does not exist; list the folder with `activault ls`")
    header = None if key.endswith(".pt") else fetch_header(store, key, size)
    if header is not None and d_model is not None and header.d_model != d_model:
        raise FormatError(
            f"{name}: its header says states are [{header.rows}, {header.seq_len}, {header.d_model}] "
            f"{dtypes.name(header.dtype)}, cfg.json's hook_dims give this hook d = {d_model}: the file's "
            "header is damaged or edited; restore the file or collect it again"
        )
    return decode(store.get(key), name, header, verify_checksums=verify)


def nonfinite_tokens(states: torch.Tensor) -> int:
    """Tokens of `states: [..., d]` with a NaN or Inf in any dimension."""
    return int((~torch.isfinite(states.reshape(-1, states.shape[-1]))).any(1).sum())


def _value_checks(states: torch.Tensor) -> dict[str, Any]:
    """NaN and Inf flags, tokens holding them, and the range of the finite values."""
    finite = states.float() if states.dtype in (torch.float16, torch.bfloat16) else states
    nan, inf = bool(torch.isnan(finite).any()), bool(torch.isinf(finite).any())
    ok = finite[torch.isfinite(finite)]
    return {
        "nan": nan,
        "inf": inf,
        "nonfinite_tokens": nonfinite_tokens(states),
        "min": float(ok.min()) if ok.numel() else None,
        "max": float(ok.max()) if ok.numel() else None,
    }


def _token_rows(ids: torch.Tensor, pos: torch.Tensor | None) -> list[list[int]]:
    """The non-padding token ids of each row (ids, positions: [rows, seq])."""
    ids2 = ids.reshape(ids.shape[0], -1)
    rows = []
    for i in range(ids2.shape[0]):
        row = ids2[i] if pos is None else ids2[i][pos.reshape(ids2.shape)[i] >= 0]
        rows.append([int(t) for t in row.tolist()])
    return rows


def _stored(meta: dict[str, str], key: str) -> dict[str, str]:
    """How a compressed tensor is stored, for the tensor list; nothing for a raw one."""
    c = json.loads(meta.get(CODECS_KEY, "{}")).get(key)
    if c is None:
        return {}
    raw = math.prod(c["shape"]) * DTYPES[c["dtype"]].itemsize
    return {
        "stored": f"{c['codec']} level {c['level']}, {len(c['chunks'])} chunk(s), "
        f"{human_bytes(sum(c['chunks']))} = {sum(c['chunks']) / max(raw, 1):.3f} of raw"
    }


def inspect_file(store: Store, key: str, tokenizers: Tokenizers | None = None) -> Inspection:
    """Read one megabatch whole and describe it."""
    cfg = read_run(store, parent(key, 2), original_ok=True) if "/" in key else None
    hook = parent(key).rsplit("/", 1)[-1]
    mb = read_megabatch(store, key, d_model=cfg.hook_dims.get(hook) if cfg else None)
    meta = mb.metadata
    tok_name = (cfg.tokenizer if cfg else None) or meta.get("model")
    model = meta.get("model") or (cfg.model.get("name") if cfg else None) or "(unknown)"
    checks = _value_checks(mb.states)
    checks["checksums"] = (
        "none (a .pt file of the original Activault)"
        if mb.header is None
        else "verified"
        if mb.header.checksums
        else "none (written before checksums)"
    )
    insp = Inspection(
        url=store.url(key),
        model=model,
        tokenizer=tok_name,
        tensors={
            k: {"shape": list(t.shape), "dtype": dtypes.name(t.dtype), **_stored(meta, k)}
            for k, t in mb.tensors.items()
        },
        metadata=meta,
        checks=checks,
        rows=_token_rows(mb.input_ids, mb.positions),
        provenance=cfg.imported_from.provenance() if cfg and cfg.imported_from else "",
    )
    tok, why = (tokenizers or Tokenizers()).get(tok_name)
    if tok is None:
        insp.decode_note = why
    else:
        insp.decoded = True
        insp._decode = lambda r: str(tok.decode(r))
    return insp


# ---- ls -----------------------------------------------------------------------------------------

_FOREIGN_KINDS = {
    "link": "a symbolic link, never followed",
    "special": "a FIFO, device or socket",
    "badkey": "its key has an empty, '.' or '..' part",
}


def foreign(e: Entry) -> str | None:
    """Why a listed object is none of activault's (never read, never counted), or None if it may be."""
    if e.kind != "file":
        return _FOREIGN_KINDS[e.kind]
    if is_megabatch(e.key) and e.size < 8:  # every write is whole, so this is not a partial one of ours
        return f"{e.size} bytes, too short for a megabatch"
    return None


def list_lines(store: Store, key: str, files: bool = False) -> list[str]:
    """Runs, hooks (file counts and sizes) and other files under `key`; every file with `files`."""
    size = store.size(key) if key else None
    if size is not None:
        return [f"{store.url(key)}  {human_bytes(size)}"]
    entries = store.list(key)
    if not entries:
        raise NotFoundError(f"{store.url(key)} is empty or does not exist")
    by_dir: dict[str, list[Any]] = {}
    strange = []
    for e in entries:
        rel = e.key[len(key) :].strip("/") if key else e.key
        if (why := foreign(e)) is not None:
            strange.append(f"    {printable(rel)}  ({why})")
        else:
            by_dir.setdefault(parent(rel), []).append((rel, e.size))
    hooks = {
        d
        for d, fs in by_dir.items()
        if any(is_megabatch(r) or r.endswith("/metadata.json") or r == "metadata.json" for r, _ in fs)
    }
    out = [f"{store.url(key)}"]
    for d in sorted(by_dir):
        fs = by_dir[d]
        if d in hooks:
            mb = [s for r, s in fs if is_megabatch(r)]
            out.append(f"  {printable(d or '.')}/  {len(mb)} files  {human_bytes(sum(mb))}")
            shown = fs if files else [(r, s) for r, s in fs if not is_megabatch(r)]
        else:
            shown = fs
        indent = "    " if d in hooks else "  "
        out += [f"{indent}{printable(r)}  {human_bytes(s)}" for r, s in shown]
    if strange:
        out += [
            "  foreign objects, skipped (activault never writes these; delete them with `rm` in `activault shell`):",
            *strange,
        ]
    return out


# ---- stats --------------------------------------------------------------------------------------


def hook_statistics(store: Store, hook: str) -> HookStatistics:
    stats = read_statistics(store, hook)
    if stats is None:
        raise NotFoundError(
            f"{store.url(join(hook, 'statistics.json'))} does not exist; give RUN/HOOK of a finished run "
            "(statistics are written when a machine finishes)"
        )
    return stats


def stats_lines(stats: HookStatistics, where: str) -> list[str]:
    mean, std = torch.tensor(stats.mean), torch.tensor(stats.std)
    lines = [
        f"statistics of {where}",
        f"  count       {stats.count:,} tokens",
        f"  d_model     {mean.numel()}",
        f"  mean norm   {stats.norm:.4f}",
        f"  mean range  [{float(mean.min()):.4f}, {float(mean.max()):.4f}]  (|mean| {float(mean.norm()):.4f})",
        f"  std range   [{float(std.min()):.4f}, {float(std.max()):.4f}]  (average {float(std.mean()):.4f})",
        f"  machines    {stats.machines}",
    ]
    if stats.nonfinite:
        left = "left out of the statistics" if stats.stats_version > 1 else "counted in: NaN statistics"
        lines.append(f"  NaN/Inf     {stats.nonfinite:,} tokens ({left})")
    return lines


def sample_norms(store: Store, hook: str, files: int = 4) -> torch.Tensor:
    """L2 norms of the non-padding tokens of up to `files` megabatches spread over the hook folder."""
    _, entries = list_dir(store, hook)
    sizes = {join(hook, n): size for n, size in megabatch_files(entries).items()}
    keys = list(sizes)
    if not keys:
        return torch.empty(0)
    step = max(1, len(keys) // files)
    norms = []
    for key in keys[::step][:files]:
        mb = read_megabatch(store, key, sizes[key], verify=False)
        s = mb.states.float().reshape(-1, mb.states.shape[-1])
        if mb.positions is not None:
            s = s[mb.positions.reshape(-1) >= 0]
        norms.append(torch.linalg.vector_norm(s, dim=1))
    return torch.cat(norms)


def original_stats_lines(stats: OriginalStatistics, where: str) -> list[str]:
    """The original Activault's statistics, shown as what they are: not exact."""
    mean, std = torch.tensor(stats.mean), torch.tensor(stats.std)
    norm = "unknown" if stats.norm is None else f"{stats.norm:.4f}"
    return [
        f"statistics of {where}: NOT EXACT, written by the original Activault",
        "  count       unknown (it stores none)",
        f"  d_model     {mean.numel()}",
        f"  mean norm   {norm}",
        f"  mean range  [{float(mean.min()):.4f}, {float(mean.max()):.4f}]  (|mean| {float(mean.norm()):.4f})",
        f"  std range   [{float(std.min()):.4f}, {float(std.max()):.4f}]  (average {float(std.mean()):.4f})",
        "  machines    0 only",
        f"  note: {orig.NOT_EXACT}",
    ]


def stats_figure(stats: HookStatistics | OriginalStatistics, norms: torch.Tensor, title: str = "") -> Figure:
    """Per-dimension mean and std, and a histogram of token norms (Agg backend, no display)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed: pip install 'activault[plot]' (or pip install matplotlib)"
        ) from None

    fig = Figure(figsize=(10, 8), layout="constrained")
    ax_mean, ax_std, ax_norm = fig.subplots(3, 1)
    ax_mean.plot(stats.mean, lw=0.8)
    ax_mean.set(title="mean per dimension", xlabel="dimension", ylabel="mean")
    ax_std.plot(stats.std, lw=0.8, color="tab:orange")
    ax_std.set(title="std per dimension", xlabel="dimension", ylabel="std")
    ax_norm.hist(norms.numpy(), bins=min(100, max(10, norms.numel() // 20)), color="tab:green")
    ax_norm.set(title=f"token L2 norms ({norms.numel():,} sampled tokens)", xlabel="L2 norm", ylabel="tokens")
    if title:
        fig.suptitle(title)
    return fig


# ---- commands (called by cli.py) -----------------------------------------------------------------


def run_ls(uri: str, files: bool = False) -> int:
    store, key = locate(uri)
    print("\n".join(list_lines(store, key, files)))
    return 0


def run_inspect(uri: str, as_json: bool = False) -> int:
    store, key = locate(uri)
    insp = inspect_file(store, key)
    print(json.dumps(insp.to_dict(), indent=1, ensure_ascii=False) if as_json else "\n".join(insp.lines()))
    return 0


def run_stats(uri: str, plot: str | None = None, sample_files: int = 4) -> int:
    store, key = locate(uri)
    stats: HookStatistics | OriginalStatistics
    if (old := read_original_statistics(store, key)) is not None:  # shown as not exact
        stats, lines = old, original_stats_lines(old, store.url(key))
    else:
        stats = exact = hook_statistics(store, key)
        lines = stats_lines(exact, store.url(key))
    print("\n".join(lines))
    if plot:
        title = store.url(key) + (" (the original Activault's statistics: not exact)" if old is not None else "")
        fig = stats_figure(stats, sample_norms(store, key, sample_files), title=title)
        fig.savefig(plot, dpi=100)
        print(f"plot written to {plot}")
    return 0
