"""Several runs' activations for the same tokens (runs collected with `data_config.align_to`):
a crosscoder's or a model diff's batches, `{run: {hook: states}}`.

One RCache per run reads the same file names in the same order; each file's token ids and
positions are checked to agree across runs before it is yielded (a FormatError naming the file
otherwise), and a shuffle uses the same permutation in every run (it is seeded by the seed, the
epoch and the file's name, which the runs share).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from activault.errors import ConfigError, FormatError
from activault.reading.rcache import RCache
from activault.reading.stream import Source

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from activault.reading.options import ReadArgs

NOT_ALIGNED = (
    "the runs do not hold the same tokens in this file: read together only runs collected with "
    "data_config.align_to naming one of them (such a run holds the reference's tokens file for file)"
)


class AlignedLoader:
    """Megabatches `{run: {hook: states [rows, seq, d]}}` of several aligned runs, the same tokens in each.

    Args:
        runs: run folders (local paths or `s3://bucket/run`), each yielded under the name given here.
        hooks: the hooks read from every run (each run must have them all).
        return_ids: also yield `"input_ids"` (int64), `"positions"` and `"documents"` (as RCache's),
            the shared tokens: `{"states": {run: {hook: states}}, "input_ids", ...}`.
        shuffle: permute tokens within each megabatch, by the same permutation in every run.
        batch_tokens: yield token batches `[batch_tokens, d]` instead (padding dropped, the last one
            shorter), cut from the megabatches in order.
        **read: ReadOptions fields, as RCache takes them (`seed`, `rank`, `world_size`, ...);
            `skip_bad_files` is refused: a file skipped in one run only would misalign the rest.
    """

    def __init__(
        self,
        runs: Sequence[Source],
        hooks: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        return_ids: bool = False,
        shuffle: bool = False,
        batch_tokens: int | None = None,
        **read: Unpack[ReadArgs],
    ):
        names = [str(r) for r in runs]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"runs={names!r}: name two or more different runs to read aligned")
        if read.get("skip_bad_files"):
            raise ConfigError(
                "skip_bad_files=True is not accepted by AlignedLoader: a file skipped in one run only "
                "would pair every later file with another's tokens; repair the bad file instead"
            )
        if batch_tokens is not None and (isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int)):
            raise ConfigError(f"batch_tokens={batch_tokens!r} is not accepted: use a whole number >= 1, or None")
        if batch_tokens is not None and batch_tokens < 1:
            raise ConfigError(f"batch_tokens={batch_tokens!r} is not accepted: use a whole number >= 1, or None")
        self.runs = names
        self.hooks = list(hooks)
        self.return_ids, self.batch_tokens = return_ids, batch_tokens
        self.readers = [
            RCache(r, hooks=self.hooks, device=device, return_ids=True, shuffle=shuffle, **read) for r in runs
        ]

    def __len__(self) -> int:
        """Files per epoch (every run's)."""
        return len(self.readers[0])

    def _order(self) -> list[str]:
        """This epoch's file names, the same in every run; else a FormatError naming the first difference."""
        orders = [[f.name for f in r.files.order(r.epoch)] for r in self.readers]
        for run, order in zip(self.runs[1:], orders[1:], strict=True):
            if order != orders[0]:
                first = next((a for a, b in zip(orders[0], order, strict=False) if a != b), None)
                missing = first or (orders[0][len(order)] if len(orders[0]) > len(order) else order[len(orders[0])])
                raise FormatError(
                    f"runs {self.runs[0]} and {run} do not hold the same files ({len(orders[0])} and "
                    f"{len(order)}; the first that differs is {missing}): aligned runs hold the same "
                    "file names; collect the missing machine's files, or read only the files both hold"
                )
        return orders[0]

    def _url(self, run: int, name: str) -> str:
        files = self.readers[run].files
        return files.catalog.prefixes[0].url(0, name)

    def _check(self, items: list[dict[str, Any]], name: str) -> None:
        """Every run's ids and positions equal the first run's: else a FormatError naming the file."""
        first = items[0]
        for i, item in enumerate(items[1:], 1):
            for key in ("input_ids", "positions"):
                a, b = first[key], item[key]
                if a.shape != b.shape or not torch.equal(a, b):
                    where = (a != b).nonzero()[0].tolist() if a.shape == b.shape else None
                    detail = (
                        f"row {where[0]}, column {where[1]}: {int(a[tuple(where)])} in {self._url(0, name)}, "
                        f"{int(b[tuple(where)])} here"
                        if where
                        else f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
                    )
                    raise FormatError(
                        f"{self._url(i, name)}: its {key} differ from the first run's ({detail}); {NOT_ALIGNED}"
                    )

    def _files(self) -> Generator[dict[str, Any], None, None]:
        order = self._order()
        iters = [iter(r) for r in self.readers]
        try:
            for items in zip(*iters, strict=True):
                name = order[self.readers[0].current_file_index - 1]
                self._check(list(items), name)
                yield {
                    "states": {run: item["states"] for run, item in zip(self.runs, items, strict=True)},
                    **{k: items[0][k] for k in ("input_ids", "positions", "documents")},
                }
        finally:
            for it in iters:
                it.close()  # type: ignore[attr-defined]  # RCache iterates with generators

    def _tokens(self) -> Iterator[dict[str, Any]]:
        """Token batches of `batch_tokens`, padding dropped, a remainder carried to the next file."""
        n = self.batch_tokens
        assert n is not None
        held: list[dict[str, Any]] = []  # flat pieces not yet yielded, each {"states": ..., ids...}
        count = 0
        for mb in self._files():
            real = (mb["positions"] >= 0).reshape(-1)
            piece = {
                "states": {
                    run: {h: s.reshape(-1, s.shape[-1])[real].clone() for h, s in hooks.items()}
                    for run, hooks in mb["states"].items()
                },
                **{
                    k: None if mb[k] is None else mb[k].reshape(-1)[real].clone()
                    for k in ("input_ids", "positions", "documents")
                },
            }
            held.append(piece)
            count += int(real.sum())
            while count >= n:
                batch, held = _cut(held, n)
                count -= n
                yield batch
        if count:
            yield _cut(held, count)[0]

    def __iter__(self) -> Iterator[Any]:
        items = self._tokens() if self.batch_tokens is not None else self._files()
        for item in items:
            yield item if self.return_ids else item["states"]

    def finalize(self) -> None:
        """Stop every run's background reading (also done on leaving `with`)."""
        for r in self.readers:
            r.finalize()

    def __enter__(self) -> AlignedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()


def _cut(held: list[dict[str, Any]], n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first `n` tokens of the pieces `held`, and what remains of them."""
    taken, rest, need = [], [], n
    for piece in held:
        size = len(piece["input_ids"])
        if need >= size:
            taken.append(piece)
            need -= size
        elif need > 0:
            taken.append(_slice(piece, 0, need))
            rest.append(_slice(piece, need, size))
            need = 0
        else:
            rest.append(piece)
    out = {
        "states": {
            run: {h: torch.cat([p["states"][run][h] for p in taken]) for h in hooks}
            for run, hooks in taken[0]["states"].items()
        },
        **{
            k: None if taken[0][k] is None else torch.cat([p[k] for p in taken])
            for k in ("input_ids", "positions", "documents")
        },
    }
    return out, rest


def _slice(piece: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    return {
        "states": {run: {h: s[a:b] for h, s in hooks.items()} for run, hooks in piece["states"].items()},
        **{k: None if piece[k] is None else piece[k][a:b] for k in ("input_ids", "positions", "documents")},
    }
