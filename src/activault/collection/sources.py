"""Documents from a dataset: the registry, local files, sharding by machine, chat repair.

Sources. A data key is a key of the registry (the packaged ``datasets.json`` or another JSON file)
or a local file / directory / glob of ``.jsonl``/``.json``/``.parquet``/``.txt`` files. A registry
entry is a small JSON object::

    path      HF dataset id, or a builder ("json", "parquet", "text") with "data_files"
    name      subset (optional)             split     split name (default "train")
    kind      "text" | "chat" | "auto"      data_files  file, glob or list (optional, local builders)
    text      text column (default "text")  template  str.format template over columns (text)
    messages  column holding a list of {role, content} or {from, value} messages (chat)
    turns     [[role, template], ...]: a chat built from columns, e.g. question/answer (chat)
    roles     extra role names mapped to user/assistant/system, e.g. {"gpt": "assistant"}
    filters   {column: value}: keep only rows where each column equals its value

Local files are read as kind "auto": a row with a string "text" is plain text, otherwise its
"messages"/"conversation"/"conversations" column is a chat. ``.txt`` files hold one document per
blank-line-separated paragraph. Everything, hub or local, streams through ``datasets``; local JSON
files are parsed here, line by line, so that one bad line (not UTF-8, not JSON, not an object, or
a string with a lone surrogate escape, which no tokenizer takes) is a bad record named by file and
line, skipped and counted (or an error, `on_bad_record: error`), instead of a parser or tokenizer
error that names neither and stops the run.
"""

from __future__ import annotations

import codecs
import glob
import itertools
import json
import logging
import re
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

from activault.config import DataConfig, check_machine
from activault.errors import ConfigError, DataError, shown

log = logging.getLogger(__name__)

Doc = str | list[dict[str, str]]

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
CHAT_COLUMNS = ("messages", "conversation", "conversations")
USER, ASSISTANT = ("user", "human", "prompter"), ("assistant", "gpt", "bot", "model", "chatgpt")
ROLES = {"system": "system", **dict.fromkeys(USER, "user"), **dict.fromkeys(ASSISTANT, "assistant")}
ENTRY_KEYS = set("path name split kind data_files text template messages turns roles filters".split())
# A bad record travels through sharding and shuffling as a row of its own (so it belongs to one
# machine and keeps its place in the order): {BAD: "file:line: why"}.
BAD = "__activault_bad_record__"
LOGGED_BAD = 10  # bad records logged one by one; later ones are only counted
PROBE_ROWS = 10_000  # rows read before weights load to prove the data yields documents


@dataclass(frozen=True)
class DataSource:
    """What a registry entry or a local path resolved to."""

    path: str  # HF dataset id or builder name
    name: str | None = None
    split: str = "train"
    kind: Literal["text", "chat", "auto"] = "auto"
    data_files: tuple[str, ...] | None = None
    text: str = "text"
    template: str | None = None
    messages: str | None = None
    turns: tuple[tuple[str, str], ...] = ()
    roles: Mapping[str, str] = field(default_factory=dict)
    filters: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- sources


def _load_registry(registry: str | None) -> dict[str, dict]:
    try:
        if registry is None:
            text = resources.files("activault").joinpath("datasets.json").read_text()
        else:
            text = Path(registry).expanduser().read_text()
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read dataset registry {registry!r}: {e}; pass a JSON file of entries") from e


def _spec_from_entry(key: str, e: dict) -> DataSource:
    unknown = set(e) - ENTRY_KEYS
    if unknown or "path" not in e or e.get("kind", "auto") not in ("text", "chat", "auto"):
        raise ConfigError(
            f"registry entry {key!r} is invalid (unknown keys {sorted(unknown)}, or no 'path', or kind "
            f"not text/chat/auto); accepted keys: {sorted(ENTRY_KEYS)}"
        )
    files = e.get("data_files")
    return DataSource(
        path=e["path"],
        name=e.get("name"),
        split=e.get("split", "train"),
        kind=e.get("kind", "auto"),
        data_files=tuple([files] if isinstance(files, str) else files) if files else None,
        text=e.get("text", "text"),
        template=e.get("template"),
        messages=e.get("messages"),
        turns=tuple((r, t) for r, t in e.get("turns", ())),
        roles=dict(e.get("roles", {})),
        filters=dict(e.get("filters", {})),
    )


def local_files(data_key: str) -> list[str]:
    """The files a path, folder or glob names; none for a name no path can have (too long, a NUL)."""
    p = Path(data_key).expanduser()
    try:
        if p.is_dir():
            return sorted(str(f) for f in p.rglob("*") if f.suffix in BUILDERS and f.is_file())
        if p.is_file():
            return [str(p)]
    except (OSError, ValueError):  # ENAMETOOLONG and the like: no such file
        return []
    return sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())


def resolve_source(
    data_key: str, registry: str | None = None, text_field: str | None = None, messages_field: str | None = None
) -> DataSource:
    """Resolve a registry key or a local path/glob to a DataSource (fields name local files' columns)."""
    entries = _load_registry(registry)
    if data_key in entries:
        return _spec_from_entry(data_key, entries[data_key])
    files = local_files(data_key)
    if not files:
        raise ConfigError(
            f"data_config.data_key {shown(data_key)} is neither a key of the dataset registry "
            f"({registry or 'activault/datasets.json'}: {', '.join(sorted(entries))}) nor an existing "
            f"local file, directory or glob; use one of those keys, add an entry to a registry JSON "
            f"passed as data_config.registry, or point data_key at .jsonl/.json/.parquet/.txt files"
        )
    builders = {BUILDERS.get(Path(f).suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise ConfigError(
            f"data_key {data_key!r} matches files of unsupported or mixed types "
            f"({sorted({Path(f).suffix for f in files})}); use only one of {sorted(BUILDERS)}"
        )
    return DataSource(
        path=builders.pop() or "json",
        kind="auto",
        data_files=tuple(files),
        text=text_field or "text",
        messages=messages_field,
    )


def source_for(data_cfg: DataConfig) -> DataSource:
    """The source a config's data section names."""
    return resolve_source(data_cfg.data_key, data_cfg.registry, data_cfg.text_field, data_cfg.messages_field)


# ---------------------------------------------------------------- local JSON, record by record


def _local_json(spec: DataSource) -> list[str] | None:
    """The files of a JSON source on this machine, else None (hub data stays on datasets)."""
    if spec.path != "json" or not spec.data_files:
        return None
    files = [f for pattern in spec.data_files for f in local_files(pattern)]
    return files or None


def json_rows(files: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of JSON Lines files (or `.json` files holding one array); a bad record is a BAD row."""
    for name in files:
        with open(name, "rb") as f:
            head = f.read(64).removeprefix(codecs.BOM_UTF8).lstrip()
            f.seek(0)
            if name.endswith(".json") and head.startswith(b"["):
                yield from _json_array(name, f.read())
            else:
                yield from _json_lines(name, f)


def _json_lines(name: str, f: IO[bytes]) -> Iterator[dict[str, Any]]:
    for n, raw in enumerate(f, 1):
        if n == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield {BAD: f"{name}:{n}: not UTF-8 (byte {e.start + 1} of the line)"}
            continue
        except (ValueError, RecursionError) as e:
            why = "nested too deeply"
            if isinstance(e, json.JSONDecodeError):
                why = f"{e.msg} at column {e.colno}"
            yield {BAD: f"{name}:{n}: not JSON ({why})"}
            continue
        if not isinstance(row, dict):
            row = {BAD: f"{name}:{n}: a JSON {type(row).__name__}, not an object"}
        elif _SURROGATE_ESCAPE.search(raw) and (half := _lone_surrogate(row)):
            row = {BAD: f"{name}:{n}: {half}"}
        yield row


def _json_array(name: str, data: bytes) -> Iterator[dict[str, Any]]:
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        yield {BAD: f"{name}: not UTF-8 (byte {e.start + 1}); the whole file is skipped"}
        return
    except (ValueError, RecursionError) as e:
        where = f"{name}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else name
        yield {BAD: f"{where}: not JSON; the whole file (one array) is skipped"}
        return
    suspect = _SURROGATE_ESCAPE.search(data) is not None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            yield {BAD: f"{name}: item {i} is not an object"}
        elif suspect and (half := _lone_surrogate(row)):
            yield {BAD: f"{name}: item {i}: {half}"}
        else:
            yield row


# JSON may escape half of a UTF-16 pair alone ("\ud800"), which parses to a str that is no Unicode
# text: tokenizers refuse it, failing the whole chunk of documents. Rows whose line holds such an
# escape (pairs match too: emoji written with ensure_ascii) are checked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(row: dict[str, Any]) -> str | None:
    """Why a parsed row is no text (a lone surrogate in it), or None."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        half = e.object[e.start : e.end]
        return f"not Unicode text (a lone UTF-16 surrogate {half!r}, half of an escaped pair)"
    return None


class BadRecords:
    """Counts the bad records of one pass over the data; logs the first few, or stops at one."""

    def __init__(self, policy: Literal["skip", "error"] = "skip", log_them: bool = True):
        self.policy, self.log_them, self.count = policy, log_them, 0

    def add(self, where: str) -> None:
        if self.policy == "error":
            raise DataError(
                f"bad record at {where}; fix or remove it, or set data_config.on_bad_record: skip "
                "to skip such records (each is counted and logged)"
            )
        self.count += 1
        if self.log_them and self.count <= LOGGED_BAD:
            more = "; later ones are counted, not logged" if self.count == LOGGED_BAD else ""
            log.warning("skipped bad record %s%s", where, more)


def _load(spec: DataSource):
    import datasets

    files = _local_json(spec)
    if files is not None:
        # Sharded by file (a list in gen_kwargs), like the json builder: machines split by file.
        return datasets.IterableDataset.from_generator(json_rows, gen_kwargs={"files": files})
    kwargs: dict[str, Any] = {"split": spec.split, "streaming": True}
    if spec.data_files:
        kwargs["data_files"] = list(spec.data_files)
    if spec.path == "text":
        kwargs["sample_by"] = "paragraph"
    try:
        return datasets.load_dataset(spec.path, spec.name, **kwargs)
    except Exception as e:  # a missing dataset, subset or split, or no network
        raise ConfigError(f"cannot load dataset {spec.path!r} (subset {spec.name!r}): {e}") from e


def _matches(row: dict, filters: Mapping[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in filters.items())


def iter_documents(
    spec: DataSource,
    *,
    machine: int = 0,
    num_runs: int = 1,
    seed: int = 42,
    shuffle_buffer: int = 0,
    skip: int = 0,
    bad: BadRecords | None = None,
) -> Iterator[Doc]:
    """This machine's documents (a str, or a list of role/content messages), deterministically.

    Bad records are counted in `bad` as they are passed (its count, read when a document arrives,
    is the number of bad records before that document).
    """
    rows = _rows(spec, machine, num_runs)
    if shuffle_buffer > 0:
        rows = rows.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return itertools.islice(_documents(rows, spec, bad or BadRecords()), skip, None)


def _rows(spec: DataSource, machine: int, num_runs: int):
    """This machine's rows, filtered, in the dataset's order."""
    from datasets.distributed import split_dataset_by_node

    check_machine(machine, num_runs, "machine")
    ds = _load(spec)
    if num_runs > 1:  # before filtering and shuffling: each document goes to exactly one machine
        ds = split_dataset_by_node(ds, rank=machine, world_size=num_runs)
    if spec.filters:
        filters = dict(spec.filters)
        ds = ds.filter(lambda row: BAD in row or _matches(row, filters))
    return ds


def _documents(rows: Iterable[dict], spec: DataSource, bad: BadRecords) -> Iterator[Doc]:
    for row in rows:
        if BAD in row:
            bad.add(row[BAD])
        elif (doc := _row_to_doc(row, spec)) is not None:
            yield doc


def require_documents(spec: DataSource, source: str, *, machine: int = 0, num_runs: int = 1) -> None:
    """Fail before any work unless this machine's share yields a non-empty document.

    Reads at most PROBE_ROWS rows; the error names the field looked for and the fields found.
    """
    share = f" for machine {machine} of {num_runs}" if num_runs > 1 else ""
    hint = "fewer files or rows than num_runs: lower num_runs" if num_runs > 1 else "it is empty"
    _check_rows(_rows(spec, machine, num_runs), spec, source, share, hint)


def probe_local(spec: DataSource, source: str) -> bool:
    """`require_documents` over every machine's rows of local JSON files, read here without
    `datasets` (cheap enough for `estimate`); False for other sources, which are not probed."""
    files = _local_json(spec)
    if files is None:
        return False
    rows: Iterable[dict] = json_rows(files)
    if spec.filters:
        rows = (r for r in rows if BAD in r or _matches(r, spec.filters))
    _check_rows(rows, spec, source, "", "it is empty")
    return True


def _check_rows(rows: Iterable[dict], spec: DataSource, source: str, share: str, hint: str) -> None:
    """Return at the first row that is a non-empty document; else the DataError saying why none is."""
    found: dict[str, None] = {}  # field names in first-seen order
    n = bad = 0
    first_bad = ""
    for row in itertools.islice(rows, PROBE_ROWS):
        n += 1
        if BAD in row:
            bad += 1
            first_bad = first_bad or row[BAD]
            continue
        doc = _row_to_doc(row, spec)
        if doc and (not isinstance(doc, str) or doc.strip()):
            return
        found.update(dict.fromkeys(row))
    read = f"the first {n:,} rows" if n == PROBE_ROWS else f"all {n:,} rows"
    if n == 0:
        raise DataError(f"{source} has no rows{share}: {hint}")
    if bad == n:
        raise DataError(f"{source}: {read}{share} are bad records (the first: {first_bad}); check the files")
    fields = ", ".join(repr(f) for f in found) or "none"
    raise DataError(
        f"{source} yields no documents{share}: {read} have no non-empty {_looked_for(spec)}; "
        f"their fields are {fields}. Name the field with data_config.text_field or "
        "messages_field (a registry entry: text, messages, template or turns), or point data_key "
        "at other data" + (f"; its filters {dict(spec.filters)} may exclude every row" if spec.filters else "")
    )


def _looked_for(spec: DataSource) -> str:
    text = f"template {spec.template!r}" if spec.template else f"string field {spec.text!r}"
    if spec.turns:
        chat = f"turns {[t for _, t in spec.turns]}"
    else:
        cols = (spec.messages,) if spec.messages else CHAT_COLUMNS
        chat = "chat field " + " / ".join(repr(c) for c in cols)
    return {"text": text, "chat": chat}.get(spec.kind, f"{text} or {chat}")


def _fill(template: str, row: dict) -> str | None:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if any(not isinstance(row.get(f), str) for f in fields):
        return None
    return template.format_map(row)


def _row_to_doc(row: dict, spec: DataSource) -> Doc | None:
    roles = {**ROLES, **{k.lower(): v for k, v in spec.roles.items()}}
    kind = spec.kind
    if kind == "auto":
        kind = "text" if isinstance(row.get(spec.text), str) else "chat"
    if kind == "text":
        text = _fill(spec.template, row) if spec.template else row.get(spec.text)
        if not isinstance(text, str):
            return None
        return text.strip() if spec.path == "text" else text
    if spec.turns:
        raw: Any = [{"role": r, "content": _fill(t, row)} for r, t in spec.turns]
    else:
        cols = (spec.messages,) if spec.messages else CHAT_COLUMNS
        raw = next((row[c] for c in cols if row.get(c) is not None), None)
    return repair_messages(raw, roles) or None


# ---------------------------------------------------------------- chat repair


def _content(c: Any) -> str | None:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # a list of text parts, e.g. [{"type": "text", "text": ...}]
        parts = [p if isinstance(p, str) else p.get("text") for p in c if isinstance(p, str | dict)]
        texts = [p for p in parts if isinstance(p, str)]
        return "\n".join(texts) if texts else None
    return None


def repair_messages(raw: Any, roles: Mapping[str, str] = ROLES) -> list[dict[str, str]]:
    """Normalize a conversation to [system?] user, assistant, user, ... ; [] if nothing usable."""
    if not isinstance(raw, list):
        return []
    out: list[dict[str, str]] = []
    for m in raw:
        if not isinstance(m, dict):
            continue
        role = m.get("role") if m.get("role") is not None else m.get("from")
        role = roles.get(role.lower()) if isinstance(role, str) else None
        content = _content(m.get("content") if m.get("content") is not None else m.get("value"))
        if role is None or content is None or not content.strip():
            continue
        if role == "system" and any(o["role"] != "system" for o in out):
            continue  # a system message is only meaningful first
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    first = 1 if out and out[0]["role"] == "system" else 0
    if len(out) > first and out[first]["role"] == "assistant":
        del out[first]
    if not any(m["role"] == "user" for m in out):
        return []
    return out
