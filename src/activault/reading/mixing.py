"""TokenLoader's weighted mixture of runs: the schedule of each batch's tokens per run (a pure
function), the runs' compatibility, and `Feed`, one run's shuffled windows pulled n tokens at a time.

The schedule is exact by construction: after k batches run i has given `alloc_i(k)` tokens, the
largest-remainder rounding of `k x batch_tokens x w_i`, so it never strays a whole token from its
share; a batch's quota is the difference of two such allocations (never negative while each run
gets at least one token a batch: `mix_weights` checks it).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Generator, Sequence
from fractions import Fraction
from typing import Literal, cast

import numpy as np
import torch

from activault import dtypes
from activault.errors import ConfigError, NotFoundError
from activault.reading.fetch import Workers
from activault.reading.filters import FilteredFile
from activault.reading.listing import Prefix, StatesShape
from activault.reading.options import invalid
from activault.reading.order import mix_seed, position_after
from activault.reading.stream import FileStream
from activault.reading.window import Batch, Window, permutation, ramp_windows, window_count, window_start
from activault.vault import records
from activault.vault.stats import check_normalisable, merge_all

log = logging.getLogger(__name__)

Normalize = Literal["per_run", "pooled"]
NORMALIZE = ("per_run", "pooled")


def mix_weights(weights: object, runs: int, batch_tokens: int, names: Sequence[str]) -> list[Fraction]:
    """`weights` as exact fractions summing to 1, one per run, each giving its run at least one
    token a batch (else a batch's quota could go negative)."""
    accepted = f"a list of {runs} finite numbers > 0, one per run"
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence) or len(weights) != runs:
        raise invalid("weights", weights, accepted)
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 < float(w) < math.inf:
            raise invalid("weights", weights, accepted)
    exact = [Fraction(float(w)) for w in weights]  # a float is an exact binary fraction
    total = sum(exact)
    out = [w / total for w in exact]
    for w, name, given in zip(out, names, weights, strict=True):
        if batch_tokens * w < 1:
            raise ConfigError(
                f"weight {given} gives {name} {float(batch_tokens * w):.3g} tokens a batch of "
                f"batch_tokens={batch_tokens}, less than one: raise batch_tokens to at least {math.ceil(1 / w)} "
                "or that run's weight"
            )
    return out


def allocation(weights: Sequence[Fraction], tokens: int) -> list[int]:
    """Tokens of each run among the first `tokens`: `tokens x w_i` rounded by largest remainder
    (ties to the earlier run); each within one token of its exact share."""
    # In integers over the weights' common denominator: the same rounding as with Fractions, whose
    # arithmetic normalises by a gcd at every step (a batch's quotas: 60 us with them, 18 us here).
    den = math.lcm(*(w.denominator for w in weights))
    exact = [tokens * w.numerator * (den // w.denominator) for w in weights]  # tokens x w_i x den
    out = [x // den for x in exact]
    left = tokens - sum(out)
    for i in sorted(range(len(out)), key=lambda i: (-(exact[i] % den), i))[:left]:
        out[i] += 1
    return out


def quotas(weights: Sequence[Fraction], batch_tokens: int, k: int) -> list[int]:
    """Tokens of each run in batch `k` (0-based): a pure function of the weights, so a resumed
    loader cuts the same batches."""
    before, after = allocation(weights, k * batch_tokens), allocation(weights, (k + 1) * batch_tokens)
    return [b - a for a, b in zip(before, after, strict=True)]


def check_mixable(
    names: Sequence[str], hooks: Sequence[Sequence[str]], shapes: Sequence[Sequence[StatesShape | None]]
) -> None:
    """Runs mix when every hook has one name, width and dtype in all of them (their sequence
    lengths may differ: tokens are mixed, not rows); else an error naming the two runs."""
    for h in range(len(shapes[0])):
        for i in range(1, len(names)):
            a, b = shapes[0][h], shapes[i][h]
            if a is None or b is None:
                which = names[0] if a is None else names[i]
                raise ConfigError(
                    f"cannot mix {which}: it has no metadata.json (legacy files), so its width is unknown "
                    "before reading; mix runs written by collect, or read it alone"
                )
            if hooks[0][h] != hooks[i][h] and hooks[0][h] and hooks[i][h]:
                raise ConfigError(
                    f"cannot mix {names[0]} (hook {hooks[0][h]}) with {names[i]} (hook {hooks[i][h]}): "
                    "mix runs of one hook name"
                )
            if (a.d_model, a.dtype) != (b.d_model, b.dtype):
                raise ConfigError(
                    f"cannot mix {names[0]} (d_model={a.d_model}, dtype={dtypes.name(a.dtype)}) with {names[i]} "
                    f"(d_model={b.d_model}, dtype={dtypes.name(b.dtype)}): runs mix only at one width and dtype; "
                    "read them as separate loaders"
                )


class Feed:
    """One run of a mixture: its windows, shuffled as a lone TokenLoader's, epoch after epoch
    without end (an exhausted run restarts its own next epoch, in a new order), `take(n)` at a time.

    `position` is (epoch, window, offset) of its next token, what a mixture's state_dict saves.
    """

    def __init__(
        self,
        files: FileStream,
        name: str,
        size: int,
        ramp: bool,
        position: tuple[int, int, int],
        count: Callable[[dict[str, int]], None],
    ):
        self.files, self.name, self.size, self.ramp = files, name, size, ramp
        self.position, self._count = position, count
        self._windows: Generator[tuple[int, int, Window, np.ndarray, int], None, None] | None = None
        self._win: Window | None = None
        self._perm = np.empty(0, np.int64)
        self._at = self._w = self._epoch = 0

    def done(self, epoch: int) -> bool:
        """Whether every token of `epoch` has been taken."""
        e, w, _ = self.position
        return e > epoch or (e == epoch and w >= window_count(len(self.files.order(e)), self.size, self.ramp))

    def take(self, batch: Batch, n: int, gatherers: Workers | None) -> None:
        """Gather this run's next `n` tokens into `batch` (at `batch.filled`)."""
        while n:
            if self._win is None or self._at == self._win.n:
                self._win = None  # let go of the used window before the next is assembled
                if self._windows is None:
                    self._windows = self._iterate()
                self._epoch, self._w, self._win, self._perm, self._at = next(self._windows)
            take = min(n, self._win.n - self._at)
            self._win.gather(self._perm[self._at : self._at + take], batch, gatherers)
            self._at += take
            n -= take
            self.position = (self._epoch, *position_after(self._w, self._at, self._win.n))

    def close(self) -> None:
        self._win = None
        if self._windows is not None:
            self._windows.close()

    def _iterate(self) -> Generator[tuple[int, int, Window, np.ndarray, int], None, None]:
        epoch, start, skip = self.position
        while True:
            taken = 0
            fresh = start == 0 and skip == 0
            with self.files.prefetch(epoch, window_start(start, self.size, self.ramp), eager=True) as files:
                for w, items in ramp_windows(files, self.size, self.ramp):
                    win = Window(cast(list[FilteredFile], items))  # FilteredFile: TokenLoader's transform
                    del items
                    self._count(win.dropped)
                    if skip and skip >= win.n:
                        raise ConfigError(
                            f"TokenLoader state: {self.name}'s offset is {skip}, not a whole number "
                            f"0..{max(win.n - 1, 0)} (window {w} of epoch {epoch} holds {win.n} tokens): the state "
                            "was saved by a loader of other files, or with other filters"
                        )
                    taken += win.n - skip
                    perm = permutation(win.n, mix_seed(self.files.seed, epoch, "window", w))
                    yield epoch, w, win, perm, skip
                    skip = 0
                    del perm
                    del win
            if taken == 0 and fresh:
                raise ConfigError(
                    f"an epoch of {self.name} holds no tokens (rank {self.files.rank} of {self.files.world_size}): "
                    "a mixture would wait forever for its share; use a smaller world_size or a run with more files"
                )
            epoch, start, skip = epoch + 1, 0, 0


def norm_params(
    prefixes: Sequence[Prefix], h: int, center: bool, target: float | None, drop_nonfinite: bool
) -> tuple[torch.Tensor | None, float]:
    """(mean to subtract, scale) of hook `h` from the statistics of `prefixes` merged: one run's
    (per_run) or every run's (pooled, or a list of one dataset's prefixes)."""
    if not center and target is None:
        return None, 1.0
    parts = []
    for prefix in prefixes:
        found = records.read_statistics(prefix.store, prefix.folders[h])  # typed, errors named
        if found is None:
            url = prefix.store.url(records.statistics_key(prefix.folders[h]))
            raise NotFoundError(f"{url} does not exist; normalisation needs the run's statistics ({records.REMERGE})")
        parts.append(check_normalisable(found.running(), prefix.store.url(prefix.folders[h])))
    stats = merge_all(parts)
    assert stats is not None
    if stats.nonfinite_tokens and not drop_nonfinite:
        log.warning(
            "%s: %d token(s) with NaN or Inf are left out of the statistics but still delivered "
            "(as NaN or Inf); drop_nonfinite=True drops them",
            ", ".join(p.store.url(p.folders[h]) for p in prefixes),
            stats.nonfinite_tokens,
        )
    mean = stats.mean.to(torch.float32) if center else None
    if target is None:
        return mean, 1.0
    ref = math.sqrt(float(stats.var.sum())) if center else stats.mean_norm
    return mean, target / ref
