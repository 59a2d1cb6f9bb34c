"""`activault context`: a stored token's document text around it, the token marked.

A file's `documents` tensor gives each token's document ordinal in its machine's stream and
`positions` its index in that document's tokens (docs/format.md). The document is read again from
the run's source (cfg.json's `source`, the data settings of its config) and tokenized again with the
run's tokenizer, loaded from a local folder or the local cache only; the stored token id must be
found at its position, else the source or tokenizer changed and nothing is shown. Without the
tokenizer the stored ids of the document's piece in the row are shown instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from activault.collection.packing import document_at, encode_document
from activault.collection.resume import source_from_record
from activault.config import DataConfig
from activault.errors import ConfigError, DataError, FormatError, NotFoundError
from activault.storage.base import join
from activault.tools.shuffle import shuffled_machines, source_document
from activault.vault.megabatch import check_provenance, check_shuffled_provenance, decode
from activault.vault.records import RunRecord, parse_file_name
from activault.vault.runs import locate_run

log = logging.getLogger(__name__)

WINDOW = 32  # tokens shown on each side by default
MARK = ("[[", "]]")
CHANGED = (
    "the source or the tokenizer changed since the run was collected; restore the data and tokenizer "
    "the run was collected with"
)


@dataclass
class Context:
    """One stored token traced back to its document."""

    run: str
    hook: str
    file: str
    row: int
    column: int
    machine: int
    document: int  # ordinal in the machine's document stream
    position: int  # index in the document's tokens
    token_id: int
    tokenizer: str | None  # None: the tokenizer was not available locally, ids are shown
    token: str = ""  # the token's text (its id without a tokenizer)
    before: str = ""  # the document's text before it, up to `window` tokens
    after: str = ""
    ids: list[int] = field(default_factory=list)  # the window's token ids, the token's among them

    def text(self) -> str:
        """The window with the token marked."""
        return f"{self.before}{MARK[0]}{self.token}{MARK[1]}{self.after}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.text()}


def token_context(run_uri: str, hook: str, file: str, row: int, column: int, window: int = WINDOW) -> Context:
    """The document text around token (row, column) of `file` in `hook` of the run at `run_uri`.

    Raises one ActivaultError naming the problem: an unknown hook or file, coordinates out of range,
    a padding token, a file without provenance, or a source that no longer gives the stored token.
    """
    if window < 0:
        raise ConfigError(f"window {window} is negative; pass the tokens to show on each side (default {WINDOW})")
    found = locate_run(run_uri)
    rec, store = found.record, found.store
    if hook not in rec.hooks:
        raise NotFoundError(f"{run_uri} has no hook {hook!r}; its hooks: {', '.join(rec.hooks)}")
    name = file.rsplit("/", 1)[-1]
    name = name if name.endswith(".safetensors") else name + ".safetensors"
    parsed = parse_file_name(name)
    if parsed is None:
        raise ConfigError(
            f"{file!r} is not a megabatch name like m00000-000000.safetensors (`activault ls RUN --files`)"
        )
    machine = parsed[0]
    key = join(found.run, hook, name)
    url = store.url(key)
    try:
        mb = decode(store.get(key), url, verify_checksums=True)
    except NotFoundError:
        raise NotFoundError(f"{url} does not exist; `activault ls {run_uri} --files` lists the run's files") from None
    rows, seq = mb.input_ids.shape
    for what, value, bound in (("row", row, rows), ("column", column, seq)):
        if not 0 <= value < bound:
            raise DataError(f"{what} {value} is out of range: {name} holds {rows} rows of {seq} tokens")
    docs, pos = mb.documents, mb.positions
    if docs is None or pos is None:
        raise DataError(
            f"{url} was written before provenance (format version {mb.metadata.get('format_version', '?')}): it "
            "holds no document ordinals, so its tokens cannot be traced; a run collected by this activault can be"
        )
    if shuffled_machines(rec) is None:
        check_provenance(docs, pos, url)
    else:  # the run's record says its tokens were shuffled (`activault shuffle`): no order to check
        check_shuffled_provenance(docs, pos, url)
    stored, p, tid = int(docs[row, column]), int(pos[row, column]), int(mb.input_ids[row, column])
    if stored < 0:
        raise DataError(
            f"row {row}, column {column} of {name} is padding (the end of machine {machine}'s data), no token"
        )
    machine, doc, num_runs = source_document(rec, machine, stored)
    ctx = Context(found.record.run_name, hook, name, row, column, machine, doc, p, tid, None)
    tok = _tokenizer(rec)
    if tok is None:
        return _ids_only(ctx, mb.input_ids[row], docs[row] == stored, window)
    ctx.tokenizer = rec.tokenizer
    dc = _data_config(rec, run_uri)
    spec = source_from_record(rec.source) if rec.source is not None else None
    text = document_at(dc, doc, machine=machine, num_runs=num_runs, spec=spec)
    if text is None:
        raise DataError(f"machine {machine}'s source has no document {doc}: {CHANGED}")
    ids, _ = encode_document(
        text,
        tok,
        clean_added_tokens=dc.clean_added_tokens,
        clean_default_system_prompt=dc.clean_default_system_prompt,
    )
    if not p < len(ids) or ids[p] != tid:
        raise DataError(f"document {doc} tokenized again has not token {tid} at position {p}: {CHANGED}")
    lo, hi = max(0, p - window), min(len(ids), p + window + 1)
    ctx.before, ctx.token, ctx.after = tok.decode(ids[lo:p]), tok.decode([tid]), tok.decode(ids[p + 1 : hi])
    ctx.ids = ids[lo:hi]
    return ctx


def _ids_only(ctx: Context, ids: torch.Tensor, same_doc: torch.Tensor, window: int) -> Context:
    """The stored ids of the token's document in its row (`same_doc`: [seq] bool), around it: what is
    known without a tokenizer."""
    same = same_doc.nonzero().squeeze(1).tolist()
    at = same.index(ctx.column)
    shown = same[max(0, at - window) : at + window + 1]
    ctx.ids = [int(ids[c]) for c in shown]
    ctx.before = "".join(f"{int(ids[c])} " for c in shown if c < ctx.column)
    ctx.token = str(ctx.token_id)
    ctx.after = "".join(f" {int(ids[c])}" for c in shown if c > ctx.column)
    return ctx


def _tokenizer(rec: RunRecord) -> Any:
    """The run's tokenizer from a local folder or the local cache (never downloaded), else None."""
    if not rec.tokenizer:
        return None
    from transformers import AutoTokenizer

    tc = rec.config.get("transformer_config") if isinstance(rec.config, dict) else None
    kwargs = tc.get("kwargs") if isinstance(tc, dict) else None
    revision = kwargs.get("revision") if isinstance(kwargs, dict) else None
    try:
        return AutoTokenizer.from_pretrained(rec.tokenizer, revision=revision, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not cached, or a damaged folder: ids are shown instead
        log.warning("tokenizer %s not available locally (%s): showing token ids", rec.tokenizer, str(e)[:200])
        return None


def _data_config(rec: RunRecord, run_uri: str) -> DataConfig:
    """The run's data settings from cfg.json (its seed, shuffle and cleaning decide the stream)."""
    raw = rec.config.get("data_config") if isinstance(rec.config, dict) else None
    if not isinstance(raw, dict):
        raise FormatError(f"{run_uri}: cfg.json holds no data_config (an import, or damaged): no source to read")
    try:
        return DataConfig.model_validate(raw)
    except ValueError as e:
        raise FormatError(f"{run_uri}: cfg.json's data_config is not valid ({str(e)[:200]})") from None


def run_context(run_uri: str, hook: str, file: str, row: int, column: int, window: int, as_json: bool) -> int:
    """`activault context`: print the token's context (or JSON)."""
    ctx = token_context(run_uri, hook, file, row, column, window)
    if as_json:
        print(json.dumps(ctx.to_dict(), indent=1))
        return 0
    shown = ctx.tokenizer or "token ids (the run's tokenizer is not available locally)"
    print(
        f"{ctx.run} {ctx.hook}/{ctx.file} row {ctx.row}, column {ctx.column}: machine {ctx.machine}, "
        f"document {ctx.document}, position {ctx.position}, token {ctx.token_id} {ctx.token!r} ({shown})"
    )
    print(ctx.text())
    return 0
