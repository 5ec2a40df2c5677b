"""A stand-in accelerator for CPU tests: tensors that say they live on another device.

`OnDevice` wraps a CPU tensor and reports the `meta` device, so code that places what
it creates by `tensor.device` (as it must, for CUDA) gets a tensor on the "device",
while the values stay real (every op runs on the wrapped CPU tensors). Inside
`fake_device()` every op is checked as CUDA would check it, and stricter:

- an op that mixes a device tensor with a host tensor of one or more dimensions fails
  (CUDA accepts 0-dim host scalars, so they pass);
- a factory op (torch.empty, zeros, full, arange, ...) given no device while the check
  is on fails: it makes a host tensor, which on a real device is mixed in later.

Copies between host and device (`.cpu()`, `.to(device)`, `copy_`) and factories told `device="cpu"` are
allowed: work meant for the host is legitimate; using its tensors with device tensors
again is what fails.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
# Copies between host and device: the one place a host tensor may meet a device tensor.
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default}


class HostTensorOnDevicePath(AssertionError):
    """A host tensor was created or mixed in on the device path."""


class OnDevice(torch.Tensor):
    """A CPU tensor that reports DEVICE (see the module docstring)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=DEVICE, requires_grad=False,
        )
        out.inner = inner
        return out

    def __repr__(self):
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, strict=False)


def to_device(t: torch.Tensor) -> OnDevice:
    return OnDevice(t)


def to_host(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, OnDevice):
        return t.inner
    if t.device.type != "cpu":
        raise HostTensorOnDevicePath(f"expected a device tensor or host tensor, got {t.device}")
    return t


def _run(func, args, kwargs, strict: bool):
    flat, _ = tree_flatten((args, kwargs))
    wrapped = [t for t in flat if isinstance(t, OnDevice)]
    on_device = bool(wrapped)
    device_kw = kwargs.get("device")
    if device_kw is not None and torch.device(device_kw).type == DEVICE.type:
        kwargs = dict(kwargs, device=torch.device("cpu"))
        on_device = True
        made_on_device = True
    else:
        made_on_device = False
    if on_device and func not in _COPIES:
        for t in flat:
            if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.dim() > 0:
                raise HostTensorOnDevicePath(
                    f"{func}: a host tensor of shape {list(t.shape)} is mixed with device tensors"
                )
    elif strict and device_kw is None and not any(isinstance(t, torch.Tensor) for t in flat):
        # A factory op with no device given: the default device, the host, on the device path.
        raise HostTensorOnDevicePath(f"{func} created a host tensor while the inputs are on the device")
    host_copy = func in _COPIES and device_kw is not None and torch.device(device_kw).type == "cpu"
    by_inner = {id(t.inner): t for t in wrapped}
    unwrapped_args, unwrapped_kwargs = tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, (args, kwargs))
    result = func(*unwrapped_args, **unwrapped_kwargs)
    if host_copy or not (on_device or made_on_device):
        return result

    def wrap(t):
        if not isinstance(t, torch.Tensor):
            return t
        same = by_inner.get(id(t))  # in-place and out= ops return their argument
        return same if same is not None else OnDevice(t)

    return tree_map(wrap, result)


class _Check(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, strict=True)


@contextlib.contextmanager
def fake_device() -> Iterator[None]:
    """Within: every op on OnDevice tensors is checked (module docstring)."""
    with _Check():
        yield
