"""Exact, mergeable running statistics of activations (float64, Chan et al.'s parallel update).

Per dimension: count, mean and M2 (sum of squared deviations); per token: the sum of L2 norms, and
how many tokens hold a NaN or Inf (their L2 norm is then not finite: counted at no extra pass).
Merging two partial results is exact up to float64 rounding, so statistics of many batches and
many machines equal a single float64 pass over every stored token. The batch term M2_b is kept
(the original's running std dropped it and under-estimated the spread).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

STATS_VERSION = 1


class RunningStats:
    """Running mean, variance and mean L2 norm over tokens of dimension d."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.d = d
        self.count = 0
        self.mean = torch.zeros(d, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(d, dtype=torch.float64, device=device)
        self.norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.norm_sq_sum = torch.zeros((), dtype=torch.float64, device=device)
        # A device tensor: reading it would wait for the GPU, so callers read it once per file.
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def nonfinite_tokens(self) -> int:
        """Tokens with a NaN or Inf in any dimension."""
        return int(self.nonfinite)

    def update(self, x: torch.Tensor) -> None:
        """Add tokens `x: [n, d]` (any dtype; accumulated in float64 on x's device)."""
        n = x.shape[0]
        if n == 0:
            return
        x64 = x.to(torch.float64, copy=True)  # a copy even of float64: centred in place below
        norms = torch.linalg.vector_norm(x64, dim=1)
        self.nonfinite += (~torch.isfinite(norms)).sum()
        # Two passes (mean, then squared deviations, in place: no second [n, d] buffer): as exact
        # as var_mean (within 1e-14 of it) and 2.5x faster on the CPU, where this runs on the
        # forward loop's thread.
        mean_b = x64.mean(dim=0)
        m2_b = x64.sub_(mean_b).square_().sum(dim=0)
        self._merge(n, mean_b, m2_b, norms.sum(), (norms**2).sum())

    def _merge(
        self,
        n_b: int,
        mean_b: torch.Tensor,
        m2_b: torch.Tensor,
        ns: torch.Tensor,
        nss: torch.Tensor,
    ) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b.to(self.mean.device) - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b.to(self.m2.device) + delta**2 * (n_a * n_b / n)
        self.norm_sum += ns.to(self.norm_sum.device)
        self.norm_sq_sum += nss.to(self.norm_sq_sum.device)
        self.count = n

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold another partial result into this one (in place) and return self."""
        if other.d != self.d:
            raise ValueError(f"cannot merge statistics of dimension {other.d} into {self.d}")
        if other.count:
            self._merge(other.count, other.mean, other.m2, other.norm_sum, other.norm_sq_sum)
        self.nonfinite += other.nonfinite.to(self.nonfinite.device)
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; floats round-trip exactly (Python writes the shortest repr)."""
        return {
            "stats_version": STATS_VERSION,
            "count": self.count,
            "d_model": self.d,
            "mean": self.mean.cpu().tolist(),
            "std": self.std.cpu().tolist(),
            "norm": self.mean_norm,
            "m2": self.m2.cpu().tolist(),
            "norm_sum": float(self.norm_sum),
            "norm_sq_sum": float(self.norm_sq_sum),
            "nonfinite": self.nonfinite_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str = "cpu") -> RunningStats:
        s = cls(int(d["d_model"]), device)
        s.count = int(d["count"])
        s.mean = torch.tensor(d["mean"], dtype=torch.float64, device=device)
        s.m2 = torch.tensor(d["m2"], dtype=torch.float64, device=device)
        s.norm_sum = torch.tensor(float(d["norm_sum"]), dtype=torch.float64, device=device)
        s.norm_sq_sum = torch.tensor(float(d.get("norm_sq_sum", 0.0)), dtype=torch.float64, device=device)
        s.nonfinite = torch.tensor(int(d.get("nonfinite", 0)), dtype=torch.int64, device=device)
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
