"""Timber refuses NaN/Inf: in an input tensor (check_finite) and in the output as written.

mergekit casts each merged tensor to `out_dtype` (or a weight's forced dtype) when it
saves it, out of the method's sight: a float16 output whose values exceed 65504 holds
Inf on disk although the merge itself was finite. So the written, still staged, output
is read back and checked in the dtype each tensor was written in (mergekit_timber.integration.seam
runs this before publishing). The sweep checks the outputs it writes itself as it
writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from mergekit_timber.integration import input_pages
from mergekit_timber.errors import NonFiniteInput, TimberConfigError, TimberError, TimberInputError

_CHUNK = 1 << 22  # elements per check: never a full-size boolean mask of a large tensor


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN/Inf values of a floating-point `tensor`, counted chunk by chunk.

    On an accelerator the count accumulates on the device: one synchronisation at the
    end, not one per chunk. On the host, where reading a flag costs nothing, a chunk is
    counted only if it holds any (the common case is all finite)."""
    flat = tensor.reshape(-1)
    on_host = tensor.device.type == "cpu"
    bad = 0 if on_host else torch.zeros((), dtype=torch.int64, device=tensor.device)
    for start in range(0, flat.numel(), _CHUNK):
        finite = torch.isfinite(flat[start : start + _CHUNK])
        if not on_host:
            bad += finite.logical_not_().sum()
        elif not bool(finite.all()):
            bad += int(finite.logical_not_().sum())
    return int(bad)


def check_finite(name: str, which: str, tensor: torch.Tensor) -> None:
    """Raise if an input tensor (`which`: base or instruct) holds NaN/Inf."""
    bad = count_nonfinite(tensor)  # in chunks: no full-size mask on the device
    if bad:
        raise NonFiniteInput(
            f"{name}: the {which} model's tensor holds {bad} NaN/Inf value(s); refusing to merge it",
            tensor=name, which=which, count=bad, dtype=str(tensor.dtype).removeprefix("torch."),
        )


def check_tensor(name: str, tensor: torch.Tensor, label: str = "") -> None:
    """Raise if floating `tensor`, as it is about to be (or was) written, holds NaN/Inf."""
    if not tensor.is_floating_point():
        return
    bad = count_nonfinite(tensor)
    if bad:
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise TimberInputError(
            f"{name}: the merged tensor{label} holds {bad} Inf/NaN value(s) in {dtype}, "
            "the output dtype; use a wider dtype (out_dtype: bfloat16 or float32)"
        )


def blame_cast(error: NonFiniteInput, recipe_dtype: Optional[str], model_dir: Optional[Path]) -> TimberError:
    """The line for an input tensor that is NaN/Inf as the method got it: the model's file,
    or the recipe's `dtype:` cast (mergekit casts every input to it as it reads it)?"""
    if recipe_dtype is None or error.dtype != recipe_dtype or model_dir is None:
        return error
    from mergekit_timber.checkpoint import Checkpoint

    try:
        with Checkpoint(Path(model_dir), f"{error.which} model") as checkpoint:
            if error.tensor not in checkpoint.names():
                return error
            stored_dtype = checkpoint.info(error.tensor)[1]
            if count_nonfinite(checkpoint.tensor(error.tensor)):
                return error  # the file itself holds it
    except TimberError:
        return error
    limit = torch.finfo(getattr(torch, recipe_dtype)).max
    return TimberConfigError(
        f"{error.tensor}: the {error.which} model's tensor is finite in its file ({stored_dtype}) but "
        f"holds {error.count} Inf value(s) once cast to {recipe_dtype}, the recipe's dtype: (largest value "
        f"{limit:g}); use dtype: bfloat16 or float32, or leave dtype: out"
    )


def check_written(model_dir: Path) -> Dict[str, Tuple[int, ...]]:
    """Raise naming the first tensor of `model_dir` that holds NaN/Inf as written;
    return every written tensor's shape (mergekit_timber.integration.dropin checks them)."""
    from mergekit_timber.checkpoint import open_written

    shapes = {}
    with open_written(Path(model_dir), "merged model") as written:
        for name in written.names():
            tensor = written.tensor(name)
            check_tensor(name, tensor)
            shapes[name] = tuple(tensor.shape)
            input_pages.release(tensor)  # read once: do not keep the whole output resident
    return shapes
