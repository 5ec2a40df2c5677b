"""Merged tensors must be finite in the dtype they are written in.

mergekit casts each merged tensor to the config's `out_dtype` only when it saves it,
out of the method's sight: a float16 output whose values exceed 65504 becomes Inf on
disk although the merge itself was finite. `preflight.check` records the output dtype
of the Timber merge about to run; the method checks every refined tensor in it.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergekit_timber.errors import TimberInputError

_CHUNK = 1 << 22  # elements per check: a cast copy of 4 Mi elements, not of the tensor

_output_dtype: Optional[torch.dtype] = None


def set_output_dtype(dtype: Optional[torch.dtype]) -> None:
    """The dtype mergekit will write (None: the merged tensor's own dtype)."""
    global _output_dtype
    _output_dtype = dtype


def output_dtype(tensor: torch.Tensor) -> torch.dtype:
    return _output_dtype or tensor.dtype


def count_nonfinite(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    """NaN/Inf values of `tensor` once cast to `dtype`, counted chunk by chunk."""
    flat = tensor.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(dtype)
        finite = torch.isfinite(part)
        if not bool(finite.all()):
            bad += int((~finite).sum())
    return bad


def check_output(name: str, tensor: torch.Tensor, label: str = "") -> None:
    """Raise if the merged `tensor` is not finite in the dtype it will be written in."""
    if not tensor.is_floating_point():
        return
    dtype = output_dtype(tensor)
    bad = count_nonfinite(tensor, dtype)
    if bad:
        dtype_name = str(dtype).removeprefix("torch.")
        raise TimberInputError(
            f"{name}: the merged tensor{label} holds {bad} Inf/NaN value(s) in {dtype_name}, "
            f"the output dtype; use a wider dtype "
            "(out_dtype: bfloat16 or float32)"
        )
