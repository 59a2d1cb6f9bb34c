"""Each token's L2 norm, stored beside its states from format version 5 (the `norms` tensor).

The encoder (megabatch.encode) computes them from the values a file stores, so every writer
(collect, repair, shuffle, recompress, import) stores them without code of its own; the checksums
cover them like every tensor. The read-time norm filter compares them instead of reading the
states, and the NaN/Inf filter looks again only at the tokens whose norm is not finite.

Exactness: a norm is the square root of the float32 sum of the float32 squares of the stored
values (the squares of bfloat16 and float16 values are exact in float32), summed by torch in
chunks: ~6 ms of one core for a 32 MiB bfloat16 file, at collection and at every filtered read
of a format 4 file (in float64 it took 16x as long here). A sum of d terms is within about
d x 2^-24 (relative) of the exact one whatever its order, so two computations (another SIMD
width, other threads) differ by at most `norm_rtol(d)`, what `check_norms` allows; one machine
computes the same bits every time, so a filter keeps the same tokens from stored norms as from
computed ones. A token with a NaN has a NaN norm, one with an Inf (and no NaN) an Inf norm, and
so has a finite token whose sum of squares overflows float32 (a norm above 1.8e19; a float64
value beyond float32's range): only a non-finite norm can hide a non-finite token. Padding
tokens store zero states: their norm is 0.
"""

from __future__ import annotations

from typing import Final

import torch

from activault.errors import FormatError

NORMS: Final = "norms"  # [rows, seq] float32
NORMS_SINCE: Final = 5  # the first format version whose files hold them (required from then on)
# Below this a norm is noise: squares under float32's smallest subnormal (2^-149) round to 0.
NORM_ATOL: Final = 1e-18
# float32 bytes converted at once: 1 MiB stays in cache (a 32 MiB bfloat16 file: 6.2 ms of one
# core; 8 MiB chunks took 28.7 ms, 256 KiB 7.2 ms), whatever the file's size.
_CHUNK = 1 << 20


def token_norms(states: torch.Tensor) -> torch.Tensor:
    """`[...]` float32: each token's L2 norm of CPU `states: [..., d]` (the module's exactness rule)."""
    d = states.shape[-1] if states.dim() else 1
    flat = states.reshape(-1, d)
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    step = max(1, _CHUNK // max(1, d * 4))
    for a in range(0, flat.shape[0], step):
        c = flat[a : a + step].to(torch.float32, copy=True)  # float32 states too: squared in place
        torch.sum(c.square_(), dim=1, out=out[a : a + step])
    return out.sqrt_().reshape(states.shape[:-1])


def norm_rtol(d: int) -> float:
    """The relative difference two computations of a `d`-wide token's norm may show: each sum of d
    float32 terms is within about d x 2^-24 of the exact one, its square root within half that."""
    return (d + 2) * 2.0**-24


def check_norms(states: torch.Tensor, norms: torch.Tensor, url: str, run: str = "RUN") -> None:
    """FormatError naming the first token of file `url` (of run `run`) whose stored norm is not its
    states' norm (within `norm_rtol`; NaN for NaN, Inf for Inf). Call it once the checksums hold."""
    want = token_norms(states).reshape(-1)
    got = norms.reshape(-1)
    both_nan = got.isnan() & want.isnan()
    rtol = norm_rtol(states.shape[-1] if states.dim() else 1)
    same = torch.isclose(got, want, rtol=rtol, atol=NORM_ATOL) | both_nan
    if bool(same.all()):
        return
    i = int((~same).nonzero()[0])
    seq = norms.shape[-1] if norms.dim() > 1 else max(1, got.numel())
    raise FormatError(
        f"{url}: its stored norms disagree with its states at row {i // seq}, column {i % seq} (stored "
        f"{float(got[i])!r}, the states' norm {float(want[i])!r}, {int((~same).sum())} tokens in all): its "
        "states, ids and positions are intact (their checksums hold), the norms derived from them were "
        "written wrong, so the read-time NaN/Inf and norm filters misjudge this file's tokens. Rewrite "
        "them from the states with a lossless conversion, which computes every file's norms again: "
        f"`activault recompress {run} --compression zstd` (for a run stored with zstd: `none`, then "
        "`zstd` again); until then read this run without those two filters"
    )
