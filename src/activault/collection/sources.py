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
blank-line-separated paragraph. Everything, hub or local, streams through ``datasets``.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from activault.config import DataConfig, check_machine
from activault.errors import ConfigError

log = logging.getLogger(__name__)

Doc = str | list[dict[str, str]]

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
CHAT_COLUMNS = ("messages", "conversation", "conversations")
USER, ASSISTANT = ("user", "human", "prompter"), ("assistant", "gpt", "bot", "model", "chatgpt")
ROLES = {"system": "system", **dict.fromkeys(USER, "user"), **dict.fromkeys(ASSISTANT, "assistant")}
ENTRY_KEYS = set(
    "path name split kind data_files text template messages turns roles filters".split()
)


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
        raise ConfigError(
            f"cannot read dataset registry {registry!r}: {e}; pass a JSON file of entries"
        ) from e


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


def _local_files(data_key: str) -> list[str]:
    p = Path(data_key).expanduser()
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.suffix in BUILDERS and f.is_file())
    if p.is_file():
        return [str(p)]
    return sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())


def resolve_source(
    data_key: str, registry: str | None = None, text_field: str | None = None, messages_field: str | None = None
) -> DataSource:
    """Resolve a registry key or a local path/glob to a DataSource (fields name local files' columns)."""
    entries = _load_registry(registry)
    if data_key in entries:
        return _spec_from_entry(data_key, entries[data_key])
    files = _local_files(data_key)
    if not files:
        raise ConfigError(
            f"data_key {data_key!r} is neither a key of the dataset registry "
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
        path=builders.pop() or "json", kind="auto", data_files=tuple(files), text=text_field or "text",
        messages=messages_field,
    )


def source_for(data_cfg: DataConfig) -> DataSource:
    """The source a config's data section names."""
    return resolve_source(data_cfg.data_key, data_cfg.registry, data_cfg.text_field, data_cfg.messages_field)


def _load(spec: DataSource):
    import datasets

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
) -> Iterator[Doc]:
    """Yield this machine's documents (a str, or a list of role/content messages), deterministically."""
    from datasets.distributed import split_dataset_by_node

    check_machine(machine, num_runs, "machine")
    ds = _load(spec)
    if num_runs > 1:  # before filtering and shuffling: each document goes to exactly one machine
        ds = split_dataset_by_node(ds, rank=machine, world_size=num_runs)
    if spec.filters:
        filters = dict(spec.filters)
        ds = ds.filter(lambda row: _matches(row, filters))
    if shuffle_buffer > 0:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    docs = (d for d in (_row_to_doc(row, spec) for row in ds) if d is not None)
    return itertools.islice(docs, skip, None)


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
