"""Token slots of `activault shuffle` (tools/shuffle_passes.py): `Tokens`, a file's or a bucket's
states, ids, positions and documents gathered row by row into reused buffers; `Segments`, a
one-bucket shuffle's mapped source files read as one; `Buffers` and `read_file`, whole files read
(checksums verified) into buffers allocated once (a fresh 4 MiB tensor costs a page fault per page,
more than the gather into it), or mapped where the store can.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from activault.errors import FormatError
from activault.storage import Store
from activault.storage.base import join, populate
from activault.vault.megabatch import decode
from activault.vault.writer import RunWriter


def _rows(t: torch.Tensor) -> np.ndarray:
    """A contiguous [n, ...] tensor's memory as n opaque numpy rows: gathers and copies are then one
    memcpy per row on this thread (torch's thread pool costs ~50x on a loaded 2-core machine)."""
    raw = t.reshape(t.shape[0], -1).view(torch.uint8).numpy()
    return raw.view(np.dtype((np.void, raw.shape[1]))).reshape(t.shape[0])


def _take(src: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """out[:] = src[index]. mode="clip": "raise" copies `out` through a temporary buffer of its
    size (fresh pages every call: 2.5-3.5x the gather's time here); the bounds are checked first
    instead, so a wrong index fails rather than clipping."""
    if index.size and (int(index.min()) < 0 or int(index.max()) >= src.shape[0]):
        raise IndexError(f"shuffle: a slot index outside 0..{src.shape[0] - 1} (an internal error)")
    np.take(src, index, out=out, mode="clip")


# ---- token slots --------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """Token slots of every hook, flat: states per hook [n, d], ids and positions [n] int32,
    documents [n] int64 (None: the source has no provenance)."""

    states: dict[str, torch.Tensor]
    ids: torch.Tensor
    pos: torch.Tensor
    docs: torch.Tensor | None

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    @staticmethod
    def empty(like: Tokens, n: int) -> Tokens:
        """Buffers for `n` slots shaped like `like`'s (allocated once, then reused)."""
        return Tokens(
            {h: torch.empty((n, s.shape[1]), dtype=s.dtype) for h, s in like.states.items()},
            torch.empty(n, dtype=torch.int32),
            torch.empty(n, dtype=torch.int32),
            None if like.docs is None else torch.empty(n, dtype=torch.int64),
        )

    def view(self, a: int, b: int) -> Tokens:
        docs = None if self.docs is None else self.docs[a:b]
        return Tokens({h: s[a:b] for h, s in self.states.items()}, self.ids[a:b], self.pos[a:b], docs)

    def columns(self) -> list[torch.Tensor]:
        return [*self.states.values(), self.ids, self.pos] + ([self.docs] if self.docs is not None else [])

    def gather(self, index: np.ndarray, out: Tokens) -> Tokens:
        """self[index] into the first len(index) slots of `out` (no allocation); returns that view."""
        dest = out.view(0, index.size)
        for s, d in zip(self.columns(), dest.columns(), strict=True):
            _take(_rows(s), index, _rows(d))
        return dest

    def put(self, at: int, other: Tokens) -> None:
        """Copy `other` into slots at..at+other.n."""
        for s, d in zip(other.columns(), self.view(at, at + other.n).columns(), strict=True):
            _rows(d)[...] = _rows(s)

    def write(self, out: RunWriter, seq: int, data_state: dict[str, int]) -> Future[None]:
        """These slots as the writer's next file ([rows, seq, d] and [rows, seq])."""
        r = self.n // seq
        states = {h: s.reshape(r, seq, -1) for h, s in self.states.items()}
        docs = None if self.docs is None else self.docs.reshape(r, seq)
        real = int((self.pos >= 0).sum())
        return out.write_file(
            states,
            self.ids.reshape(r, seq),
            self.pos.reshape(r, seq),
            tokens=real,
            data_state=data_state,
            stats={},
            documents=docs,
        )


class Segments(Tokens):
    """Several Tokens read as one (a one-bucket shuffle's mapped source files): ids, positions and
    documents concatenated (16 bytes a slot at most), states left where they are; `states` holds the first
    part's (their shapes and dtypes). Only `gather` reads the parts' states."""

    def __init__(self, parts: list[Tokens]):
        cat = lambda cols: torch.cat(cols) if len(cols) > 1 else cols[0].clone()  # noqa: E731
        docs = None if parts[0].docs is None else cat([p.docs for p in parts if p.docs is not None])
        super().__init__(parts[0].states, cat([p.ids for p in parts]), cat([p.pos for p in parts]), docs)
        self.starts = np.cumsum([0] + [p.n for p in parts])  # [parts + 1] slot offsets
        self.rows = {h: [_rows(p.states[h]) for p in parts] for h in self.states}
        self.scratch: dict[str, np.ndarray] = {}  # hook -> reused rows, in the parts' order

    def view(self, a: int, b: int) -> Tokens:
        if (a, b) != (0, self.n):
            raise ValueError("a view of Segments is the whole of it")
        return self

    def gather(self, index: np.ndarray, out: Tokens) -> Tokens:
        """self[index] into the first len(index) slots of `out`: each part's rows in storage order
        into a scratch buffer (sequential reads of the mapped files), then put in place from it."""
        dest = out.view(0, index.size)
        small = [self.ids, self.pos] + ([self.docs] if self.docs is not None else [])
        for s, d in zip(small, dest.columns()[len(self.states) :], strict=True):
            _take(_rows(s), index, _rows(d))
        order = np.argsort(index, kind="stable")
        where = np.empty_like(order)
        where[order] = np.arange(order.size)  # index[i] is at scratch row where[i]
        ranked = index[order]
        cuts = np.searchsorted(ranked, self.starts)
        for h, parts in self.rows.items():
            scratch = self.scratch.get(h)
            if scratch is None or scratch.size < index.size:
                scratch = self.scratch[h] = np.empty(index.size, dtype=parts[0].dtype)
            scratch = scratch[: index.size]
            for k, rows in enumerate(parts):
                a, b = int(cuts[k]), int(cuts[k + 1])
                if a < b:
                    _take(rows, ranked[a:b] - self.starts[k], scratch[a:b])
            _take(scratch, where, _rows(dest.states[h]))
        return dest


class Buffers:
    """Byte buffers a pass reads whole files into, `sets` of one per hook in turn, allocated once
    (a fresh buffer per file costs a page fault per page): set k is read again only once the set
    read `sets` files before it is no longer used."""

    def __init__(self, sets: int):
        self.sets: list[dict[str, bytearray]] = [{} for _ in range(sets)]
        self.turn = 0

    def next(self) -> dict[str, bytearray]:
        self.turn = (self.turn + 1) % len(self.sets)
        return self.sets[self.turn]


def _get(
    store: Store, key: str, size: int | None, into: dict[str, bytearray] | None, hook: str, mapped: bool = False
) -> memoryview:
    """The object's bytes, into `into[hook]` when its listed size is known (one request; a file
    replaced since it was listed is read whole as it is now, or is ObjectChanged on S3); `mapped`:
    mapped where the store can (no buffer: a local file in the page cache is not copied)."""
    if mapped:
        with store.open(key, size) as obj:
            mapping = obj.map()
        if mapping is None:  # not mapped after all (e.g. out of descriptors): a buffer of its own
            return store.get(key)
        populate(mapping, 0, len(mapping))  # an error now, not a SIGBUS later, if it shrank
        return memoryview(mapping)
    if into is None or size is None:
        return store.get(key)
    with store.open(key, size) as obj:
        if len(into.get(hook, b"")) < obj.size:
            into[hook] = bytearray(obj.size)
        view = memoryview(into[hook])[: obj.size]
        return view[: obj.read_into(0, view)]


def read_file(
    store: Store,
    run: str,
    hooks: list[str],
    name: str,
    provenance: bool,
    verify: bool = True,
    sizes: dict[str, int] | None = None,
    into: Buffers | None = None,
    mapped: bool = False,
) -> Tokens:
    """One file of every hook (checksums verified unless `verify` is False: a piece this process
    wrote); ids, positions and documents must agree across hooks. Given the files' listed `sizes`,
    read into the next set of `into`, or `mapped` (the result's tensors are views of them)."""
    states, first = {}, None
    bufs = into.next() if into is not None else None
    for h in hooks:
        key = join(run, h, name)
        url = store.url(key)
        mb = decode(_get(store, key, (sizes or {}).get(key), bufs, h, mapped), url, verify_checksums=verify)
        if mb.positions is None:
            raise FormatError(f"{url} has no positions (a legacy file): not shuffled; nothing written")
        docs = mb.documents.reshape(-1) if mb.documents is not None else None
        if provenance and docs is None:
            raise FormatError(f"{url} has no documents, other files of the run have: it changed; not shuffled")
        mine = Tokens({}, mb.input_ids.reshape(-1), mb.positions.reshape(-1), docs if provenance else None)
        if first is None:
            first = mine
        elif not (
            torch.equal(first.ids, mine.ids)
            and torch.equal(first.pos, mine.pos)
            and (first.docs is None or mine.docs is None or torch.equal(first.docs, mine.docs))
        ):
            raise FormatError(f"{url}: its tokens differ from hook {hooks[0]!r}'s file of the same name; not shuffled")
        states[h] = mb.states.reshape(mine.n, -1)
    assert first is not None
    return Tokens(states, first.ids, first.pos, first.docs)
