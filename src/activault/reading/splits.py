"""Held-out splits by document: which stored documents are in `test`, the same for every reader.

A document is (machine of the file name, its ordinal in that machine's stream: the `documents`
tensor, format version 4). It is in `test` iff a seeded 64-bit hash of the pair falls below
`test_fraction` of the hash range: a pure function of the pair, so every reader, rank, resume and
process (no Python `hash()`, which is salted per process) puts a document on the same side, and no
document is on both. Hashing the pair, not the token, keeps a document's tokens together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from activault.errors import ConfigError
from activault.vault import records

SPLITS = ("train", "test")
_MASK = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (a bijection: distinct inputs, distinct outputs)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_hashes(machine: int, documents: np.ndarray, seed: int) -> np.ndarray:
    """[n] uint64: the seeded hash of (machine, ordinal) for each of `documents: [n]` int64."""
    with np.errstate(over="ignore"):  # wrapping multiplication is the point
        key = _mix(np.array([(seed & _MASK) ^ 0x9E3779B97F4A7C15], np.uint64))
        key = _mix(key ^ np.uint64(machine & _MASK))
        return _mix(documents.astype(np.uint64) ^ key)


@dataclass(frozen=True)
class Split:
    """One side of a split: `name` ("train" or "test"), `fraction` of documents in test, `seed`."""

    name: str
    fraction: float
    seed: int

    @property
    def threshold(self) -> np.uint64:
        """Hashes below this are in test: fraction x 2^64 (fraction < 1, so it fits)."""
        return np.uint64(min(int(self.fraction * 2.0**64), _MASK))

    def describe(self) -> dict[str, object]:
        """What a state_dict records."""
        return {"split": self.name, "test_fraction": self.fraction, "split_seed": self.seed}

    def keep(self, name: str, documents: np.ndarray | None, url: str) -> np.ndarray:
        """[n] bool: which tokens of file `name` (`documents: [n]`, flattened) are in this split.

        Computed per run of equal ordinals (a file holds few documents, each contiguous), so the
        cost is one comparison pass over the tokens. Padding (-1) comes out either way: the
        readers drop it anyway.
        """
        parsed = records.parse_file_name(name)
        if documents is None or parsed is None:
            raise ConfigError(
                f"{url} was written before provenance (format version 3 or older, or not by a collection): it "
                f"holds no document ordinals, so split={self.name!r} cannot tell its documents apart; read "
                "this run without split, or collect it again with this activault to split it by document"
            )
        n = documents.size
        if n == 0:
            return np.zeros(0, bool)
        change = np.empty(n, bool)
        change[0] = True
        np.not_equal(documents[1:], documents[:-1], out=change[1:])
        starts = np.flatnonzero(change)
        test = document_hashes(parsed[0], documents[starts], self.seed) < self.threshold
        side = test if self.name == "test" else ~test
        return np.repeat(side, np.diff(np.append(starts, n)))
