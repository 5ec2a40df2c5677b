"""Candidate kernel routes timed by scripts/benchmark.py against the float64-SVD oracle.

Each route computes Timber on one [m, n] matrix and returns (W_out in float64, K).
`kernel` is what the merge runs (mergekit_timber.method.kernel); the others are the
alternatives measured and rejected (see docs/speed_and_memory.md). A SciPy
tridiagonal route (dsytrd + dstevd + partial back-transform) was measured too: equal
end to end (70.8 s vs 72.1 s for 28 layers, bit-identical output), so it was removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from typing import Callable, Dict, Tuple

import torch

from mergekit_timber.method.kernel import as_tall, refine_stack, singular_from_eigenvalues
from naive_timber import erank_k  # the baseline's K = ceil(eRank) (scripts/ is on sys.path)

try:  # SciPy is optional: the `evr` route and some micro-benchmarks need it
    from scipy.linalg import lapack as _lapack
except Exception:  # pragma: no cover - scipy missing or broken
    _lapack = None

_OPENBLAS = []  # [ctypes lib or None], resolved once


def _openblas():
    """SciPy's bundled OpenBLAS (the library its LAPACK calls run on), if there is one."""
    if not _OPENBLAS:
        lib = None
        if _lapack is not None:
            here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(_lapack.__file__))))
            for path in sorted(glob.glob(os.path.join(here, "scipy.libs", "libscipy_openblas*.so*"))):
                try:
                    cand = ctypes.CDLL(path)  # already loaded by scipy: same instance
                    cand.scipy_openblas_get_num_threads.restype = ctypes.c_int
                    cand.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
                    lib = cand
                    break
                except (OSError, AttributeError):
                    continue
        _OPENBLAS.append(lib)
    return _OPENBLAS[0]


@contextlib.contextmanager
def openblas_threads(n: int):
    """Run SciPy's OpenBLAS with `n` threads inside the block (no-op if not found).

    Why: the tridiagonal reduction is memory-bound and gains nothing from a second
    thread, while OpenBLAS worker threads keep spinning after a threaded call and,
    on a 2-core machine, starve torch's own (OpenMP/MKL) threads for the next calls:
    measured here, a 1024 x 1024 torch.linalg.eigh went from 0.16 s to 0.21 s right
    after a 2-thread OpenBLAS call on an idle machine, and to 1.3 s (median) on a
    busy one. One thread avoids both.
    """
    lib = _openblas()
    if lib is None:
        yield
        return
    old = lib.scipy_openblas_get_num_threads()
    lib.scipy_openblas_set_num_threads(int(n))
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(old)


def _tall64(b, i):
    """(base, instruct, delta) of a matrix pair, tall (see kernel.as_tall), in float64."""
    bt, it = as_tall(b).double(), as_tall(i).double()
    return bt, it, it - bt


def _untall(out, like):
    """`out` (tall) back in the orientation of `like`."""
    return out.T if like.shape[0] < like.shape[1] else out


def _project(b64, i64, d, v_desc, k, lam, dtype=torch.float64):
    """W_out from the right singular vectors (descending), via the smaller of head/tail.

    `d` is the delta in `dtype` (the route's working precision); the update is computed
    in that precision and added to the float64 inputs.
    """
    n = v_desc.shape[1]
    if n - k <= k:
        cols = v_desc[:, k:].to(dtype)
        upd = (d @ cols) @ cols.T
        return i64 - (1 - lam) * upd.double()
    cols = v_desc[:, :k].to(dtype)
    upd = (d @ cols) @ cols.T
    return b64 + lam * d.double() + (1 - lam) * upd.double()


def route_svd64(b, i, lam):
    d = i.double() - b.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = erank_k(s)
    s2 = s.clone()
    s2[k:] *= lam
    return b.double() + (u * s2) @ vh, k


def route_kernel(b, i, lam):
    r = refine_stack(b[None], i[None], lam, out_dtype=torch.float64)
    return r.tensor[0], int(r.k[0])


def route_svd32(b, i, lam):
    d = (i.double() - b.double()).float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = erank_k(s)
    s2 = s.clone()
    s2[k:] *= lam
    return b.double() + ((u * s2) @ vh).double(), k


def route_gram32(b, i, lam):
    bt, it, d = _tall64(b, i)
    d = d.float()
    ev, vec = torch.linalg.eigh(d.T @ d)
    s = ev.flip(-1).clamp_min(0).sqrt()
    k = erank_k(s)
    out = _project(bt, it, d, vec.flip(-1), k, lam, torch.float32)
    return _untall(out, b), k


def route_qr_svd(b, i, lam):
    bt, it, d = _tall64(b, i)
    _, r = torch.linalg.qr(d, mode="r")
    _, s, vh = torch.linalg.svd(r)
    k = erank_k(s)
    out = _project(bt, it, d, vh.T, k, lam)
    return _untall(out, b), k


def route_evr_subset(b, i, lam):
    """gram64 + eigvalsh (K) + scipy eigh(subset_by_index, driver='evr') for the needed side."""
    import scipy.linalg as sl

    bt, it, d = _tall64(b, i)
    g = d.T @ d
    n = g.shape[0]
    s = singular_from_eigenvalues(torch.linalg.eigvalsh(g).flip(-1))
    k = erank_k(s)
    tail = n - k <= k
    lo, hi = (0, n - k - 1) if tail else (n - k, n - 1)  # ascending indices
    if hi < lo:
        vec = torch.zeros(n, 0, dtype=torch.float64)
    else:
        with openblas_threads(1):
            _, vec = sl.eigh(g.numpy(), subset_by_index=[lo, hi], driver="evr")
        vec = torch.from_numpy(vec)
    vec = vec.flip(-1)  # descending within the subset
    v_desc = torch.zeros(n, n, dtype=torch.float64)
    if tail:
        v_desc[:, k:] = vec
    else:
        v_desc[:, :k] = vec
    out = _project(bt, it, d, v_desc, k, lam)
    return _untall(out, b), k


def refine_eigenvectors(a: torch.Tensor, x: torch.Tensor, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ogita-Aishima refinement (2018) of approximate eigenvectors x of symmetric a, float64.

    Each step costs four n^3 GEMMs; it converges quadratically while x is accurate to
    better than the relative gaps, and treats eigenvalues closer than its own error
    bound as a cluster (only orthogonalising within it). Returns (eigenvalues, vectors),
    ascending like torch.linalg.eigh.
    """
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    for _ in range(steps):
        r = eye - x.T @ x
        s = x.T @ (a @ x)
        lam = torch.diagonal(s) / (1 - torch.diagonal(r))
        # The paper's bound with cheap norms: Frobenius for the 2-norms of the residuals
        # (an upper bound), the largest |eigenvalue| for ||a||_2.
        delta = 2 * (torch.linalg.norm(s - torch.diag(lam)) + lam.abs().max() * torch.linalg.norm(r))
        gaps = lam[None, :] - lam[:, None]
        far = gaps.abs() > delta
        e = torch.where(far, (s + lam[None, :] * r) / torch.where(far, gaps, torch.ones_like(gaps)), r / 2)
        x = x + x @ e
    return (torch.diagonal(x.T @ (a @ x)), x)


def route_mixed(b, i, lam, steps=2):
    """float64 Gram, float32 eigh, then `steps` float64 refinement steps of the vectors."""
    bt, it, d = _tall64(b, i)
    g = d.T @ d
    _, vec32 = torch.linalg.eigh(g.float())
    ev, vec = refine_eigenvectors(g, vec32.double(), steps)
    order = torch.argsort(ev, descending=True)
    ev, vec = ev[order], vec[:, order]
    s = singular_from_eigenvalues(ev)
    k = erank_k(s)
    out = _project(bt, it, d, vec, k, lam)
    return _untall(out, b), k


ROUTES: Dict[str, Tuple[str, Callable]] = {
    "svd64": ("float64 full SVD (oracle; the authors' decomposition)", route_svd64),
    "kernel": ("current kernel: float64 Gram (GEMM) + torch.linalg.eigh", route_kernel),
    "evr": ("float64 Gram + eigvalsh for K + scipy eigh(subset, driver=evr)", route_evr_subset),
    "qr+svd": ("float64 QR of D, then SVD of R", route_qr_svd),
    "mixed": ("float64 Gram + float32 eigh + 2 float64 Ogita-Aishima refinement steps", route_mixed),
    "svd32": ("float32 full SVD", route_svd32),
    "gram32": ("float32 Gram + float32 eigh (+ float32 projection)", route_gram32),
}
# Off CPU, `evr` (SciPy) is skipped.
