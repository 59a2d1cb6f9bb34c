"""TokenLoader's batches on their way out: an empty batch in recycled buffers, its states centred,
scaled and cast (each run's tokens with its own run's parameters), and the one copy to the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from activault.reading.device import to_device
from activault.reading.fetch import ReadBuffers
from activault.reading.window import Batch

Parts = list[tuple[int, int, int]]  # (start, end, run) of each run's tokens in a batch


@dataclass
class Delivery:
    """How a TokenLoader's batches are made and handed out."""

    hooks: list[str] | None  # None: one hook's states alone, not a {hook: states} dict
    norm: list[list[tuple[torch.Tensor | None, float]]]  # [hook][run]: (mean on the device, scale)
    dtype: torch.dtype | None  # None: the stored one
    device: torch.device
    batch_tokens: int
    return_ids: bool
    return_index: bool

    def empty(self, rows: list[tuple[int, torch.dtype]], buffers: ReadBuffers) -> Batch:
        """An empty batch; `rows`: per hook (d, dtype)."""
        B = self.batch_tokens
        ids = [buffers.empty((B,), torch.int32) for _ in range(2)] if self.return_ids else [None, None]
        index = buffers.empty((B, 3), torch.int64) if self.return_index else None
        return Batch([buffers.empty((B, d), dt) for d, dt in rows], ids[0], ids[1], index=index)

    def normalise(self, s: torch.Tensor, h: int, buffers: ReadBuffers | None, parts: Parts) -> torch.Tensor:
        """`s: [tokens, d]` centred, scaled and cast as asked, in as few passes as give the same
        float32 values (into recycled CPU buffers, or new tensors on the device); `parts`: (start,
        end, run) of each run's tokens, normalised with that run's parameters."""
        if all(self.norm[h][r][0] is None and self.norm[h][r][1] == 1.0 for _, _, r in parts):
            if self.dtype is None or self.dtype == s.dtype:
                return s
            return s.to(self.dtype) if buffers is None else buffers.empty(s.shape, self.dtype).copy_(s)
        out = (
            torch.empty(s.shape, dtype=torch.float32, device=s.device)
            if buffers is None
            else buffers.empty(s.shape, torch.float32)
        )
        for a, b, r in parts:
            mean, scale = self.norm[h][r]
            if mean is not None:
                torch.sub(s[a:b], mean, out=out[a:b])  # bf16 - float32: promoted exactly, one pass
            else:
                out[a:b].copy_(s[a:b])
            if scale != 1.0:
                out[a:b].mul_(scale)
        return out if self.dtype in (None, torch.float32) else out.to(self.dtype)

    def deliver(self, batch: Batch, buffers: ReadBuffers, parts: Parts | None = None) -> Any:
        n = batch.filled
        parts = parts if parts is not None else [(0, n, 0)]
        states = [s[:n] for s in batch.states]
        cpu = self.device.type == "cpu"
        if cpu:  # normalised into recycled buffers
            states = [self.normalise(s, h, buffers, parts) for h, s in enumerate(states)]
        extra = [t[:n] for t in (batch.input_ids, batch.positions, batch.index) if t is not None]
        moved = to_device([*states, *extra], self.device, buffers)
        out = moved[: len(states)]
        if not cpu:  # the stored dtype went through the pinned batch buffer; the device normalises
            out = [self.normalise(s, h, None, parts) for h, s in enumerate(out)]
        st: Any = dict(zip(self.hooks, out, strict=True)) if self.hooks else out[0]
        if not extra:
            return st
        got: dict[str, Any] = {"states": st}
        rest = moved[len(states) :]
        if self.return_ids:
            got.update(input_ids=rest[0].to(torch.int64), positions=rest[1])
        if self.return_index:
            got["index"] = rest[-1]
        return got
