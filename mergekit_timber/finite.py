"""A Timber output is published only if every tensor is finite as written.

mergekit casts each merged tensor to `out_dtype` (or a weight's forced dtype) when it
saves it, out of the method's sight: a float16 output whose values exceed 65504 holds
Inf on disk although the merge itself was finite. So the written, still staged, output
is read back and checked in the dtype each tensor was written in (mergekit_timber.seam
runs this before publishing). The sweep checks the outputs it writes itself as it
writes them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergekit_timber import input_pages
from mergekit_timber.errors import TimberInputError

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


def check_written(model_dir: Path) -> None:
    """Raise naming the first tensor of `model_dir` that holds NaN/Inf as written."""
    from mergekit_timber.checkpoint import open_written

    with open_written(Path(model_dir), "merged model") as written:
        for name in written.names():
            tensor = written.tensor(name)
            check_tensor(name, tensor)
            input_pages.release(tensor)  # read once: do not keep the whole output resident
