"""The Timber numerical kernel: pure torch, device-agnostic, no mergekit imports.

For a delta D = W_I - W_B with singular values S (descending), Timber keeps the head
of K components and scales the tail by lambda:

    W_out = W_I - (1 - lambda) * P_tail(D)        (tail form)
          = W_B + lambda * D + (1 - lambda) * H   (head form, H = head of D)

Only the head/tail *subspace* is needed, so the kernel never forms U: it takes the
eigen-decomposition of the smaller Gram matrix (D^T D of a tall D), in float64, which
yields the right singular vectors and S^2. Everything is computed on the device the
inputs live on; a wide matrix is handled as its transpose. Stacked inputs ([B, m, n])
are decomposed in one batched call.

Why float64 throughout: squaring the spectrum in a Gram matrix doubles its dynamic
range, so a float32 Gram loses the tail of any steep spectrum (measured: 5e-2 of the
edit's norm on a 1/i spectrum). In float64 the deviation from a float64 SVD stays
around 1e-11 on the spectra we test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

# Rows of a tall delta processed at a time: bounds float64 scratch memory to about
# CHUNK_BYTES per buffer whatever the tensor size (the 151936-row embedding included).
# Kept under glibc's largest mmap threshold (32 MiB): bigger buffers are mapped afresh
# and page-faulted on every allocation, which made widening and subtracting the
# embedding's rows 2-3x slower per element with 64 MiB chunks (measured here).
CHUNK_BYTES = 24 * 1024 * 1024


@dataclass(frozen=True)
class HeadRule:
    """How many leading singular components form the head that Timber keeps.

    kind "erank" is Timber's rule, K = ceil(eRank). The paper's ablations:
    "rank_ratio" keeps ceil(value * rank) components (Truncate-R, rank = min(m, n));
    "energy" keeps the smallest head holding `value` of sum(S^2) (Truncate-E).
    """

    kind: str = "erank"
    value: Optional[float] = None

    def __post_init__(self):
        if self.kind not in ("erank", "rank_ratio", "energy"):
            raise ValueError(f"unknown head rule {self.kind!r}")
        if self.kind != "erank" and (self.value is None or not 0 < self.value <= 1):
            raise ValueError(f"{self.kind} must lie in (0, 1]; got {self.value}")


ERANK = HeadRule()


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """eRank = exp(entropy of S / sum(S)) over the last axis; 0 for an all-zero S."""
    s = singular_values.to(torch.float64).clamp_min(0)
    total = s.sum(dim=-1, keepdim=True)
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    entropy = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy), torch.zeros_like(entropy))


def head_size(singular_values: torch.Tensor, rule: HeadRule = ERANK) -> torch.Tensor:
    """K per matrix (int64, last axis = descending singular values), in [0, rank]."""
    s = singular_values.to(torch.float64)
    rank = s.shape[-1]
    if rule.kind == "erank":
        # The tiny slack keeps an eRank that is an integer up to rounding (a flat
        # spectrum) from rounding up to a component that is zero anyway.
        k = torch.ceil(effective_rank(s) - 1e-9)
    elif rule.kind == "rank_ratio":
        k = torch.full(s.shape[:-1], math.ceil(rule.value * rank - 1e-9), dtype=torch.float64)
    else:
        energy = (s * s).cumsum(dim=-1)
        total = energy[..., -1:].clamp_min(torch.finfo(torch.float64).tiny)
        reached = energy / total >= rule.value - 1e-12
        k = (~reached).sum(dim=-1).to(torch.float64) + 1
        k = torch.where(energy[..., -1] > 0, k, torch.zeros_like(k))
    return k.clamp(0, rank).to(torch.int64)


def row_chunks(shape: torch.Size) -> list:
    """Row slices of a tall [..., m, n] stack, each about CHUNK_BYTES in float64."""
    m, n = shape[-2:]
    batch = max(1, math.prod(shape[:-2]))
    step = max(1, CHUNK_BYTES // (8 * max(1, n) * batch))
    return [slice(start, min(m, start + step)) for start in range(0, m, step)]


def delta64(base: Optional[torch.Tensor], instruct: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of W_I - W_B in float64; with no base, rows of W_I itself (its own spectrum)."""
    # copy=True: a float64 input would otherwise come back as itself and be subtracted into.
    rows64 = instruct[..., rows, :].to(torch.float64, copy=base is not None)
    return rows64 if base is None else rows64.sub_(base[..., rows, :])


def as_tall(t: torch.Tensor) -> torch.Tensor:
    """A [..., m, n] stack with m >= n: wide matrices as their transposes (views)."""
    return t.transpose(-1, -2) if t.shape[-2] < t.shape[-1] else t


class NonFiniteDelta(ValueError):
    """The delta holds NaN or Inf (so does one of the inputs)."""


# Column width of the Gram's row panels; at most _MAX_PANELS of them (measured on 2 cores
# for a 3072 x 1024 float64 delta: 0.076 s one GEMM, 0.064 s three half-blocks, 0.052 s
# four panels, 0.050 s eight).
_PANEL_WIDTH = 128
_MAX_PANELS = 8


def _panel_bounds(n: int) -> list:
    panels = max(1, min(_MAX_PANELS, n // _PANEL_WIDTH))
    return [n * i // panels for i in range(panels + 1)]


def _add_gram(gram: torch.Tensor, d: torch.Tensor) -> None:
    """gram += d^T d on the upper block triangle only.

    Columns are split into p panels; panel i times the columns from panel i on gives
    block row i right of the diagonal: (p + 1) / 2p of the GEMM flops, which
    `_fill_gram` completes by symmetry once at the end.
    """
    bounds = _panel_bounds(d.shape[-1])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        gram[..., lo:hi, lo:].add_(d[..., lo:hi].transpose(-1, -2) @ d[..., lo:])


def _fill_gram(gram: torch.Tensor) -> None:
    bounds = _panel_bounds(gram.shape[-1])
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        gram[..., lo:hi, :lo] = gram[..., :lo, lo:hi].transpose(-1, -2)


# Called with views of the inputs right after the kernel has read them, chunk by chunk,
# so a caller can give back pages of memory-mapped checkpoints (see input_pages); the
# kernel may read such a view again later.
ReadHook = Optional[Callable[[torch.Tensor], None]]


def _read_done(hook: ReadHook, rows: slice, *inputs: Optional[torch.Tensor]) -> None:
    if hook is not None:
        for t in inputs:
            if t is not None:
                hook(t[..., rows, :])


def delta_gram(base: Optional[torch.Tensor], instruct: torch.Tensor, read_hook: ReadHook = None):
    """(D^T D in float64, delta) of a tall [..., m, n] stack, row chunk by row chunk
    (D = instruct - base; instruct itself when base is None). delta is the float64 delta
    when it fitted in one chunk (the rebuild then reuses it instead of converting the
    inputs again), else None. Raises NonFiniteDelta if the inputs hold NaN/Inf."""
    n = instruct.shape[-1]
    gram = torch.zeros(instruct.shape[:-2] + (n, n), dtype=torch.float64, device=instruct.device)
    chunks = row_chunks(instruct.shape)
    cached = None
    for rows in chunks:
        d = delta64(base, instruct, rows)
        if len(chunks) > 1:  # a single chunk is read again at once by the rebuild, and reported then
            _read_done(read_hook, rows, base, instruct)
        _add_gram(gram, d)
        cached = d if len(chunks) == 1 else None
        del d
    _fill_gram(gram)
    # NaN/Inf anywhere in the inputs reaches the Gram: one cheap check on n x n.
    if not bool(torch.isfinite(gram).all()):
        raise NonFiniteDelta("the input holds NaN or Inf")
    return gram, cached


def singular_from_eigenvalues(evals_desc: torch.Tensor) -> torch.Tensor:
    """sqrt of the Gram's eigenvalues, those under its rounding floor (n * eps * largest)
    set to zero: they are noise of size sqrt(eps) * S_1, not spectrum."""
    n = evals_desc.shape[-1]
    floor = evals_desc[..., :1].clamp_min(0) * (n * torch.finfo(torch.float64).eps)
    return torch.where(evals_desc > floor, evals_desc, torch.zeros_like(evals_desc)).sqrt()


def _spectrum(base: torch.Tensor, instruct: torch.Tensor, read_hook: ReadHook = None):
    """(s, V, delta): see right_spectrum and delta_gram."""
    gram, cached = delta_gram(base, instruct, read_hook)
    evals, evecs = _eigh(gram)
    del gram
    return singular_from_eigenvalues(evals.flip(-1)), evecs.flip(-1), cached


def right_spectrum(
    base: torch.Tensor, instruct: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors of a tall delta.

    Returns (s [..., n], V [..., n, n]) with V's columns in the order of s; singular
    values under the Gram's rounding floor are zero (see singular_from_eigenvalues).
    """
    s, v, _ = _spectrum(base, instruct)
    return s, v


# CUDA devices whose float64 throughput is a full half of float32 (data-centre parts:
# P100, V100, A100, H100, B100/B200). Consumer and workstation GPUs run float64 at
# 1/32-1/64 speed, where LAPACK on the host is the faster place for the small Gram.
_FAST_FP64_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def eigh_device(device: torch.device) -> torch.device:
    """Where the [n, n] float64 eigen-decomposition runs for inputs on `device`.

    CPU inputs: the CPU. CUDA inputs: the same GPU if it has fast float64, else the
    host (the Gram and the projections, O(m n^2), stay on the GPU; only n x n moves).
    MERGEKIT_TIMBER_EIGH_DEVICE=same|cpu overrides the choice.
    """
    import os

    choice = os.environ.get("MERGEKIT_TIMBER_EIGH_DEVICE", "auto").strip().lower()
    if device.type == "cpu" or choice == "same":
        return device
    if choice == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        return device if capability in _FAST_FP64_CAPABILITIES else torch.device("cpu")
    return device


def _eigh(gram: torch.Tensor, vectors: bool = True):
    """torch.linalg.eigh (or eigvalsh) of the Gram, run where eigh_device says."""
    op = torch.linalg.eigh if vectors else torch.linalg.eigvalsh
    where = eigh_device(gram.device)
    if where == gram.device:
        return op(gram)
    result = op(gram.to(where))
    return tuple(t.to(gram.device) for t in result) if vectors else result.to(gram.device)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of [..., m, n] via the smaller Gram.

    Eigenvalues only: no eigenvectors are computed for a spectrum alone.
    """
    gram, _ = delta_gram(None, as_tall(matrix))
    return singular_from_eigenvalues(_eigh(gram, vectors=False).flip(-1))


@dataclass(frozen=True)
class Refined:
    """The refined tensor(s) and what the decomposition found, per stacked matrix."""

    tensors: Tuple[torch.Tensor, ...]  # one per lambda, in the order given
    singular_values: torch.Tensor  # [B, rank], descending
    k: torch.Tensor  # [B]

    @property
    def tensor(self) -> torch.Tensor:
        return self.tensors[0]


def refine_stack(
    base: torch.Tensor,
    instruct: torch.Tensor,
    lam: Union[float, Sequence[float]],
    rule: HeadRule = ERANK,
    out_dtype: Optional[torch.dtype] = None,
    read_hook: ReadHook = None,
) -> Refined:
    """Timber on a stack of matrices [B, m, n]: one decomposition per matrix.

    `lam` may be a sequence: one decomposition then serves every lambda (Timber is
    linear in lambda), and each result is bit-identical to a call with that lambda
    alone. Results are in `out_dtype` (default: the instruct tensor's dtype), on the
    inputs' device. `read_hook`, if given, is called with each chunk of the inputs
    once it has been read (see ReadHook).
    """
    if base.shape != instruct.shape or base.ndim != 3:
        raise ValueError(
            f"expected two equal [B, m, n] stacks; got {tuple(base.shape)} and {tuple(instruct.shape)}"
        )
    lams = [float(lam)] if isinstance(lam, (int, float)) else [float(x) for x in lam]
    out_dtype = out_dtype or instruct.dtype
    b_tall, i_tall = as_tall(base), as_tall(instruct)
    s, v, cached = _spectrum(b_tall, i_tall, read_hook)
    k = head_size(s, rule)
    outs = [torch.empty(instruct.shape, dtype=out_dtype, device=instruct.device) for _ in lams]
    o_talls = [as_tall(o) for o in outs]
    rebuild_into(b_tall, i_tall, v, k, lams, o_talls, delta=cached, read_hook=read_hook)
    return Refined(tensors=tuple(outs), singular_values=s, k=k)


def rebuild_into(
    base: torch.Tensor,
    instruct: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor,
    lams: Sequence[float],
    outs: Sequence[torch.Tensor],
    delta: Optional[torch.Tensor] = None,
    read_hook: ReadHook = None,
) -> None:
    """Write W_out into each of `outs`, chunk by chunk, via the smaller of head/tail.

    `delta`, if given, is the whole float64 delta (one chunk), reused as is.
    """
    n = v.shape[-1]
    use_tail = int((n - k).sum()) <= int(k.sum())
    index = torch.arange(n, device=v.device)
    if use_tail:
        # W_out = W_I - (1 - lam) * D V_t V_t^T, with V_t the columns at index >= K
        width = int((n - k).max())
        cols = v[..., n - width :]
        keep = (index[n - width :] >= k.unsqueeze(-1)).to(torch.float64)
    else:
        # W_out = W_B + lam * D + (1 - lam) * D V_h V_h^T, with V_h the columns below K
        width = int(k.max())
        cols = v[..., :width]
        keep = (index[:width] < k.unsqueeze(-1)).to(torch.float64)
    # Rows of cols_t are masked so that each matrix of the stack uses its own K.
    cols_t = (cols * keep.unsqueeze(-2)).transpose(-1, -2)
    for rows in row_chunks(base.shape):
        d = delta if delta is not None else delta64(base, instruct, rows)
        update = (d @ cols) @ cols_t
        for lam, out in zip(lams, outs):
            # Each sum is taken in float64 (the inputs' rows are widened inside the
            # add) and rounded once, straight into the output's rows.
            if use_tail:
                torch.add(instruct[..., rows, :], update, alpha=-(1.0 - lam), out=out[..., rows, :])
            else:
                mixed = torch.add(base[..., rows, :], d, alpha=lam).add_(update, alpha=1.0 - lam)
                out[..., rows, :].copy_(mixed)
                del mixed
        _read_done(read_hook, rows, base, instruct)
        del d, update


def refine_matrix(
    base: torch.Tensor,
    instruct: torch.Tensor,
    lam: float,
    rule: HeadRule = ERANK,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Timber on one [m, n] matrix (see refine_stack)."""
    return refine_stack(base.unsqueeze(0), instruct.unsqueeze(0), lam, rule, out_dtype).tensor[0]
