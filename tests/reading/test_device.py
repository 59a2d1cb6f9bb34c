"""reading/device.py: the device checked up front (garbage, or CUDA a machine does not have, is one
ConfigError naming what to pass), and tensors delivered on it: on the CPU the very tensors, no copy;
on CUDA from pinned buffers, whose memory is handed out again only once the copies have run."""

from __future__ import annotations

import pytest
import torch

from activault.errors import ConfigError
from activault.reading.device import check_device, to_device
from activault.reading.fetch import ReadBuffers


def filled(buffers: ReadBuffers, values: list[float]) -> torch.Tensor:
    t = buffers.empty((len(values),), torch.float32)
    t.copy_(torch.tensor(values))
    return t


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu")])
def test_check_device_gives_the_torch_device(device: str | torch.device) -> None:
    assert check_device(device) == torch.device(device)


@pytest.mark.parametrize("device", ["garbage", "gpu", "", "cuda:x", "cpu:-1", "cuda:0:1", None, 1.5, ["cpu"]])
def test_check_device_refuses_garbage_with_one_config_error(device: object) -> None:
    with pytest.raises(ConfigError) as e:
        check_device(device)  # type: ignore[arg-type]
    message = str(e.value)
    assert message == f"device={device!r} is not a device; use device='cpu', 'cuda' or 'cuda:N'"
    assert "\n" not in message and e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_on_a_machine_without_one_is_refused(device: str | torch.device) -> None:
    with pytest.raises(ConfigError, match=r"no usable CUDA device; use device='cpu'$"):
        check_device(device)


def test_to_device_on_the_cpu_returns_the_same_tensors() -> None:
    buffers = ReadBuffers()
    tensors = [filled(buffers, [1.0, 2.0]), filled(buffers, [3.0])]
    out = to_device(tensors, torch.device("cpu"), buffers)
    assert out == tensors and out is not tensors  # a new list (the caller's is left alone) ...
    assert all(a is b for a, b in zip(out, tensors, strict=True))  # ... of the very tensors: no copy
    tensors.clear()
    assert [t.tolist() for t in out] == [[1.0, 2.0], [3.0]]
    assert to_device([], torch.device("cpu"), buffers) == []
