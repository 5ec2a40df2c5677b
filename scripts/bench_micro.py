"""Micro-benchmarks of the kernel's pieces, run by scripts/benchmark.py in a process of its own.

    python scripts/bench_micro.py INPUTS.pt REPEATS

INPUTS.pt holds [gate_proj base, gate_proj instruct, embedding base, embedding
instruct] (torch.save). Prints progress on stderr and, last on stdout, a JSON list of
[label, best s, median s]. Needs SciPy (the LAPACK rows).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import scipy.linalg as sl
import torch
from scipy.linalg import blas, lapack

from bench_routes import openblas_threads
from mergekit_timber.method.kernel import delta_gram

ROWS = []


def timed(label, fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ROWS.append((label, min(times), statistics.median(times)))
    print(label, min(times), file=sys.stderr, flush=True)


def main(inputs: str, reps: int) -> None:
    base, inst, emb_b, emb_i = torch.load(inputs)
    d = inst.double() - base.double()
    m, n = d.shape
    f32 = d.float()
    g = d.T @ d
    gn = g.numpy()
    w = n // 2

    def gram_blocks():
        h = n // 2
        a1, a2 = d[:, :h], d[:, h:]
        out = torch.empty(n, n, dtype=torch.float64)
        out[:h, :h], out[:h, h:], out[h:, h:] = a1.T @ a1, a1.T @ a2, a2.T @ a2
        out[h:, :h] = out[:h, h:].T
        return out

    def syrk():
        return blas.dsyrk(1.0, d.numpy().T, trans=0, lower=0)

    T = lambda label, fn, r=reps: timed(label, fn, r)  # noqa: E731
    T(f"Gram {m}x{n}: torch d.T @ d (float64 GEMM, 2 threads)", lambda: d.T @ d)
    T(f"Gram {m}x{n}: torch d.T.contiguous() @ d", lambda: d.T.contiguous() @ d)
    T(f"Gram {m}x{n}: torch 2-block symmetric (3/4 of the flops)", gram_blocks)
    T(f"Gram {m}x{n}: the kernel's delta_gram (row panels, (p+1)/2p of the flops)", lambda: delta_gram(None, d[None]))
    with openblas_threads(1):
        T(f"Gram {m}x{n}: scipy dsyrk, OpenBLAS 1 thread (half the flops)", syrk)
    T(f"Gram {m}x{n}: float32 GEMM (reference; not exact)", lambda: f32.T @ f32)
    torch.set_num_threads(1)
    T(f"Gram {m}x{n}: torch GEMM, 1 thread", lambda: d.T @ d)
    T(f"eigh n={n}: torch.linalg.eigh, 1 thread", lambda: torch.linalg.eigh(g))
    torch.set_num_threads(2)
    T(f"eigh n={n}: torch.linalg.eigh (MKL syevd, 2 threads)", lambda: torch.linalg.eigh(g))
    T(f"eigh n={n}: torch.linalg.eigvalsh (values only)", lambda: torch.linalg.eigvalsh(g))
    with openblas_threads(1):
        T(f"eigh n={n}: scipy eigh driver=evd (OpenBLAS 1 thread)", lambda: sl.eigh(gn, driver="evd"))
        T(f"eigh n={n}: scipy eigh driver=evr, all vectors", lambda: sl.eigh(gn, driver="evr"))
        T(f"eigh n={n}: scipy eigh driver=evr, subset of {w} vectors",
          lambda: sl.eigh(gn, driver="evr", subset_by_index=[0, w - 1]))  # fmt: skip
        lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
        T(f"eigh n={n}: dsytrd only (tridiagonalisation, 1 thread)", lambda: lapack.dsytrd(gn, lower=1, lwork=lwork))
        _, diag, off, _, _ = lapack.dsytrd(gn, lower=1, lwork=lwork)
        T(f"eigh n={n}: dstevd on the tridiagonal (all values + vectors)", lambda: lapack.dstevd(diag, off, compute_v=1))
        T(f"eigh n={n}: dsterf on the tridiagonal (values only)", lambda: lapack.dsterf(diag, off))
    T(f"Gram {emb_b.shape[0]}x{emb_b.shape[1]} (embedding): the kernel's delta_gram (row chunks)",
      lambda: delta_gram(emb_b[None], emb_i[None]), 2)  # fmt: skip
    # Last, because OpenBLAS threads keep spinning after a threaded call:
    with openblas_threads(2):
        T(f"Gram {m}x{n}: scipy dsyrk, OpenBLAS 2 threads", syrk)
        lapack.dsytrd(gn, lower=1, lwork=lwork)
        T(f"eigh n={n}: dsytrd, OpenBLAS 2 threads", lambda: lapack.dsytrd(gn, lower=1, lwork=lwork))

        def after():
            blas.dsyrk(1.0, d.numpy()[:512].T, trans=0, lower=0)
            torch.linalg.eigh(g)

        T(f"eigh n={n}: torch.linalg.eigh right after a 2-thread OpenBLAS call (spin contention)", after)
    print(json.dumps(ROWS))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
