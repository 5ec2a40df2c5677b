"""The floor of the kernel's route per tensor, run by scripts/benchmark.py in a process of its own.

    python scripts/bench_floor.py BASE_DIR INSTRUCT_DIR LAMBDA NAME:REPEATS ...

Per tensor, inputs copied into memory first (no page faults timed), best of REPEATS:
`kernel` = kernel.refine_stack as the merge calls it; `gram` = the float64 delta and
its Gram (kernel.delta_gram); `eigh` = torch.linalg.eigh of the Gram; `rebuild` = the
two GEMMs D V_w V_w^T of the smaller of head and tail (width w). Prints progress on
stderr and, last on stdout, a JSON list of one dict per tensor.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from mergekit_timber.method import kernel, layout
from mergekit_timber.checkpoint import Checkpoint


def best(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def floor_row(name: str, b: torch.Tensor, i: torch.Tensor, lam: float, reps: int, arch: layout.Architecture) -> dict:
    split = layout.split(name, i.shape, arch)  # the matrices a merge decomposes
    sb, si = split.matrices(b), split.matrices(i)
    tb, ti = kernel.as_tall(sb), kernel.as_tall(si)
    t_kernel, _ = best(lambda: kernel.refine_stack(sb, si, lam), reps)
    t_gram, (gram, cached) = best(lambda: kernel.delta_gram(tb, ti), reps)
    t_eigh, (evals, vecs) = best(lambda: torch.linalg.eigh(gram), reps)
    k = int(kernel.head_size(kernel.singular_from_eigenvalues(evals.flip(-1)))[0])
    n = gram.shape[-1]
    vecs = vecs.flip(-1)
    cols = vecs[..., k:] if n - k <= k else vecs[..., :k]
    cols_t = cols.transpose(-1, -2)

    def rebuild():
        for rows in kernel.row_chunks(tb.shape):
            d = cached if cached is not None else kernel.delta64(tb, ti, rows)
            (d @ cols) @ cols_t

    t_rebuild, _ = best(rebuild, reps)
    return dict(name=name, shape=list(b.shape), k=k, width=cols.shape[-1], kernel=t_kernel,
                gram=t_gram, eigh=t_eigh, rebuild=t_rebuild)  # fmt: skip


def main(argv) -> None:
    base_dir, inst_dir, lam = Path(argv[0]), Path(argv[1]), float(argv[2])
    rows = []
    with Checkpoint(base_dir, "base") as base, Checkpoint(inst_dir, "instruct") as inst:
        arch = layout.architecture_of(inst.config())
        for item in argv[3:]:
            name, reps = item.rsplit(":", 1)
            # .clone(): in memory, so that no page faults are timed
            rows.append(floor_row(name, base.tensor(name).clone(), inst.tensor(name).clone(), lam, int(reps), arch))
            print(name, rows[-1], file=sys.stderr, flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
