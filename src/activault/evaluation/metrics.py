"""Reconstruction metrics of a sparse coder over tokens, accumulated exactly (float64 sums)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Feature density bins (fraction of tokens a latent fires on), as SAELens's log-density plots cut them.
DENSITY_EDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class Reconstruction:
    """What a sparse coder keeps of the tokens it encodes and decodes."""

    tokens: int
    explained_variance: float  # 1 - FVU: 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2 over every token
    mse: float  # mean over tokens and dimensions of (x - x_hat)^2
    l0: float  # mean count of non-zero latents per token
    d_sae: int
    dead: int  # latents never active over the tokens
    density: dict[str, int]  # latents per firing-frequency bin ("0", "<1e-06", "1e-06..1e-05", ..., ">=0.1")
    density_median: float  # the median latent's firing frequency (the lower middle one for an even count)


def density_bins(freq: torch.Tensor) -> dict[str, int]:
    """How many latents fall in each firing-frequency bin; a dead latent is in "0" only."""
    freq = freq.double()
    out = {"0": int((freq == 0).sum())}
    bounds = (0.0, *DENSITY_EDGES, math.inf)
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        label = f"<{hi:g}" if lo == 0 else f">={lo:g}" if hi == math.inf else f"{lo:g}..{hi:g}"
        above = freq > lo if lo == 0 else freq >= lo
        out[label] = int((above & (freq < hi)).sum())
    return out


class ReconstructionMeter:
    """Running sums over batches of (x, latents, x_hat); `result()` gives the Reconstruction."""

    def __init__(self) -> None:
        self.tokens = 0
        self._err = 0.0  # sum |x - x_hat|^2
        self._sum: torch.Tensor | None = None  # [d] sum of x
        self._sq = 0.0  # sum |x|^2
        self._active = 0  # non-zero latents over every token
        self._fires: torch.Tensor | None = None  # [d_sae] tokens each latent fired on
        self._d = 0

    def add(self, x: torch.Tensor, latents: torch.Tensor, x_hat: torch.Tensor) -> None:
        """One batch: x, x_hat [n, d]; latents [n, d_sae]."""
        if x.shape != x_hat.shape or latents.ndim != 2 or latents.shape[0] != x.shape[0]:
            raise ValueError(f"shapes x {tuple(x.shape)}, latents {tuple(latents.shape)}, x_hat {tuple(x_hat.shape)}")
        x64, e = x.double(), (x.double() - x_hat.double())
        self._err += float(e.pow(2).sum())
        self._sq += float(x64.pow(2).sum())
        s = x64.sum(0).cpu()
        self._sum = s if self._sum is None else self._sum + s
        on = latents != 0
        self._active += int(on.sum())
        f = on.sum(0, dtype=torch.int64).cpu()
        self._fires = f if self._fires is None else self._fires + f
        self.tokens += x.shape[0]
        self._d = x.shape[1]

    def result(self) -> Reconstruction:
        if self._sum is None or self._fires is None or self.tokens == 0:
            raise ValueError("no tokens were added")
        n = self.tokens
        # Total variance around the per-dimension mean; float64 keeps the subtraction exact enough.
        total = self._sq - float(self._sum.pow(2).sum()) / n
        ev = 1 - self._err / total if total > 0 else (1.0 if self._err == 0 else -math.inf)
        freq = self._fires.double() / n
        return Reconstruction(
            tokens=n,
            explained_variance=ev,
            mse=self._err / (n * self._d),
            l0=self._active / n,
            d_sae=len(freq),
            dead=int((self._fires == 0).sum()),
            density=density_bins(freq),
            density_median=float(freq.median()),
        )
