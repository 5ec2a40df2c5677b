"""The Timber numerical kernel: pure torch, device-agnostic, no mergekit imports.

For a delta D = W_I - W_B with singular values S (descending), Timber keeps the head
of K components and scales the tail by lambda:

    W_out = W_I - (1 - lambda) * P_tail(D)        (tail form)
          = W_B + lambda * D + (1 - lambda) * H   (head form, H = head of D)

Only the head/tail *subspace* is needed, so the kernel never forms U: it takes the
eigen-decomposition of the smaller Gram matrix (D^T D of a tall D), in float64, which
yields the right singular vectors and S^2. Everything is computed on the device the
inputs live on; a wide matrix is handled as its transpose. Stacked inputs ([B, m, n])
are decomposed in batched calls (see the memory model below).

Why float64 throughout: squaring the spectrum in a Gram matrix doubles its dynamic
range, so a float32 Gram loses the tail of any steep spectrum (measured: 5e-2 of the
edit's norm on a 1/i spectrum). In float64 the deviation from a float64 SVD stays
around 1e-11 on the spectra we test.

Where each step runs (`route_for`): every tensor the kernel makes lives on the inputs'
device, and on a device whose float64 is fast (CPU, data-centre GPUs) every step runs
there ("device"). A device with slow float64 (consumer GPUs: 1/32-1/64 of float32)
keeps the Gram and the rebuild but solves the n x n eigenproblem on the host
("host-eigh"); a device with no float64 at all (Apple MPS) has each batch of matrices
copied to the host, decomposed and rebuilt there in float64, and the result copied back
("host"). The results are the same on every route. The device is probed, not looked up
(`probe_caps`: a float64 op, then float64 against float32 GEMM time);
MERGEKIT_TIMBER_ROUTE=auto|device|host-eigh|host chooses, and one notice is logged per
device when the route is not "device".

Memory model (`plan_batches`): a stack of E tall [m, n] matrices is decomposed in
batches of b matrices, b the largest whose scratch fits the memory budget
(MERGEKIT_TIMBER_MEMORY_BUDGET, bytes or 512M / 8G / 8GiB; by default 90% of the
device's free memory on CUDA at the call, after the outputs are allocated; elsewhere
1 GiB, or half of the host's available memory if that is less: on a CPU a larger
batch is not faster, batched LAPACK and BLAS calls loop over the matrices anyway).
Besides its inputs and the outputs it returns, the kernel holds at most `Plan.peak` bytes:

    fixed (one eigensolver workspace):      8 * (2 n^2 + 6 n + 1) + 4 * (5 n + 3)
    per matrix of a batch:                  8 * (3 n^2 + 4 r n + 2 n) + n^2
        Gram, its eigenvectors, the masked head/tail columns (3 n^2 doubles); a row
        chunk of r rows of the delta, its projection, the update and one temporary
        (4 r n doubles); eigenvalues, spectrum (2 n); a boolean of the Gram (n^2 bytes)

with r = min(m, CHUNK_BYTES / (8 n)) rows: the chunk height does not depend on b, so
every batch reads its Gram ceil(m / r) times however many experts it holds. On the host
a batch is also kept to b r n <= CHUNK_BYTES / 8 where one matrix allows (see
CHUNK_BYTES: bigger buffers cost page faults there, and bigger batches gain nothing). The
"host" route also holds the batch's inputs and outputs on the host. A budget below
one matrix's need still runs, one matrix at a time (and says so once).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from mergekit_timber.method.parameters import ENERGY, RANK_RATIO

LOG = logging.getLogger(__name__)

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
        if self.kind != "erank":
            if self.value is None:
                raise ValueError(f"{self.kind} needs a value")
            # The parameter's own range check (mergekit_timber.method.parameters).
            {"rank_ratio": RANK_RATIO, "energy": ENERGY}[self.kind].check(self.value, prefix="")


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
        k = torch.full(s.shape[:-1], math.ceil(rule.value * rank - 1e-9), dtype=torch.float64, device=s.device)
    else:
        energy = (s * s).cumsum(dim=-1)
        total = energy[..., -1:].clamp_min(torch.finfo(torch.float64).tiny)
        reached = energy / total >= rule.value - 1e-12
        k = (~reached).sum(dim=-1).to(torch.float64) + 1
        k = torch.where(energy[..., -1] > 0, k, torch.zeros_like(k))
    return k.clamp(0, rank).to(torch.int64)


def chunk_rows(n: int) -> int:
    """Rows of one [m, n] matrix per chunk: about CHUNK_BYTES in float64."""
    return max(1, CHUNK_BYTES // (8 * max(1, n)))


def row_chunks(shape: torch.Size, rows: Optional[int] = None) -> list:
    """Row slices of a tall [..., m, n] stack: `rows` rows each, or by default about
    CHUNK_BYTES of float64 for the whole stack (the batch's rows share it)."""
    m, n = shape[-2:]
    batch = max(1, math.prod(shape[:-2]))
    step = rows or max(1, CHUNK_BYTES // (8 * max(1, n) * batch))
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


def delta_gram(
    base: Optional[torch.Tensor], instruct: torch.Tensor, read_hook: ReadHook = None, rows: Optional[int] = None
):
    """(D^T D in float64, delta) of a tall [..., m, n] stack, row chunk by row chunk
    (D = instruct - base; instruct itself when base is None; `rows` per chunk, see
    row_chunks). delta is the float64 delta when it fitted in one chunk (the rebuild then
    reuses it instead of converting the inputs again), else None. Raises NonFiniteDelta
    if the inputs hold NaN/Inf."""
    n = instruct.shape[-1]
    gram = torch.zeros(instruct.shape[:-2] + (n, n), dtype=torch.float64, device=instruct.device)
    chunks = row_chunks(instruct.shape, rows)
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


def _spectrum(base: torch.Tensor, instruct: torch.Tensor, read_hook: ReadHook = None, rows: Optional[int] = None):
    """(s, V ascending, delta): s descending; V's columns in the eigensolver's ascending
    order (column n-1-j belongs to s[j]: no flipped copy of V is made); see delta_gram."""
    gram, cached = delta_gram(base, instruct, read_hook, rows)
    evals, evecs = _eigh(gram)
    del gram
    return singular_from_eigenvalues(evals.flip(-1)), evecs, cached


def right_spectrum(
    base: torch.Tensor, instruct: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors of a tall delta.

    Returns (s [..., n], V [..., n, n]) with V's columns in the order of s; singular
    values under the Gram's rounding floor are zero (see singular_from_eigenvalues).
    """
    s, v, _ = _spectrum(base, instruct)
    return s, v.flip(-1)


# ----------------------------------------------------------------------------- routes

ROUTE_ENV = "MERGEKIT_TIMBER_ROUTE"
ROUTES = ("device", "host-eigh", "host")
_LEGACY_EIGH_ENV = {"same": "device", "cpu": "host-eigh"}  # MERGEKIT_TIMBER_EIGH_DEVICE, the older switch
# float64 GEMM this many times slower than float32 or more counts as slow. Data-centre
# GPUs measure 1-2 (V100 2, A100/H100/MI300X 1), consumer and workstation ones 32-64.
SLOW_FLOAT64_RATIO = 8.0


@dataclass(frozen=True)
class DeviceCaps:
    """What a device offers the kernel: float64 at all, and float64 at a usable speed."""

    float64: bool
    fast_float64: bool
    float64_ratio: Optional[float] = None  # measured float64 / float32 GEMM time, if measured


def choose_route(caps: DeviceCaps, choice: str = "auto") -> str:
    """The route for a device with `caps`: `choice` if it is possible there, else the
    fastest exact one ("device", "host-eigh": eigh on the host, "host": all on the host)."""
    if choice not in ("auto",) + ROUTES:
        raise ValueError(f"{ROUTE_ENV}={choice!r}: expected one of auto, {', '.join(ROUTES)}")
    if choice != "auto":
        if choice != "host" and not caps.float64:
            raise ValueError(f"{ROUTE_ENV}={choice}: this device has no float64; only 'host' is exact here")
        return choice
    if not caps.float64:
        return "host"
    return "device" if caps.fast_float64 else "host-eigh"


def _gemm_seconds(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    a = torch.ones(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(3):  # the first call also warms the library up
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def probe_caps(device: torch.device) -> DeviceCaps:
    """Probe `device`: does a float64 op run there, and (CUDA, ROCm included) how much
    slower is a float64 GEMM than a float32 one (TF32 off while timing)."""
    if device.type in ("cpu", "meta"):
        return DeviceCaps(True, True)
    try:
        probe = torch.ones(8, 8, dtype=torch.float64, device=device)
        float((probe @ probe)[0, 0])
    except (RuntimeError, TypeError, NotImplementedError):
        return DeviceCaps(False, False)
    if device.type != "cuda":
        return DeviceCaps(True, True)  # nothing to time it against reliably: trust it
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ratio = _gemm_seconds(device, torch.float64) / max(_gemm_seconds(device, torch.float32), 1e-9)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return DeviceCaps(True, ratio < SLOW_FLOAT64_RATIO, ratio)


_CAPS: Dict[str, DeviceCaps] = {}
_NOTICED: set = set()
_STATE_LOCK = threading.Lock()


def device_caps(device: torch.device) -> DeviceCaps:
    """probe_caps, once per device and process."""
    key = str(device)
    with _STATE_LOCK:
        known = _CAPS.get(key)
    if known is None:
        known = probe_caps(device)
        with _STATE_LOCK:
            known = _CAPS.setdefault(key, known)
    return known


def _route_choice() -> str:
    choice = os.environ.get(ROUTE_ENV, "").strip().lower()
    if not choice:
        legacy = os.environ.get("MERGEKIT_TIMBER_EIGH_DEVICE", "").strip().lower()
        choice = _LEGACY_EIGH_ENV.get(legacy, "auto")
    return choice


def route_for(device: torch.device, caps: Optional[DeviceCaps] = None) -> str:
    """The route for inputs on `device` (see the module docstring); one notice per device."""
    if device.type == "cpu":
        return "device"  # the host is the device
    caps = caps or device_caps(device)
    route = choose_route(caps, _route_choice())
    with _STATE_LOCK:
        first = (str(device), route) not in _NOTICED
        _NOTICED.add((str(device), route))
    if first and route != "device":
        LOG.warning("mergekit-timber: %s", describe_route(device, caps, route))
    return route


def describe_route(device: torch.device, caps: DeviceCaps, route: str) -> str:
    """What runs where, in words (the notice)."""
    if not caps.float64:
        why = f"{device} has no float64"
    elif not caps.fast_float64:
        ratio = f" (a float64 GEMM took {caps.float64_ratio:.0f}x as long as float32)" if caps.float64_ratio else ""
        why = f"{device} runs float64 slowly{ratio}"
    else:
        why = f"{device} has fast float64"
    where = {
        "device": "the Gram, its eigendecomposition and the rebuild run on it in float64",
        "host-eigh": "the Gram and the rebuild run on it in float64, the n x n eigendecomposition on the host",
        "host": "each batch of matrices is decomposed and rebuilt on the host in float64 and copied back",
    }[route]
    return f"{why}: {where}; the result is the same either way ({ROUTE_ENV}=auto|device|host-eigh|host chooses)"


def _eigh(gram: torch.Tensor, vectors: bool = True):
    """torch.linalg.eigh (or eigvalsh) of the Gram; on the host on the "host-eigh" route."""
    op = torch.linalg.eigh if vectors else torch.linalg.eigvalsh
    if gram.device.type == "cpu" or route_for(gram.device) == "device":
        return op(gram)
    result = op(gram.to("cpu"))
    return tuple(t.to(gram.device) for t in result) if vectors else result.to(gram.device)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of [..., m, n] via the smaller Gram.

    Eigenvalues only: no eigenvectors are computed for a spectrum alone.
    """
    gram, _ = delta_gram(None, as_tall(matrix))
    return singular_from_eigenvalues(_eigh(gram, vectors=False).flip(-1))


# ----------------------------------------------------------------------------- memory

BUDGET_ENV = "MERGEKIT_TIMBER_MEMORY_BUDGET"
DEVICE_BUDGET_SHARE = 0.9  # of the CUDA device's free memory: room for the allocator's rounding
HOST_BUDGET = 1 << 30  # on the host, at most: bigger batches are not faster there
HOST_BUDGET_SHARE = 0.5  # of the host's available memory (MemAvailable), if that is less
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'8G' (10^9), '8GiB' (2^30), '512M', '1e9', '1073741824' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    unit = (match.group(2) or "").removesuffix("b") if match else ""
    unit = unit + "b" if unit.endswith("i") else unit
    if not match or unit not in _UNITS:
        raise ValueError(f"{BUDGET_ENV}={text!r}: expected bytes, as 8G, 8GiB, 512M or 1e9")
    return int(float(match.group(1)) * _UNITS[unit])


def _host_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget(device: torch.device) -> int:
    """Bytes of scratch the kernel may hold on `device` (see the module docstring)."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if text:
        return parse_bytes(text)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(DEVICE_BUDGET_SHARE * (free + cached))
    available = _host_available()
    return min(HOST_BUDGET, int(HOST_BUDGET_SHARE * available)) if available else HOST_BUDGET


@dataclass(frozen=True)
class Plan:
    """How a stack of `matrices` tall [m, n] matrices is decomposed: `batch` at a time,
    `rows` rows per chunk; `peak` bounds the kernel's scratch (module docstring)."""

    matrices: int
    batch: int
    rows: int
    fixed: int  # bytes held once (the eigensolver's workspace)
    per_matrix: int  # bytes per matrix of a batch
    budget: int

    @property
    def batches(self) -> int:
        return -(-self.matrices // self.batch)

    @property
    def peak(self) -> int:
        return self.fixed + self.batch * self.per_matrix

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget


def plan_batches(
    shape: Sequence[int], budget: int, extra_per_matrix: int = 0, chunk_cap: Optional[int] = None
) -> Plan:
    """The batches for a tall [E, m, n] stack within `budget` bytes of scratch.

    `extra_per_matrix`: bytes per matrix the caller holds besides (the "host" route's
    copies of a batch). `chunk_cap`: also keep a batch's row chunk (all its matrices)
    within this many bytes of float64, as far as one matrix allows (the host: see
    CHUNK_BYTES). Pure arithmetic: no allocation, no device needed.
    """
    matrices, m, n = int(math.prod(shape[:-2])) or 1, int(shape[-2]), int(shape[-1])
    rows = min(m, chunk_rows(n))
    fixed = 8 * (2 * n * n + 6 * n + 1) + 4 * (5 * n + 3)
    per_matrix = 8 * (3 * n * n + 4 * rows * n + 2 * n) + n * n + extra_per_matrix
    batch = max(1, min(matrices, (budget - fixed) // per_matrix))
    if chunk_cap is not None:
        batch = max(1, min(batch, chunk_cap // (8 * rows * n)))
    return Plan(matrices, batch, rows, fixed, per_matrix, budget)


_WARNED_TIGHT: set = set()


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
    budget: Optional[int] = None,
    outs: Optional[Sequence[torch.Tensor]] = None,
) -> Refined:
    """Timber on a stack of matrices [B, m, n]: one decomposition per matrix.

    `lam` may be a sequence: one decomposition then serves every lambda (Timber is
    linear in lambda), and each result is bit-identical to a call with that lambda
    alone. Results are in `out_dtype` (default: the instruct tensor's dtype), on the
    inputs' device. The matrices are decomposed in batches within `budget` bytes of
    scratch (default: memory_budget; see the module docstring). `read_hook`, if given,
    is called with each chunk of the inputs once it has been read (see ReadHook).
    `outs`, if given, are written instead (one per lambda, the inputs' shape: views of
    a larger tensor are fine).
    """
    if base.shape != instruct.shape or base.ndim != 3:
        raise ValueError(
            f"expected two equal [B, m, n] stacks; got {tuple(base.shape)} and {tuple(instruct.shape)}"
        )
    lams = [float(lam)] if isinstance(lam, (int, float)) else [float(x) for x in lam]
    device = instruct.device
    if outs is None:
        out_dtype = out_dtype or instruct.dtype
        outs = [torch.empty(instruct.shape, dtype=out_dtype, device=device) for _ in lams]
    elif len(outs) != len(lams) or any(o.shape != instruct.shape for o in outs):
        raise ValueError(f"expected {len(lams)} outputs of shape {tuple(instruct.shape)}")
    out_dtype = outs[0].dtype
    b_tall, i_tall, o_talls = as_tall(base), as_tall(instruct), [as_tall(o) for o in outs]
    matrices, m, n = i_tall.shape
    on_host = route_for(device) == "host"
    # The "host" route copies each batch's inputs there and builds its outputs there.
    extra = m * n * (2 * instruct.element_size() + len(lams) * outs[0].element_size()) if on_host else 0
    where = torch.device("cpu") if on_host else device
    # On the host, buffers past CHUNK_BYTES cost a page fault per page on every allocation:
    # batches there keep their row chunk within it (smaller batches are not slower there).
    chunk_cap = CHUNK_BYTES if where.type == "cpu" else None
    plan = plan_batches(i_tall.shape, memory_budget(where) if budget is None else budget, extra, chunk_cap)
    if not plan.fits and (str(where), n) not in _WARNED_TIGHT:
        _WARNED_TIGHT.add((str(where), n))
        LOG.warning("mergekit-timber: one %d x %d matrix needs %.2f GB of scratch on %s, over the %.2f GB "
                    "memory budget (%s): decomposing one matrix at a time",
                    m, n, plan.peak / 1e9, where, plan.budget / 1e9, BUDGET_ENV)
    s = torch.empty(matrices, n, dtype=torch.float64, device=device)
    k = torch.empty(matrices, dtype=torch.int64, device=device)
    for lo in range(0, matrices, plan.batch):
        part = slice(lo, min(matrices, lo + plan.batch))
        if on_host:
            # Same code on host copies of the batch: the same result as on the CPU.
            host_outs = [torch.empty(o[part].shape, dtype=out_dtype) for o in o_talls]
            s_part, k_part = _refine_batch(b_tall[part].cpu(), i_tall[part].cpu(), lams, rule, host_outs, plan.rows, None)
            for o, h in zip(o_talls, host_outs):
                o[part].copy_(h)
            del host_outs
        else:
            outs_part = [o[part] for o in o_talls]
            s_part, k_part = _refine_batch(b_tall[part], i_tall[part], lams, rule, outs_part, plan.rows, read_hook)
        s[part].copy_(s_part)
        k[part].copy_(k_part)
    return Refined(tensors=tuple(outs), singular_values=s, k=k)


def _refine_batch(base, instruct, lams, rule, outs, rows, read_hook) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decompose and rebuild one batch of tall matrices into `outs`; (s, k) of the batch."""
    s, v, cached = _spectrum(base, instruct, read_hook, rows)
    k = head_size(s, rule)
    rebuild_into(base, instruct, v, k, lams, outs, delta=cached, read_hook=read_hook, rows=rows, ascending=True)
    return s, k


def rebuild_into(
    base: torch.Tensor,
    instruct: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor,
    lams: Sequence[float],
    outs: Sequence[torch.Tensor],
    delta: Optional[torch.Tensor] = None,
    read_hook: ReadHook = None,
    rows: Optional[int] = None,
    ascending: bool = False,
) -> None:
    """Write W_out into each of `outs`, chunk by chunk, via the smaller of head/tail.

    `v`'s columns follow the descending singular values, or the eigensolver's ascending
    order if `ascending`. `delta`, if given, is the whole float64 delta (one chunk),
    reused as is; `rows` per chunk as in row_chunks.
    """
    n = v.shape[-1]
    use_tail = int((n - k).sum()) <= int(k.sum())
    index = torch.arange(n, device=v.device)
    if use_tail:
        # W_out = W_I - (1 - lam) * D V_t V_t^T, with V_t the columns at index >= K
        width = int((n - k).max())
        cols = v[..., :width].flip(-1) if ascending else v[..., n - width :]
        keep = (index[n - width :] >= k.unsqueeze(-1)).to(torch.float64)
    else:
        # W_out = W_B + lam * D + (1 - lam) * D V_h V_h^T, with V_h the columns below K
        width = int(k.max())
        cols = v[..., n - width :].flip(-1) if ascending else v[..., :width]
        keep = (index[:width] < k.unsqueeze(-1)).to(torch.float64)
    # Rows of cols_t are masked so that each matrix of the stack uses its own K.
    cols_t = (cols * keep.unsqueeze(-2)).transpose(-1, -2)
    for rows_ in row_chunks(base.shape, rows):
        d = delta if delta is not None else delta64(base, instruct, rows_)
        update = (d @ cols) @ cols_t
        for lam, out in zip(lams, outs):
            # Each sum is taken in float64 (the inputs' rows are widened inside the
            # add) and rounded once, straight into the output's rows.
            if use_tail:
                torch.add(instruct[..., rows_, :], update, alpha=-(1.0 - lam), out=out[..., rows_, :])
            else:
                mixed = torch.add(base[..., rows_, :], d, alpha=lam).add_(update, alpha=1.0 - lam)
                out[..., rows_, :].copy_(mixed)
                del mixed
        _read_done(read_hook, rows_, base, instruct)
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
