"""Exact, mergeable running statistics of activations (float64, Chan et al.'s parallel update).

Per dimension: count, mean and M2 (sum of squared deviations); per token: the sum of L2 norms and
of squared norms. A token with a NaN or Inf in any dimension is left out of all of them and counted
in `nonfinite` instead (its L2 norm is not finite: found at no extra pass), so one bad token never
makes the statistics NaN. Merging two partial results is exact up to float64 rounding, so
statistics of many batches and many machines equal a single float64 pass over every finite stored
token. The batch term M2_b is kept (the original's running std dropped it and under-estimated the
spread).

Norm histogram (stats_version 3): per token L2 norm counted in fixed log-spaced bins, 32 per
octave from 2**-16 to 2**24 (each bin 2.2% wide: a quantile read from it is within one bin, i.e.
within 2.2%, of the exact one), with an underflow bin (norms below 2**-16, zero included) and an
overflow bin (2**24 and above). The counts are integers in bins fixed by the version, so merging
machines adds counts and equals one machine's histogram exactly. It gives the median norm the
norm-outlier filter scales by (`quantile`, `median_norm`).

These statistics describe the stored finite tokens, all of them: read-time token filters (a choice
of each reader) never change them, so normalising with `center` or `norm_target` uses the same
mean and scale whatever a reader drops, and two readers with other filters see the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from activault.errors import DataError

# 2: count, mean, m2 and the norm sums cover finite tokens only. Version 1 records counted tokens
# with NaN or Inf in, so when `nonfinite` > 0 their statistics are NaN (`finite` is False).
# 3: adds `norm_hist`, the histogram of finite tokens' L2 norms (records of version 2 lack it).
STATS_VERSION = 3
HISTOGRAM_VERSION = 3
MERGE_STATS = "`activault merge-stats RUN`"

# The norm histogram's fixed bins (changing them needs a new stats_version: counts of other bins
# cannot be added). Bin i in 1..NORM_BINS holds norms in [2**(LO + (i-1)/PER_OCTAVE), 2**(LO + i/PER_OCTAVE));
# bin 0 the norms below 2**LO (zero too), bin NORM_BINS + 1 those of 2**HI and above.
NORM_LOG2_MIN, NORM_LOG2_MAX, NORM_BINS_PER_OCTAVE = -16, 24, 32
NORM_BINS = (NORM_LOG2_MAX - NORM_LOG2_MIN) * NORM_BINS_PER_OCTAVE
NORM_HIST_LENGTH = NORM_BINS + 2  # with the underflow and overflow bins
NO_HISTOGRAM = (
    f"a norm quantile needs stats_version {HISTOGRAM_VERSION} statistics, which hold a histogram of the "
    "tokens' norms; an older activault wrote these (stats_version 2), and "
    f"{MERGE_STATS} cannot add it (it merges the machines' progress records, which lack it too). Collect "
    "the run again under a new run name with this activault to get it, or filter by an absolute norm "
    "instead: TokenFilter(max_norm=...) (`activault stats` shows the mean norm)"
)


def norm_bins(norms: torch.Tensor) -> torch.Tensor:
    """The histogram bin (0..NORM_BINS + 1) of each L2 norm in `norms: [n]` (float64), int64."""
    v = (torch.log2(norms) - NORM_LOG2_MIN) * NORM_BINS_PER_OCTAVE + 1  # log2(0) = -inf: underflow
    return v.clamp_(0, NORM_BINS + 1).floor_().to(torch.int64)


def bin_value(b: int) -> float:
    """The norm bin `b` stands for: its geometric centre; the range's edge for the under- and
    overflow bins (an upper and a lower bound)."""
    if b <= 0:
        return 2.0**NORM_LOG2_MIN
    if b > NORM_BINS:
        return 2.0**NORM_LOG2_MAX
    return 2.0 ** (NORM_LOG2_MIN + (b - 0.5) / NORM_BINS_PER_OCTAVE)


class RunningStats:
    """Running mean, variance and mean L2 norm over the finite tokens of dimension d."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.d = d
        # Device tensors: reading one waits for the GPU, so callers read them once per file.
        self.n = torch.zeros((), dtype=torch.int64, device=device)  # finite tokens
        self.mean = torch.zeros(d, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(d, dtype=torch.float64, device=device)
        self.norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.norm_sq_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # tokens left out
        # [NORM_HIST_LENGTH] finite tokens per norm bin; None when merged from (or resumed after)
        # a record without one (stats_version <= 2): a histogram of some tokens only would mislead.
        self.norm_hist: torch.Tensor | None = torch.zeros(NORM_HIST_LENGTH, dtype=torch.int64, device=device)

    @property
    def count(self) -> int:
        """Tokens in the statistics (those with a NaN or Inf are not)."""
        return int(self.n)

    @property
    def nonfinite_tokens(self) -> int:
        """Tokens with a NaN or Inf in any dimension, left out of the statistics."""
        return int(self.nonfinite)

    @property
    def finite(self) -> bool:
        """Every statistic is finite: False only after merging a version 1 record that counted
        tokens with NaN or Inf in (`check_normalisable` says how to recount it)."""
        return all(bool(torch.isfinite(t).all()) for t in (self.mean, self.m2, self.norm_sum, self.norm_sq_sum))

    def update(self, x: torch.Tensor) -> None:
        """Add tokens `x: [n, d]` (any dtype; accumulated in float64 on x's device); tokens with a
        NaN or Inf are counted in `nonfinite` and left out of the rest."""
        if x.shape[0] == 0:
            return
        if x.device.type == "cpu":
            self._update_cpu(x)
        else:
            self._update_device(x)

    def _update_device(self, x: torch.Tensor) -> None:
        """`update` in torch on x's device (a GPU's), with no host sync."""
        x64 = x.to(torch.float64, copy=True)  # a copy even of float64: zeroed and centred in place below
        norms = torch.linalg.vector_norm(x64, dim=1)  # [n]: not finite exactly for the bad tokens
        bad = ~torch.isfinite(norms)
        # On a GPU a check for bad tokens would wait for the device: the bad rows are always zeroed.
        rows = bad.unsqueeze(1)  # [n, 1]
        x64.masked_fill_(rows, 0.0)
        norms.masked_fill_(bad, 0.0)
        left_out = bad.sum()
        self.nonfinite += left_out.to(self.nonfinite.device)
        n_b = x.shape[0] - left_out
        # Two passes (mean, then squared deviations, in place: no second [n, d] buffer): as exact
        # as var_mean (within 1e-14 of it) and 2.5x faster.
        mean_b = x64.sum(dim=0) / n_b.clamp(min=1)
        x64.sub_(mean_b).masked_fill_(rows, 0.0)
        m2_b = x64.square_().sum(dim=0)
        self._count_norms(norms, bad)
        self._merge(n_b, mean_b, m2_b, norms.sum(), norms.square().sum())

    def _update_cpu(self, x: torch.Tensor) -> None:
        """`update` of CPU tokens in numpy: the same float64 passes, on the calling thread alone.
        In torch each pass opened an OpenMP region that waited for the model's other thread: in a
        collection on the loaded 2-core VM, 7-9 ms of CPU per [2048, 512] batch against 3.7-3.9
        (docs/benchmarks.md).
        The sums are float64 as on a device (within 1e-14 of torch's; the means to the bit)."""
        x64 = _float64(x)  # [n, d], a copy: zeroed and centred in place below
        norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))  # [n]: not finite exactly for the bad tokens
        bad = ~np.isfinite(norms)
        left_out = int(bad.sum())
        if left_out:
            x64[bad] = 0.0
            norms[bad] = 0.0
            self.nonfinite += left_out
        n_b = x64.shape[0] - left_out
        mean_b = x64.sum(axis=0) / max(n_b, 1)
        x64 -= mean_b
        if left_out:
            x64[bad] = 0.0
        m2_b = np.multiply(x64, x64, out=x64).sum(axis=0)
        norms_t = torch.from_numpy(norms)
        self._count_norms(norms_t, torch.from_numpy(bad))
        self._merge(
            torch.tensor(n_b),
            torch.from_numpy(mean_b),
            torch.from_numpy(m2_b),
            norms_t.sum(),
            norms_t.square().sum(),
        )

    def _count_norms(self, norms: torch.Tensor, bad: torch.Tensor) -> None:
        """Add the finite tokens' `norms: [n]` (zero where `bad`) to the histogram."""
        if self.norm_hist is None:
            return
        bins = norm_bins(norms).masked_fill_(bad, NORM_HIST_LENGTH)  # the bad tokens into one extra bin, cut off
        counts = torch.bincount(bins, minlength=NORM_HIST_LENGTH + 1)[:NORM_HIST_LENGTH]
        self.norm_hist += counts.to(self.norm_hist.device)

    def _merge(
        self,
        n_b: torch.Tensor,
        mean_b: torch.Tensor,
        m2_b: torch.Tensor,
        ns: torch.Tensor,
        nss: torch.Tensor,
    ) -> None:
        # Tensor arithmetic throughout: the count of finite tokens stays on the device (no sync).
        dev = self.mean.device
        n_a, n_b = self.n, n_b.to(dev)
        n = (n_a + n_b).clamp(min=1).double()  # 1 when both are empty: the weights are then 0
        delta = mean_b.to(dev) - self.mean
        self.mean += delta * (n_b.double() / n)
        self.m2 += m2_b.to(dev) + delta**2 * ((n_a * n_b).double() / n)
        self.norm_sum += ns.to(dev)
        self.norm_sq_sum += nss.to(dev)
        self.n = n_a + n_b

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold another partial result into this one (in place) and return self."""
        if other.d != self.d:
            raise ValueError(f"cannot merge statistics of dimension {other.d} into {self.d}")
        self._merge(other.n, other.mean, other.m2, other.norm_sum, other.norm_sq_sum)
        self.nonfinite += other.nonfinite.to(self.nonfinite.device)
        if self.norm_hist is None or other.norm_hist is None:
            self.norm_hist = None  # exact over every token, or absent
        else:
            self.norm_hist += other.norm_hist.to(self.norm_hist.device)
        return self

    @property
    def var(self) -> torch.Tensor:
        """Population variance (ddof=0) per dimension."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def mean_norm(self) -> float:
        return float(self.norm_sum) / max(self.count, 1)

    def quantile(self, q: float) -> float:
        """The `q`-quantile (0..1) of the finite tokens' L2 norms, from the histogram: the norm of
        rank ceil(q * count) (the lower median for q = 0.5, as torch.median), within one bin
        (2.2%) of the exact one. A DataError when the statistics have no histogram or no token."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile q={q!r} is not in [0, 1]")
        if self.norm_hist is None:
            raise DataError(f"these statistics have no norm histogram; {NO_HISTOGRAM}")
        cum = torch.cumsum(self.norm_hist.cpu(), 0)
        total = int(cum[-1])
        if total == 0:
            raise DataError("these statistics count no finite token: their norms have no quantile")
        rank = max(1, math.ceil(q * total))
        return bin_value(int(torch.searchsorted(cum, torch.tensor(rank))))

    def median_norm(self) -> float:
        """The median L2 norm of the finite tokens (lower median), within one bin (2.2%)."""
        return self.quantile(0.5)

    @property
    def version(self) -> int:
        """The stats_version these statistics are written with: what they hold."""
        if not self.finite:
            return 1  # merged from a version 1 record: NaN, and they keep saying so
        return STATS_VERSION if self.norm_hist is not None else 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; floats round-trip exactly (Python writes the shortest repr)."""
        hist = {} if self.norm_hist is None else {"norm_hist": self.norm_hist.cpu().tolist()}
        return {
            "stats_version": self.version,
            "count": self.count,
            "d_model": self.d,
            "mean": self.mean.cpu().tolist(),
            "std": self.std.cpu().tolist(),
            "norm": self.mean_norm,
            "m2": self.m2.cpu().tolist(),
            "norm_sum": float(self.norm_sum),
            "norm_sq_sum": float(self.norm_sq_sum),
            "nonfinite": self.nonfinite_tokens,
            **hist,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str = "cpu") -> RunningStats:
        s = cls(int(d["d_model"]), device)
        s.n = torch.tensor(int(d["count"]), dtype=torch.int64, device=device)
        s.mean = torch.tensor(d["mean"], dtype=torch.float64, device=device)
        s.m2 = torch.tensor(d["m2"], dtype=torch.float64, device=device)
        s.norm_sum = torch.tensor(float(d["norm_sum"]), dtype=torch.float64, device=device)
        s.norm_sq_sum = torch.tensor(float(d.get("norm_sq_sum", 0.0)), dtype=torch.float64, device=device)
        s.nonfinite = torch.tensor(int(d.get("nonfinite", 0)), dtype=torch.int64, device=device)
        hist = d.get("norm_hist")
        s.norm_hist = None if hist is None else torch.tensor(hist, dtype=torch.int64, device=device)
        return s


def merge_all(parts: Iterable[RunningStats]) -> RunningStats | None:
    """Merge partial statistics in the given order (callers sort, so every merger gets the same bytes)."""
    total: RunningStats | None = None
    for p in parts:
        if total is None:
            total = RunningStats(p.d).merge(p)
        else:
            total.merge(p)
    return total


def check_normalisable(stats: RunningStats, folder_url: str) -> RunningStats:
    """`stats` of the hook folder `folder_url` (`.../RUN/HOOK`), if a reader may normalise with them;
    else a DataError naming the run, the hook, the tokens with NaN or Inf and the fix."""
    if stats.finite and stats.count > 0:
        return stats
    run, _, hook = folder_url.rstrip("/").rpartition("/")
    bad = stats.nonfinite_tokens
    where = f"the statistics of hook {hook!r} of run {run}"
    if not stats.finite:
        raise DataError(
            f"{where} are not finite: they count {bad:,} token(s) with NaN or Inf in (written before "
            "activault left such tokens out, stats_version 1), and normalising with them would make "
            f"every batch NaN. Recount them without those tokens with {MERGE_STATS} (it rereads the "
            "files of the machines concerned), and read with drop_nonfinite=True so the tokens "
            "themselves are not delivered"
        )
    raise DataError(
        f"{where} count no finite token ({bad:,} hold NaN or Inf): there is nothing to normalise "
        "with; the activations overflow or the model is broken, so collect this hook again (e.g. in "
        "bfloat16 or float32)"
    )


def check_histogram(stats: RunningStats, folder_url: str) -> RunningStats:
    """`stats` of the hook folder `folder_url`, if they hold a norm histogram with a finite token;
    else a DataError naming the run, the hook and what to do."""
    run, _, hook = folder_url.rstrip("/").rpartition("/")
    where = f"the statistics of hook {hook!r} of run {run}"
    if stats.norm_hist is None:
        raise DataError(f"{where} have no norm histogram (stats_version {stats.version}): {NO_HISTOGRAM}")
    if stats.count == 0:
        raise DataError(f"{where} count no finite token: there is no median norm to filter by")
    return stats


# The exponent bits of each float dtype a file may hold: all of them set is a NaN or an Inf.
_EXPONENT: dict[torch.dtype, tuple[Any, int]] = {
    torch.float64: (np.uint64, 0x7FF0_0000_0000_0000),
    torch.float32: (np.uint32, 0x7F80_0000),
    torch.float16: (np.uint16, 0x7C00),
    torch.bfloat16: (np.uint16, 0x7F80),
}
_CHUNK = 8 << 20  # bytes of rows checked at once: the temporaries stay small


def _float64(x: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of CPU `x`, converted exactly (bfloat16 through its bits: numpy lacks it)."""
    x = x.detach()
    if x.dtype == torch.bfloat16:  # bfloat16 is float32's upper half
        bits = x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if x.dtype in (torch.float64, torch.float32, torch.float16):
        return x.numpy().astype(np.float64)
    return x.to(torch.float64).numpy()


def finite_rows(x: torch.Tensor) -> np.ndarray:
    """[n] bool: the tokens of a CPU `x: [n, d]` without NaN or Inf (the ones statistics count).

    Read from the exponent bits with numpy (bfloat16 too, which numpy lacks): one thread, no
    OpenMP team contending with the reader threads.
    """
    if x.dtype not in _EXPONENT:
        return torch.isfinite(x).all(dim=1).numpy()
    kind, mask = _EXPONENT[x.dtype]
    bits = x.reshape(x.shape[0], -1).view(torch.uint8).numpy().view(kind)  # [n, d]
    out = np.empty(bits.shape[0], dtype=bool)
    step = max(1, _CHUNK // max(1, bits.shape[1] * bits.itemsize))
    for a in range(0, bits.shape[0], step):
        out[a : a + step] = ((bits[a : a + step] & kind(mask)) != mask).all(axis=1)
    return out
