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
from collections.abc import Callable, Generator, Iterable, Sequence
from fractions import Fraction
from typing import Literal, cast

import torch

from activault import dtypes
from activault.errors import ConfigError, NotFoundError
from activault.reading.filters import FilteredFile
from activault.reading.listing import Prefix, StatesShape
from activault.reading.options import invalid
from activault.reading.order import position_after
from activault.reading.stream import FileStream
from activault.reading.window import Batch, Drawn, Take, drawn_windows, window_count, window_start
from activault.reading.workers import Workers
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


def feed_strata(weight: Fraction, batch_tokens: int) -> int:
    """The strata of a run's windows (window.py `stratified`): at least the most tokens a run of
    `weight` gives one batch, so a batch's share of the run takes at most one token of each."""
    # A batch's quota is a difference of two allocations, each within one token of its exact share.
    return min(batch_tokens, math.ceil(batch_tokens * weight) + 1)


def _no_ids(items: list[FilteredFile]) -> list[int]:
    return []  # a mixture's batches carry no file coordinates (return_index is refused)


class Feed:
    """One run of a mixture: its windows, shuffled as a lone TokenLoader's (`window` files each,
    stratified, the first drawn as its files arrive with `ramp`: window.py `drawn_windows`), epoch
    after epoch without end (an exhausted run restarts its own next epoch, in a new order), `take(n)`
    at a time. `strata`: `feed_strata` of the run's weight.

    `position` is (epoch, window, offset) of its next token, what a mixture's state_dict saves.
    """

    def __init__(
        self,
        files: FileStream,
        name: str,
        size: int,
        ramp: bool,
        strata: int,
        position: tuple[int, int, int],
        count: Callable[[dict[str, int]], None],
    ):
        self.files, self.name, self.size, self.ramp, self.strata = files, name, size, ramp, strata
        self.position, self._count = position, count
        self._stages: Generator[tuple[int, Drawn], None, None] | None = None
        self._d: Drawn | None = None
        self._at = self._epoch = 0

    def done(self, epoch: int) -> bool:
        """Whether every token of `epoch` has been taken."""
        e, w, _ = self.position
        return e > epoch or (e == epoch and w >= window_count(len(self.files.order(e)), self.size))

    def take(self, batch: Batch, n: int, gatherers: Workers | None, defer: list[Take] | None = None) -> None:
        """Gather this run's next `n` tokens into `batch` (at `batch.filled`); `defer`: the states'
        copies left to the caller (`Window.gather`)."""
        while n:
            if self._d is None or self._at == self._d.order.size:
                self._d = None  # let go of the used window before the next is assembled
                if self._stages is None:
                    self._stages = self._iterate()
                self._epoch, self._d = next(self._stages)
                self._at = self._d.start
                continue  # a stage may be empty, or passed over whole by a resumed offset
            d = self._d
            take = min(n, d.order.size - self._at)
            d.win.gather(d.order[self._at : self._at + take], batch, gatherers, defer)
            self._at += take
            n -= take
            at = d.done + self._at  # an incomplete window has tokens left past `at`
            self.position = (self._epoch, *position_after(d.w, at, d.win.n if d.complete else at + 1))

    def close(self) -> None:
        self._d = None
        if self._stages is not None:
            self._stages.close()

    def _iterate(self) -> Generator[tuple[int, Drawn], None, None]:
        epoch, start, skip = self.position
        seed = self.files.seed
        while True:
            taken = 0
            fresh = start == 0 and skip == 0
            with self.files.prefetch(epoch, window_start(start, self.size), eager=True) as files:
                kept = cast(Iterable[tuple[int, FilteredFile]], files)  # FilteredFile: TokenLoader's transform
                stages = drawn_windows(kept, self.size, self.ramp, self.strata, seed, epoch, skip, _no_ids, self._count)
                for d in stages:
                    taken += d.order.size - d.start
                    yield epoch, d
                    del d  # free this window before the next one is assembled
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
