"""Which megabatch files a reader reads: every source's files, present in every hook, with their shape."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import Entry, Store, open_store
from activault.vault import megabatch as fmt


@dataclass(frozen=True)
class StatesShape:
    """What each row of a hook's files holds: `states: [rows, seq_len, d_model]` of `dtype`."""

    seq_len: int
    d_model: int
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"[rows, {self.seq_len}, {self.d_model}] {fmt.dtype_name(self.dtype)}"


@dataclass(frozen=True)
class Prefix:
    """One source: a store, and per hook the folder of that hook's files ("" when the URI is one)."""

    store: Store
    folders: tuple[str, ...]

    def key(self, h: int, name: str) -> str:
        return f"{self.folders[h]}/{name}" if self.folders[h] else name

    def url(self, h: int, name: str) -> str:
        return self.store.url(self.key(h, name))


@dataclass(frozen=True)
class FileRef:
    """A megabatch file, the same name in every hook folder of one source."""

    source: int  # index into Catalog.prefixes
    name: str
    sizes: tuple[int, ...]  # bytes, one per hook


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown dtype {name!r} in metadata.json")
    return dt


class Catalog:
    """The megabatch files of one or more sources, in blocks: `sync()` appends, never reorders.

    Args:
        uri: a hook folder, a Store, or a list of them (concatenated in order; they must agree on
            d_model, dtype and seq_len). With `hooks`, the run folder(s) instead.
    """

    def __init__(
        self,
        uri: str | Path | Store | Sequence[str | Path | Store],
        *,
        hooks: Sequence[str] | None = None,
        store_options: dict[str, Any] | None = None,
    ):
        uris = [uri] if isinstance(uri, str | Path | Store) else list(uri)
        if not uris:
            raise ConfigError("a reader needs at least one URI")
        self.hooks = [h.strip("/") for h in hooks] if hooks else None
        folders = tuple(self.hooks) if self.hooks else ("",)
        self.prefixes = [
            Prefix(u if isinstance(u, Store) else open_store(u, **(store_options or {})), folders)
            for u in uris
        ]
        self.blocks: list[list[FileRef]] = []
        self._seen: set[tuple[int, str]] = set()
        if not self.sync():
            where = ", ".join(p.store.url(p.folders[0]) for p in self.prefixes)
            raise NotFoundError(
                f"no megabatch files under {where}; the URI should name a hook folder (run/hook), or pass hooks="
            )
        self.shapes: list[StatesShape | None] = self._check_compatible()

    def sync(self) -> int:
        """List again; files not seen before are appended as a new block. Returns how many."""
        new: list[FileRef] = []
        for si, prefix in enumerate(self.prefixes):
            per_hook = []
            for folder in prefix.folders:
                entries: Sequence[Entry] = prefix.store.list_dir(folder)[1]  # type: ignore[assignment]
                per_hook.append(fmt.megabatch_files(entries))
            complete = set.intersection(*(set(p) for p in per_hook))
            partial = set.union(*(set(p) for p in per_hook)) - complete
            if partial:
                warnings.warn(
                    f"{len(partial)} file(s) under {prefix.store.uri} are not yet in every hook "
                    f"(e.g. {min(partial)}); sync() picks them up once written",
                    stacklevel=3,
                )
            for name in sorted(complete):
                if (si, name) not in self._seen:
                    self._seen.add((si, name))
                    new.append(FileRef(si, name, tuple(p[name] for p in per_hook)))
        if new:
            self.blocks.append(new)
        return len(new)

    def _shape(self, si: int, h: int) -> StatesShape | None:
        """From metadata.json, else the first file's header; None for legacy `.pt` only."""
        prefix = self.prefixes[si]
        key = prefix.key(h, "metadata.json")
        try:
            meta = json.loads(prefix.store.get_text(key))
            return StatesShape(int(meta["seq_length"]), int(meta["d_model"]), _dtype(meta["dtype"]))
        except NotFoundError:
            pass
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise FormatError(f"{prefix.store.url(key)}: unreadable ({e})") from None
        first = next(
            (f for b in self.blocks for f in b if f.source == si and f.name.endswith(fmt.SUFFIX)),
            None,
        )
        if first is None:
            return None  # legacy .pt only: the first decoded file sets the shape
        header, _ = fmt.fetch_header(prefix.store, prefix.key(h, first.name))
        try:
            seq, d = header["states"]["shape"][1:]
            return StatesShape(int(seq), int(d), fmt.DTYPES[header["states"]["dtype"]])
        except (KeyError, ValueError, TypeError):
            url = prefix.url(h, first.name)
            raise FormatError(
                f"{url}: no 'states' tensor of shape [rows, seq, d] in the header"
            ) from None

    def _check_compatible(self) -> list[StatesShape | None]:
        shapes: list[StatesShape | None] = []
        for h in range(len(self.prefixes[0].folders)):
            found = [
                (p.store.url(p.folders[h]), self._shape(si, h))
                for si, p in enumerate(self.prefixes)
            ]
            known = [(u, s) for u, s in found if s is not None]
            if len({s for _, s in known}) > 1:
                lines = "; ".join(
                    f"{u}: seq_len={s.seq_len}, d_model={s.d_model}, dtype={fmt.dtype_name(s.dtype)}"
                    for u, s in known
                )
                raise ConfigError(
                    f"cannot read these prefixes together, their activations differ: {lines}"
                )
            shapes.append(known[0][1] if known else None)
        return shapes
