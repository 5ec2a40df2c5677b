"""Candidate kernel route measured by scripts/benchmark.py (not used by the merge).

An exact alternative for the Timber kernel (issue 3): same maths, a different eigen
step on CPU. Measured end to end it is no faster than the kernel (70.8 s vs 72.1 s for
28 layers, inside the noise; bit-identical output), so the merge does not use it.

`refine_stack_fast` has the signature and result of `kernel.refine_stack` (a lambda or
a sequence of lambdas; `Refined` with one tensor per lambda) and is exact to the same
standard: float64 throughout, deviation from a float64 SVD ~1e-11 of the edit's norm
on the 1/i and 8-decade spectra, same K. On CPU, when SciPy is importable, it replaces
the costliest step of the current kernel, `torch.linalg.eigh` of the Gram matrix
(tridiagonalisation + divide and conquer + back-transformation of all n eigenvectors):

- LAPACK `dsytrd` reduces the float64 Gram to tridiagonal form once,
- `dstevd` (divide and conquer on the n x n tridiagonal) gives every eigenvalue (hence
  S and K) and the tridiagonal's eigenvectors, cheaply,
- only the columns Timber needs (the smaller of head and tail) are back-transformed,
  applying the Householder reflectors with `torch.ormqr` (LAPACK dormqr, MKL).

SciPy's OpenBLAS is run single-threaded for these calls (see `openblas_threads`).
The float64 delta and Gram are the kernel's own; the head/tail rebuild is as in the
kernel; the float64 delta is reused between the two passes when it fits in one chunk.
On any other device, or without SciPy, the same function takes the torch route (Gram +
eigh), so it is device-agnostic. It imports nothing from mergekit.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from typing import List, Optional, Sequence, Union

import torch

from mergekit_timber import kernel
from mergekit_timber.kernel import ERANK, HeadRule, Refined, head_size

try:  # optional CPU fast path
    from scipy.linalg import blas as _blas
    from scipy.linalg import lapack as _lapack
except Exception:  # pragma: no cover - scipy missing or broken
    _blas = _lapack = None


def have_cpu_fast_path() -> bool:
    return _lapack is not None


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


# --------------------------------------------------------------------------- Gram


def gram64(base: torch.Tensor, instruct: torch.Tensor, use_scipy: bool = False):
    """D^T D (float64, [n, n]) of one tall [m, n] delta, row-chunked.

    The default is the kernel's own Gram (torch GEMMs on row panels); `use_scipy` uses
    BLAS dsyrk (one triangle) on SciPy's OpenBLAS, single-threaded (see
    `openblas_threads`), which measured no faster here.
    Returns (gram, delta) where delta is the float64 delta when it fitted in a single
    chunk (so the rebuild can reuse it), else None.
    """
    if not use_scipy:
        gram, cached = kernel._gram(base[None], instruct[None])
        return gram[0], None if cached is None else cached[0]
    import numpy as np

    n = base.shape[-1]
    chunks = kernel._row_chunks(base.shape)
    cached = None
    acc = np.zeros((n, n), dtype=np.float64, order="F")
    for rows in chunks:
        d = kernel._delta64(base, instruct, rows)
        # d is C-contiguous [r, n]; its numpy transpose is a Fortran [n, r] view,
        # so dsyrk(trans=0) computes d^T d into the upper triangle, no copies.
        with openblas_threads(1):
            acc = _blas.dsyrk(1.0, d.numpy().T, beta=1.0, c=acc, trans=0, lower=0, overwrite_c=1)
        if len(chunks) == 1:
            cached = d
        del d
    g = torch.from_numpy(acc)  # Fortran order: a transposed-stride tensor
    upper = torch.triu(g)
    return upper + torch.triu(g, 1).transpose(0, 1), cached


def _use_scipy(t: torch.Tensor) -> bool:
    return _lapack is not None and t.device.type == "cpu"


# --------------------------------------------------------------------------- eigen


class _Tridiagonal:
    """Gram = Q T Q^T (dsytrd) and T = Z diag(w) Z^T (dstevd); vectors on demand."""

    def __init__(self, gram: torch.Tensor):
        import numpy as np

        n = gram.shape[0]
        self.n = n
        # The Gram is symmetric: its transpose is a Fortran-ordered view of the same
        # data, so LAPACK works in place without copying.
        a = np.asfortranarray(gram.numpy().T) if n else gram.numpy()
        if n > 1:
            with openblas_threads(1):
                lwork = int(_lapack.dsytrd_lwork(n, lower=1)[0])
                c, d, e, tau, info = _lapack.dsytrd(a, lower=1, lwork=max(1, lwork), overwrite_a=1)
                if info != 0:
                    raise RuntimeError(f"dsytrd failed (info={info})")
                w, z, info = _lapack.dstevd(d, e, compute_v=1, overwrite_d=1, overwrite_e=1)
            if info != 0:
                raise RuntimeError(f"dstevd failed (info={info})")
            self.reflectors = torch.from_numpy(c)
            self.tau = torch.from_numpy(tau)
        else:
            w, z = a.reshape(-1).copy(), np.ones((n, n))
            self.reflectors = self.tau = None
        self.evals = torch.from_numpy(w)  # ascending
        self.z = torch.from_numpy(z)

    def vectors(self, cols: torch.Tensor) -> torch.Tensor:
        """Eigenvectors of the Gram for the given (ascending-order) eigenvalue indices."""
        zc = self.z[:, cols]
        if self.reflectors is None or zc.shape[1] == 0:
            return zc.contiguous()
        out = torch.empty_like(zc, memory_format=torch.contiguous_format)
        out[0] = zc[0]
        # dsytrd(lower): Q = H(1)...H(n-1), H(i) acting on rows i+1..n with its vector
        # stored below the subdiagonal: exactly the geqrf layout of A[1:, :-1].
        out[1:] = torch.ormqr(self.reflectors[1:, :-1], self.tau, zc[1:].contiguous(), left=True, transpose=False)
        return out


# --------------------------------------------------------------------------- rebuild


def _rebuild_one(base, instruct, cached, cols, lams, tail_form, outs):
    """Write W_out for each lambda, chunk by chunk (same expressions as the kernel)."""
    cols_t = cols.transpose(0, 1).contiguous()
    for rows in kernel._row_chunks(base.shape):
        d = cached if cached is not None else kernel._delta64(base, instruct, rows)
        if cols.shape[1]:
            update = (d @ cols) @ cols_t
        else:
            update = torch.zeros_like(d)
        start = (instruct if tail_form else base)[rows].to(torch.float64)
        for lam, out in zip(lams, outs):
            if tail_form:
                result = start - (1.0 - lam) * update
            else:
                result = start + lam * d + (1.0 - lam) * update
            out[rows] = result.to(out.dtype)
            del result
        del d, update, start


# --------------------------------------------------------------------------- entry


def refine_stack_fast(
    base: torch.Tensor,
    instruct: torch.Tensor,
    lam: Union[float, Sequence[float]],
    rule: HeadRule = ERANK,
    out_dtype: Optional[torch.dtype] = None,
    read_hook: kernel.ReadHook = None,
) -> Refined:
    """Drop-in for `kernel.refine_stack`: Timber on a stack [B, m, n], exact (float64).

    `lam` may be a sequence (one decomposition serves every lambda), as in the kernel;
    `read_hook` is called with each matrix of the inputs once it is done.
    """
    if base.shape != instruct.shape or base.ndim != 3:
        raise ValueError(
            f"expected two equal [B, m, n] stacks; got {tuple(base.shape)} and {tuple(instruct.shape)}"
        )
    lams = [float(lam)] if isinstance(lam, (int, float)) else [float(x) for x in lam]
    out_dtype = out_dtype or instruct.dtype
    outs = [torch.empty(instruct.shape, dtype=out_dtype, device=instruct.device) for _ in lams]
    b_tall, i_tall = kernel._as_tall(base), kernel._as_tall(instruct)
    o_talls = [kernel._as_tall(o) for o in outs]
    n = b_tall.shape[-1]
    svals: List[torch.Tensor] = []
    ks: List[torch.Tensor] = []
    fast = _use_scipy(base)
    for j in range(base.shape[0]):
        b, i = b_tall[j], i_tall[j]
        gram, cached = gram64(b, i, use_scipy=False)
        if fast:
            eig = _Tridiagonal(gram)
            del gram
            s = kernel._singular_from_eigenvalues(eig.evals.flip(-1))
            k = head_size(s, rule)
            kk = int(k)
            tail_form = (n - kk) <= kk
            # descending index t is ascending index n-1-t
            if tail_form:  # columns K..n-1 (descending) = ascending 0..n-K-1
                idx = torch.arange(0, n - kk)
            else:  # columns 0..K-1 (descending) = ascending n-K..n-1
                idx = torch.arange(n - kk, n)
            cols = eig.vectors(idx)
        else:
            ev, vec = torch.linalg.eigh(gram)
            del gram
            s = kernel._singular_from_eigenvalues(ev.flip(-1))
            k = head_size(s, rule)
            kk = int(k)
            vec = vec.flip(-1)
            tail_form = (n - kk) <= kk
            cols = vec[:, kk:] if tail_form else vec[:, :kk]
            cols = cols.contiguous()
        _rebuild_one(b, i, cached, cols, lams, tail_form, [o[j] for o in o_talls])
        if read_hook is not None:
            read_hook(b)
            read_hook(i)
        svals.append(s.to(base.device))
        ks.append(k.to(base.device))
    return Refined(tensors=tuple(outs), singular_values=torch.stack(svals), k=torch.stack(ks))

