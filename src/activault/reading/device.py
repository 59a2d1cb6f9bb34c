"""Where a reader delivers its tensors: the device, checked up front, and the copies to it."""

from __future__ import annotations

import torch

from activault.errors import ConfigError
from activault.reading.fetch import ReadBuffers


def check_device(device: str | torch.device) -> torch.device:
    """The device to deliver tensors on; one torch does not know, or a CUDA device this machine does
    not have, is refused now (a ConfigError naming what to pass)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own message lists every backend it was built with
        raise ConfigError(f"device={device!r} is not a device; use device='cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but this machine has no usable CUDA device; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= (n := torch.cuda.device_count()):
        raise ConfigError(f"device={str(device)!r} but this machine has {n} CUDA device(s); use cuda:0..cuda:{n - 1}")
    return dev


def to_device(tensors: list[torch.Tensor], device: torch.device, buffers: ReadBuffers) -> list[torch.Tensor]:
    """`tensors` (memory from `buffers`) on `device`: on the CPU as they are (no copy).

    From pinned buffers the copies are asynchronous (non_blocking), and the buffers are handed
    out again only once an event recorded after them has passed (`ReadBuffers.copied`): the
    caller may drop the tensors, and the next file or batch be read into that memory, while the
    copies still run.
    """
    if device.type == "cpu":
        return list(tensors)
    pinned = buffers.pin
    out = [t.to(device, non_blocking=pinned) for t in tensors]
    if pinned:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))  # the stream the copies to `device` went on
        buffers.copied(tensors, done)
    return out
