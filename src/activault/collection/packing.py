"""Documents -> tokens -> packed batches: tokenization, cleaning masks, packing, resume.

Packing. Every row stores exactly ``seq_length`` kept tokens; tokens that cleaning drops (BOS, chat
specials, the template's default system prompt) are still forwarded, so a row is longer by its
cleaned count. Documents are packed greedily, each as its own segment (``segment_ids`` 1, 2, ...,
``position_ids`` restarting at 0). A document that does not fit is split just before the first
kept token that does not fit; its remainder opens the next row as a new segment whose model
positions restart at 0 (the model sees it without its earlier context, as a fresh document would
be seen), while ``doc_positions`` keep counting so the document can be reassembled. When the data
runs out, the last row is completed with kept padding (``doc_positions == -1``).

Provenance. ``documents`` holds each token's document ordinal: its index in the stream of documents
`sources.iter_documents` yields for this machine (documents with no stored token are counted too),
the same count `DataState.docs_done` keeps. That stream is the same on every run and resume (the
source reads its files in order, shards by machine and shuffles with the seed), so the ordinal finds
the document again (`document_at`).
"""

from __future__ import annotations

import itertools
import logging
import reprlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from activault.collection.sources import (
    BadRecords,
    DataSource,
    Doc,
    iter_documents,
    repair_messages,
    source_for,
)
from activault.config import DataConfig
from activault.errors import FormatError

log = logging.getLogger(__name__)

ENCODE_CHUNK = 64  # documents per fast-tokenizer call


@dataclass(frozen=True)
class DataState:
    """Resumable cursor over one machine's share of documents."""

    docs_done: int = 0  # documents of this machine's share fully consumed
    token_offset: int = 0  # tokens of the next document already consumed (split across rows)
    exhausted: bool = False
    bad_records: int = 0  # bad records before the next document (all of them once exhausted)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> DataState:
        """The cursor of a progress record's `data_state`, checked field by field: a damaged one would
        resume at a wrong place, or as finished. FormatError naming the field; the caller names the file.
        A missing field takes its default (records written before it existed)."""
        if not isinstance(d, Mapping):
            raise FormatError(f"data_state is a JSON {type(d).__name__}, not an object of {_STATE_FIELDS}")
        unknown = sorted(map(str, set(d) - set(_STATE_FIELDS)))
        if unknown:
            raise FormatError(f"data_state has unknown field(s) {unknown}; a collection's cursor holds {_STATE_FIELDS}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            v = d.get(f.name, f.default)
            if isinstance(f.default, bool):
                if not isinstance(v, bool):
                    raise FormatError(f"data_state field {f.name!r} is {reprlib.repr(v)}, not true/false")
            elif isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_COUNT:
                raise FormatError(f"data_state field {f.name!r} is {reprlib.repr(v)}, not a whole number in 0..2**62")
            values[f.name] = v
        state = cls(**values)
        if state.exhausted and state.token_offset:
            raise FormatError(
                f"data_state is exhausted with token_offset {state.token_offset}: a finished cursor has none"
            )
        return state


_STATE_FIELDS = [f.name for f in fields(DataState)]
# Cursor counts stay below 2**62, as a record's counts do (itertools.islice takes up to 2**63 - 1).
_MAX_COUNT = 1 << 62


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] int64; L >= seq_length (cleaned tokens are forwarded)
    position_ids: torch.Tensor  # [B, L] int64; restarts at 0 for each segment
    segment_ids: torch.Tensor  # [B, L] int32; 1, 2, ... per segment, 0 = padding
    keep: torch.Tensor  # [B, L] bool; exactly seq_length True per row
    doc_positions: torch.Tensor  # [B, L] int32; index in the document's token list, -1 = padding
    documents: torch.Tensor  # [B, L] int64; document ordinal in this machine's stream, -1 = padding
    state: DataState  # cursor after this batch

    def pin(self) -> Batch:
        """The same batch in pinned host memory, for asynchronous copies to a GPU."""
        return replace(self, **{f: getattr(self, f).pin_memory() for f in _TENSOR_FIELDS})


_TENSOR_FIELDS = ("input_ids", "position_ids", "segment_ids", "keep", "doc_positions", "documents")


def _default_system_span(tokenizer) -> tuple[str, int, int] | None:
    """(prefix, start, end): the characters [start, end) of `prefix` are the default system turn.

    Found by rendering probe conversations with sentinels: what precedes the first user message,
    less the BOS and less the user-turn header (read off a later user turn), is template-inserted.
    """
    u1, a1, u2, a2 = (
        "AVPROBEUSERONE",
        "AVPROBEASSISTANTONE",
        "AVPROBEUSERTWO",
        "AVPROBEASSISTANTTWO",
    )
    conv = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, [u1, a1, u2, a2], strict=True)]
    try:
        full = tokenizer.apply_chat_template(conv, tokenize=False)
        short = tokenizer.apply_chat_template(conv[:2], tokenize=False)
        prefix = full[: full.index(u1)]
        end_marker = short[short.index(a1) + len(a1) :]
        between = full[full.index(a1) + len(a1) : full.index(u2)]
    except Exception as e:  # no template, or one that rejects the probe: nothing to clean
        log.debug("no default system prompt detected: %s", e)
        return None
    header = between[len(end_marker) :] if between.startswith(end_marker) else between
    if not prefix.endswith(header):
        return None
    end = len(prefix) - len(header)
    bos = tokenizer.bos_token or ""
    start = len(bos) if bos and prefix.startswith(bos) else 0
    return (prefix[:end], start, end) if end > start else None


@dataclass(frozen=True)
class _Rendered:
    text: str | None  # None for an empty chat
    chat: bool = False  # rendered by the chat template
    own_system: bool = False  # the chat has its own system message (no default one to clean)


class _Encoder:
    """Renders and tokenizes documents and marks which tokens are stored."""

    def __init__(self, tokenizer, *, clean_added_tokens: bool, clean_default_system_prompt: bool):
        self.tok = tokenizer
        self.specials: set[int] = set()
        if clean_added_tokens:
            self.specials = set(tokenizer.all_special_ids)
            self.specials |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.system = _default_system_span(tokenizer) if clean_default_system_prompt else None
        if self.system and not tokenizer.is_fast:
            log.warning("default system prompt not cleaned: needs a fast tokenizer for offsets")
            self.system = None
        self.warned = False

    def _render(self, doc: Doc) -> _Rendered:
        if isinstance(doc, str):
            return _Rendered(doc)
        msgs = repair_messages(doc)  # idempotent on repaired chats
        if not msgs:
            return _Rendered(None)
        try:
            text = self.tok.apply_chat_template(msgs, tokenize=False)
            return _Rendered(text, chat=True, own_system=msgs[0]["role"] == "system")
        except Exception as e:
            if not self.warned:
                log.warning("chat template failed (%s); rendering chats as 'role: content'", e)
                self.warned = True
            return _Rendered("\n\n".join(f"{m['role']}: {m['content']}" for m in msgs))

    def encode(self, docs: list[Doc]) -> list[tuple[list[int], list[bool]]]:
        rendered = [self._render(d) for d in docs]
        out: list[tuple[list[int], list[bool]]] = [([], [])] * len(docs)
        plain = [i for i, r in enumerate(rendered) if r.text is not None and not r.chat]
        chats = [i for i, r in enumerate(rendered) if r.chat]
        # verbose=False: no "N > model_max_length tokens" warning. Documents are split into rows of
        # seq_length (<= the model's positions, checked before weights load), never fed whole.
        if plain:
            enc = self.tok([rendered[i].text for i in plain], verbose=False)
            for i, ids in zip(plain, enc["input_ids"], strict=True):
                out[i] = ids, [t not in self.specials for t in ids]
        if chats:
            texts = [rendered[i].text or "" for i in chats]
            offsets = self.system is not None
            enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)
            for n, i in enumerate(chats):
                ids = enc["input_ids"][n]
                keep = [t not in self.specials for t in ids]
                if self.system and not rendered[i].own_system and texts[n].startswith(self.system[0]):
                    _, s, e = self.system
                    spans = enc["offset_mapping"][n]
                    keep = [k and not s <= a < e for k, (a, _) in zip(keep, spans, strict=True)]
                out[i] = ids, keep
        return out


def encode_document(
    doc: Doc, tokenizer, *, clean_added_tokens: bool, clean_default_system_prompt: bool
) -> tuple[list[int], list[bool]]:
    """Token ids of `doc` as the model sees it, and per token whether it is stored."""
    enc = _Encoder(
        tokenizer,
        clean_added_tokens=clean_added_tokens,
        clean_default_system_prompt=clean_default_system_prompt,
    )
    return enc.encode([doc])[0]


# ---------------------------------------------------------------- packing


# doc index, ids, keep, kept indices, bad records before the document
_Encoded = tuple[int, list[int], list[bool], list[int], int]


class _Packer:
    """Cuts rows of exactly `seq_length` kept tokens out of a stream of encoded documents."""

    def __init__(self, docs: Iterable[Doc], encoder: _Encoder, first: int, offset: int, bad: BadRecords):
        self.docs_seen = first  # documents pulled from the stream, empty ones included
        self.bad = bad
        self.stream = self._encoded(iter(docs), encoder)
        self.cur = next(self.stream, None)  # None once the documents run out
        self.offset = offset if self.cur is not None and self.cur[0] == first else 0

    def _encoded(self, docs: Iterator[Doc], encoder: _Encoder) -> Iterator[_Encoded]:
        # The bad count as each document arrives, not as the chunk ends: the state must not
        # depend on how far ahead the stream was read (a resume reads it in other chunks).
        counted = ((d, self.bad.count) for d in docs)
        while chunk := list(itertools.islice(counted, ENCODE_CHUNK)):
            encoded = encoder.encode([d for d, _ in chunk])
            for (ids, keep), (_, bad) in zip(encoded, chunk, strict=True):
                self.docs_seen += 1
                kept = [i for i, k in enumerate(keep) if k]
                if kept:  # a document with no stored token is skipped but counted
                    yield self.docs_seen - 1, ids, keep, kept, bad

    def state(self) -> DataState:
        if self.cur is None:
            return DataState(self.docs_seen, 0, True, self.bad.count)
        return DataState(self.cur[0], self.offset, False, self.cur[4])

    def row(self, seq_length: int, pad_id: int) -> dict[str, list[int]]:
        r: dict[str, list[int]] = {k: [] for k in ("ids", "pos", "seg", "keep", "dpos", "doc")}
        n_kept = segment = 0
        while n_kept < seq_length and self.cur is not None:
            ordinal, ids, keep, kept, _ = self.cur
            first = bisect_left(kept, self.offset)  # kept tokens of this document already stored
            room = seq_length - n_kept
            # the piece ends just before the first kept token that does not fit
            end = kept[first + room] if first + room < len(kept) else len(ids)
            segment += 1
            r["ids"] += ids[self.offset : end]
            r["pos"] += range(end - self.offset)
            r["seg"] += [segment] * (end - self.offset)
            r["keep"] += keep[self.offset : end]
            r["dpos"] += range(self.offset, end)
            r["doc"] += [ordinal] * (end - self.offset)
            n_kept += min(room, len(kept) - first)
            if end == len(ids):
                self.cur, self.offset = next(self.stream, None), 0
            else:
                self.offset = end
        pad = seq_length - n_kept  # data ran out: stored padding completes the row
        r["ids"] += [pad_id] * pad
        r["pos"] += [0] * pad
        r["seg"] += [0] * pad
        r["keep"] += [True] * pad
        r["dpos"] += [-1] * pad
        r["doc"] += [-1] * pad
        return r


def _collate(rows: list[dict[str, list[int]]], pad_id: int, state: DataState) -> Batch:
    width = max(len(r["ids"]) for r in rows)

    def stack(key: str, fill: int, dtype: torch.dtype) -> torch.Tensor:
        # One tensor from padded lists, not one per row: the data thread holds the GIL while it
        # packs, and the forward pass waits for the GIL between its ops.
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=dtype)

    return Batch(
        input_ids=stack("ids", pad_id, torch.int64),
        position_ids=stack("pos", 0, torch.int64),
        segment_ids=stack("seg", 0, torch.int32),
        keep=stack("keep", 0, torch.bool),
        doc_positions=stack("dpos", -1, torch.int32),
        documents=stack("doc", -1, torch.int64),
        state=state,
    )


def pad_token_id(tokenizer) -> int:
    """The id that pads rows: the tokenizer's pad, else its EOS, else 0."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(t, int):
            return t
    return 0


def iter_batches(
    data_cfg: DataConfig, tokenizer, *, machine: int = 0, num_runs: int = 1, state: DataState | None = None
) -> Iterator[Batch]:
    """Packed batches of this machine's share, resumable from any batch's `state`."""
    state = state or DataState()
    spec = source_for(data_cfg)  # fail early
    encoder = _Encoder(
        tokenizer,
        clean_added_tokens=data_cfg.clean_added_tokens,
        clean_default_system_prompt=data_cfg.clean_default_system_prompt,
    )
    bad = BadRecords(data_cfg.on_bad_record)
    docs = iter_documents(
        spec,
        machine=machine,
        num_runs=num_runs,
        seed=data_cfg.seed,
        shuffle_buffer=data_cfg.shuffle_buffer,
        skip=state.docs_done,
        bad=bad,
    )
    return _batches(docs, encoder, state, data_cfg.seq_length, data_cfg.batch_size, bad)


def _batches(
    docs: Iterator[Doc],
    encoder: _Encoder,
    state: DataState,
    seq_length: int,
    batch_size: int,
    bad: BadRecords,
) -> Iterator[Batch]:
    if state.exhausted:
        return
    packer = _Packer(docs, encoder, state.docs_done, state.token_offset, bad)
    pad_id = pad_token_id(encoder.tok)
    while packer.cur is not None:
        rows: list[dict[str, list[int]]] = []
        while len(rows) < batch_size and packer.cur is not None:
            rows.append(packer.row(seq_length, pad_id))
        yield _collate(rows, pad_id, packer.state())


def document_at(
    data_cfg: DataConfig, ordinal: int, *, machine: int = 0, num_runs: int = 1, spec: DataSource | None = None
) -> Doc | None:
    """Document `ordinal` of this machine's stream (what `Batch.documents` counts), None past its end.

    Reads the source (`spec`, else the one `data_cfg` names) again from its start up to that
    document; bad records are skipped, not raised.
    """
    docs = iter_documents(
        spec or source_for(data_cfg),
        machine=machine,
        num_runs=num_runs,
        seed=data_cfg.seed,
        shuffle_buffer=data_cfg.shuffle_buffer,
        skip=ordinal,
        bad=BadRecords("skip", log_them=False),
    )
    return next(docs, None)
