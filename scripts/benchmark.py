#!/usr/bin/env python
"""Timber speed and memory benchmark (issue 3): one command, tables on stdout.

    python scripts/benchmark.py [--layers 28] [--small-layers 4] [--skip-naive]
        [--workdir DIR] [--kernel-only | --e2e-only] [--device cpu|cuda]
        [--llama none|layers|full] [--no-preview] [--no-profile] [--no-micro]

Sections (all on the same synthetic Qwen3-0.6B-shaped pair, built and cached in
WORKDIR/pairs by mergekit_timber.testing.synthetic):

1. Kernel routes: every candidate way of computing Timber on one matrix, timed and
   compared with the float64-SVD oracle (deviation = ||out - oracle||_F /
   ||oracle - W_I||_F, K vs the oracle's K) on the pair's Qwen3-0.6B tensors, on
   Llama-3.1-8B shapes (same synthetic delta recipe), and on a 1/i and an 8-decade
   spectrum. Exact means deviation <= 1e-6 and the same K, on every case.
2. Micro-benchmarks of the pieces (Gram variants, eigen-solver variants, threads),
   in a separate process.
3. End to end: `mergekit-yaml` with `merge_method: timber` (lambda 0.2) at --layers
   and at --small-layers, against scripts/naive_timber.py (the authors' approach),
   each job in its own process under /usr/bin/time -v (wall time, peak RSS) with the
   process tree's RSS also polled (anonymous vs file-backed). Prints the ratios and
   the issue's targets beside them; it never asserts them. Checks that the timber and
   naive outputs agree (fraction of differing bf16 elements). A passthrough merge of
   the same pair measures what mergekit itself costs (imports, reading, writing).
4. The floor: per tensor of layer 0 and the embedding, the kernel's time beside the
   float64 work exactness needs on this route (delta + Gram, eigh, rebuild GEMMs);
   with mergekit's own cost, the best wall time this route can reach here and the
   largest speed-up over the naive baseline it allows.
5. Optionally a profile of a --small-layers merge (where the time goes).

Timings are wall-clock on whatever else the machine is running: the load average and
CPU pressure before and after are printed with the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from naive_timber import erank_k  # the baseline's K = ceil(eRank), shared (scripts/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
NAIVE = REPO / "scripts" / "naive_timber.py"
LAMBDA = 0.2
EXACT = 1e-6  # the bar: deviation <= 1e-6 of the edit's norm

LLAMA_3_1_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# =========================================================================== machine


def machine_info(device: str) -> List[str]:
    lines = []
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import scipy

        sp = scipy.__version__
    except Exception:
        sp = "not installed"
    try:
        from importlib.metadata import version

        mk = version("mergekit")
    except Exception:
        mk = "?"
    blas = "MKL" if torch.backends.mkl.is_available() else "other"
    lines.append(f"- CPU: {model or platform.processor()} ({cores} cores usable), RAM {mem}")
    lines.append(
        f"- Python {platform.python_version()}, torch {torch.__version__} ({blas}, "
        f"{torch.get_num_threads()} threads), scipy {sp}, mergekit {mk}"
    )
    if device == "cuda" and torch.cuda.is_available():
        lines.append(f"- device: cuda ({torch.cuda.get_device_name(0)})")
    else:
        lines.append(f"- device: {device}" + ("" if torch.cuda.is_available() else " (no CUDA device present)"))
    lines.append(f"- load at start: {load_string()}")
    return lines


def load_string() -> str:
    s = "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        s += f"; CPU pressure ({some.split()[0]}) " + " ".join(some.split()[1:3])
    except (OSError, IndexError):
        pass
    return s


# =========================================================================== pairs


def ensure_pair(workdir: Path, layers: int) -> Tuple[Path, Path]:
    from mergekit_timber.testing.synthetic import QWEN3_0_6B_SHAPE, write_pair

    kwargs = dict(QWEN3_0_6B_SHAPE, layers=layers)
    out = workdir / "pairs" / f"qwen3-0.6b-L{layers}"
    marker = out / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == kwargs:
        return out / "base", out / "instruct"
    log(f"[pairs] writing the Qwen3-0.6B-shaped pair with {layers} layers to {out} ...")
    t0 = time.perf_counter()
    base, inst = write_pair(out, **kwargs)
    marker.write_text(json.dumps(kwargs))
    log(f"[pairs] done in {time.perf_counter() - t0:.1f}s")
    return Path(base), Path(inst)


def open_pair_tensor(model_dir: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(model_dir / fname), "pt") as f:
        return f.get_tensor(name)


# =========================================================================== kernel routes


def _tall(t):
    return t.T if t.shape[0] < t.shape[1] else t


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
    from mergekit_timber.kernel import refine_stack

    r = refine_stack(b[None], i[None], lam, out_dtype=torch.float64)
    return r.tensor[0], int(r.k[0])


def route_fast(b, i, lam):
    from fast_route import refine_stack_fast

    r = refine_stack_fast(b[None], i[None], lam, out_dtype=torch.float64)
    return r.tensor[0], int(r.k[0])


def route_svd32(b, i, lam):
    d = (i.double() - b.double()).float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = erank_k(s)
    s2 = s.clone()
    s2[k:] *= lam
    return b.double() + ((u * s2) @ vh).double(), k


def route_gram32(b, i, lam):
    bt, it = _tall(b), _tall(i)
    d = (it.double() - bt.double()).float()
    ev, vec = torch.linalg.eigh(d.T @ d)
    s = ev.flip(-1).clamp_min(0).sqrt()
    k = erank_k(s)
    out = _project(bt.double(), it.double(), d, vec.flip(-1), k, lam, torch.float32)
    return (out.T if b.shape[0] < b.shape[1] else out), k


def route_qr_svd(b, i, lam):
    bt, it = _tall(b), _tall(i)
    d = it.double() - bt.double()
    _, r = torch.linalg.qr(d, mode="r")
    _, s, vh = torch.linalg.svd(r)
    k = erank_k(s)
    out = _project(bt.double(), it.double(), d, vh.T, k, lam)
    return (out.T if b.shape[0] < b.shape[1] else out), k


def route_evr_subset(b, i, lam):
    """gram64 + eigvalsh (K) + scipy eigh(subset_by_index, driver='evr') for the needed side."""
    import scipy.linalg as sl

    from fast_route import openblas_threads

    bt, it = _tall(b), _tall(i)
    d = it.double() - bt.double()
    g = d.T @ d
    n = g.shape[0]
    ev = torch.linalg.eigvalsh(g)
    floor = ev[-1].clamp_min(0) * n * torch.finfo(torch.float64).eps
    s = torch.where(ev > floor, ev, torch.zeros_like(ev)).flip(-1).sqrt()
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
    out = _project(bt.double(), it.double(), d, v_desc, k, lam)
    return (out.T if b.shape[0] < b.shape[1] else out), k


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
    bt, it = _tall(b), _tall(i)
    d = it.double() - bt.double()
    g = d.T @ d
    _, vec32 = torch.linalg.eigh(g.float())
    ev, vec = refine_eigenvectors(g, vec32.double(), steps)
    order = torch.argsort(ev, descending=True)
    ev, vec = ev[order], vec[:, order]
    n = g.shape[0]
    floor = ev[0].clamp_min(0) * n * torch.finfo(torch.float64).eps
    s = torch.where(ev > floor, ev, torch.zeros_like(ev)).sqrt()
    k = erank_k(s)
    out = _project(bt.double(), it.double(), d, vec, k, lam)
    return (out.T if b.shape[0] < b.shape[1] else out), k


ROUTES: Dict[str, Tuple[str, Callable]] = {
    "svd64": ("float64 full SVD (oracle; the authors' decomposition)", route_svd64),
    "kernel": ("current kernel: float64 Gram (GEMM) + torch.linalg.eigh", route_kernel),
    "fast": ("fast_route.refine_stack_fast: float64 Gram + dsytrd/dstevd + partial back-transform", route_fast),
    "evr": ("float64 Gram + eigvalsh for K + scipy eigh(subset, driver=evr)", route_evr_subset),
    "qr+svd": ("float64 QR of D, then SVD of R", route_qr_svd),
    "mixed": ("float64 Gram + float32 eigh + 2 float64 Ogita-Aishima refinement steps", route_mixed),
    "svd32": ("float32 full SVD", route_svd32),
    "gram32": ("float32 Gram + float32 eigh (+ float32 projection)", route_gram32),
}
# Off CPU, `evr` (SciPy) is skipped and `fast` takes its torch fallback (Gram + eigh).


def decay_pair(m: int, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """bf16 (base, instruct) with the same 'decay' delta recipe as mergekit_timber.testing.synthetic:
    a rank-min(m,n,128) part with singular values ~1/sqrt(i), a full-rank Gaussian tail of
    0.25 of its norm, scaled to 0.02 of ||W_base||_F."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g).mul_(0.02)
    r = min(m, n, 128)
    sv = torch.arange(1, r + 1, dtype=torch.float32).pow(-0.5)
    us = torch.randn(m, r, generator=g).mul_(sv / math.sqrt(m * n))
    v = torch.randn(n, r, generator=g)
    noise = 0.25 * float(sv.square().sum().sqrt()) / math.sqrt(m * n)
    delta = torch.randn(m, n, generator=g).mul_(noise).addmm_(us, v.T)
    delta.mul_(0.02 * float(base.norm()) / float(delta.norm()))
    return base.to(torch.bfloat16), (base + delta).to(torch.bfloat16)


def spectrum_pair(m: int, n: int, s: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 (base, instruct) whose delta has exactly the singular values s (kept in
    float64 so that rounding does not change the spectrum)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g))
    d = (u * s.double()) @ v.T
    base = 0.02 * torch.randn(m, n, dtype=torch.float64, generator=g)
    d *= 0.02 * float(base.norm()) / float(d.norm())
    return base, base + d


def kernel_cases(args, small_pair) -> List[dict]:
    """(label, tensor names, loader) for every case of the kernel table."""
    cases = []
    if small_pair is not None:
        base_dir, inst_dir = small_pair
        qwen = [
            ("q_proj", "model.layers.0.self_attn.q_proj.weight"),
            ("k_proj", "model.layers.0.self_attn.k_proj.weight"),
            ("v_proj", "model.layers.0.self_attn.v_proj.weight"),
            ("o_proj", "model.layers.0.self_attn.o_proj.weight"),
            ("gate_proj", "model.layers.0.mlp.gate_proj.weight"),
            ("up_proj", "model.layers.0.mlp.up_proj.weight"),
            ("down_proj", "model.layers.0.mlp.down_proj.weight"),
            ("embed_tokens (tied)", "model.embed_tokens.weight"),
        ]
        for label, name in qwen:
            cases.append(
                dict(
                    model="Qwen3-0.6B",
                    label=label,
                    spectrum="pair (decay)",
                    load=lambda name=name: (open_pair_tensor(base_dir, name), open_pair_tensor(inst_dir, name)),
                    big="embed" in name,
                )
            )
    n_rank = 1024
    i = torch.arange(1, n_rank + 1, dtype=torch.float64)
    cases.append(dict(model="-", label="3072x1024", spectrum="1/i",
                      load=lambda: spectrum_pair(3072, 1024, 1 / i, 11), big=False))  # fmt: skip
    cases.append(dict(model="-", label="3072x1024", spectrum="8 decades",
                      load=lambda: spectrum_pair(3072, 1024, torch.logspace(0, -8, n_rank, dtype=torch.float64), 12),
                      big=False))  # fmt: skip
    if args.llama != "none":
        L = LLAMA_3_1_8B
        H, I, q, kv, V = L["hidden"], L["intermediate"], L["heads"] * L["head_dim"], L["kv_heads"] * L["head_dim"], L["vocab"]
        llama = [
            ("k_proj = v_proj", (kv, H), 21),
            ("q_proj = o_proj", (q, H), 22),
            ("gate_proj = up_proj", (I, H), 23),
            ("down_proj", (H, I), 24),
        ]
        if args.llama == "full":
            llama.append(("embed_tokens = lm_head", (V, H), 25))
        else:
            llama = [x for x in llama if x[0] != "down_proj"]  # same cost as gate, transposed
        for label, (m, n), seed in llama:
            cases.append(dict(model="Llama-3.1-8B", label=label, spectrum="decay (synthetic recipe)",
                              load=lambda m=m, n=n, seed=seed: decay_pair(m, n, seed),
                              big=m * n > 8_000_000, huge=m * n > 100_000_000))  # fmt: skip
    return cases


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_kernel_table(args, small_pair) -> List[str]:
    device = args.device
    routes = [r for r in args.routes.split(",") if r]
    for r in routes:
        if r not in ROUTES:
            raise SystemExit(f"unknown route {r!r}; choose from {', '.join(ROUTES)}")
    if device != "cpu":
        routes = [r for r in routes if r != "evr"]
    # warm-up (first calls of LAPACK/MKL paths carry one-off costs)
    wb, wi = decay_pair(256, 128, 0)
    for r in routes:
        ROUTES[r][1](wb.to(device), wi.to(device), LAMBDA)
    rows = []
    summary: Dict[str, dict] = {r: dict(time=0.0, oracle_time=0.0, worst=0.0, kbad=0, n=0) for r in routes}
    for case in kernel_cases(args, small_pair):
        b, i = case["load"]()
        b, i = b.to(device), i.to(device)
        shape = "x".join(str(x) for x in b.shape)
        huge = case.get("huge", False)
        reps = 1 if case["big"] else args.repeats
        log(f"[kernel] {case['model']} {case['label']} {shape} ({case['spectrum']}) ...")
        results = {}
        oracle = None
        for r in routes:
            if huge and r not in ("kernel", "fast"):
                continue  # a 128256x4096 float64 SVD takes tens of minutes here and ~20 GB
            times = []
            out = k = None
            for _ in range(reps):
                del out
                _sync(device)
                t0 = time.perf_counter()
                out, k = ROUTES[r][1](b, i, LAMBDA)
                _sync(device)
                times.append(time.perf_counter() - t0)
            results[r] = dict(time=min(times), k=k)
            if r == "svd64":
                oracle = out
            elif oracle is not None:
                edit = float((oracle - i.double()).norm())
                results[r]["dev"] = float((out - oracle).norm()) / max(edit, 1e-300)
            elif huge and r == "fast" and "kernel_out" in results:
                edit = float((results["kernel_out"] - i.double()).norm())
                results[r]["dev_vs_kernel"] = float((out - results["kernel_out"]).norm()) / max(edit, 1e-300)
            if huge and r == "kernel":
                results["kernel_out"] = out
            else:
                del out
            out = None
            log(f"    {r:8s} {min(times):8.3f}s" + (f"  dev {results[r].get('dev', 0):.1e}" if "dev" in results[r] else ""))
        results.pop("kernel_out", None)
        del oracle
        k_or = results.get("svd64", {}).get("k")
        t_or = results.get("svd64", {}).get("time")
        for r in routes:
            if r not in results:
                rows.append(f"| {case['model']} | {case['label']} | {shape} | {case['spectrum']} | {r} | skipped | | | |")
                continue
            res = results[r]
            dev = res.get("dev")
            if r == "svd64":
                dev_s = "0 (oracle)"
            elif dev is not None:
                dev_s = f"{dev:.1e}"
            elif "dev_vs_kernel" in res:
                dev_s = f"{res['dev_vs_kernel']:.1e} vs kernel (no oracle)"
            else:
                dev_s = "n/a"
            kk = f"{res['k']}" + ("" if k_or is None else f" ({'=' if res['k'] == k_or else '!= '}{k_or})")
            speed = f"{t_or / res['time']:.2f}x" if t_or else ""
            rows.append(
                f"| {case['model']} | {case['label']} | {shape} | {case['spectrum']} | {r} | "
                f"{res['time']:.3f} | {speed} | {dev_s} | {kk} |"
            )
            sm = summary[r]
            if dev is not None or r == "svd64":
                sm["worst"] = max(sm["worst"], dev or 0.0)
                sm["kbad"] += int(k_or is not None and res["k"] != k_or)
                sm["n"] += 1
                if case["model"] == "Qwen3-0.6B":
                    sm["time"] += res["time"]
                    sm["oracle_time"] += t_or or 0
        del b, i
    out = [
        "## Kernel routes vs the float64-SVD oracle (lambda = 0.2)",
        "",
        f"time = best of {args.repeats} (1 for the embedding and Llama shapes), seconds, whole route "
        "(delta from bf16, decomposition, rebuild of the full float64 output); "
        "speed-up = oracle time / route time; deviation = ||out - oracle||_F / ||oracle - W_I||_F; "
        f"K (= or != the oracle's). Device: {device}.",
        "",
        "| model | tensor | shape | spectrum | route | time s | vs svd64 | deviation | K |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Routes: " + "; ".join(f"`{r}` = {ROUTES[r][0]}" for r in routes),
        "",
        "### Route summary",
        "",
        "| route | sum of times on the Qwen3-0.6B tensors s | speed-up vs svd64 there | worst deviation | K mismatches | exact (<= 1e-6, same K) on every case? |",
        "|---|---|---|---|---|---|",
    ]
    for r in routes:
        sm = summary[r]
        sp = f"{sm['oracle_time'] / sm['time']:.2f}x" if sm["time"] else ""
        exact = "yes (oracle)" if r == "svd64" else ("yes" if sm["worst"] <= EXACT and sm["kbad"] == 0 else "NO")
        out.append(f"| {r} | {sm['time']:.2f} | {sp} | {sm['worst']:.1e} | {sm['kbad']}/{sm['n']} | {exact} |")
    return out


# =========================================================================== micro


MICRO_CODE = r"""
import json, statistics, sys, time, torch
import numpy as np
sys.path.insert(0, {repo!r} + '/scripts')
import fast_route as routes
from scipy.linalg import blas, lapack
import scipy.linalg as sl
base, inst, emb_b, emb_i = torch.load({pt!r})
d = inst.double() - base.double()
m, n = d.shape
reps = {reps}
rows = []
def T(label, fn, r=reps):
    ts = []
    for _ in range(r):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    rows.append((label, min(ts), statistics.median(ts)))
    print(label, min(ts), file=sys.stderr, flush=True)
def gram_blocks():
    h = n // 2; a1, a2 = d[:, :h], d[:, h:]
    g = torch.empty(n, n, dtype=torch.float64)
    g[:h, :h] = a1.T @ a1; g[:h, h:] = a1.T @ a2; g[h:, h:] = a2.T @ a2; g[h:, :h] = g[:h, h:].T
    return g
def syrk():
    return blas.dsyrk(1.0, d.numpy().T, trans=0, lower=0)
f32 = d.float()
g = d.T @ d
gn = g.numpy()
ev = torch.linalg.eigvalsh(g)
w = n // 2
T(f"Gram {{m}}x{{n}}: torch d.T @ d (float64 GEMM, 2 threads)", lambda: d.T @ d)
T(f"Gram {{m}}x{{n}}: torch d.T.contiguous() @ d", lambda: d.T.contiguous() @ d)
T(f"Gram {{m}}x{{n}}: torch 2-block symmetric (3/4 of the flops)", gram_blocks)
from mergekit_timber import kernel as K
def gram_panels():
    g = torch.zeros(1, n, n, dtype=torch.float64); K._add_gram(g, d[None]); K._fill_gram(g); return g
T(f"Gram {{m}}x{{n}}: the kernel's row panels ((p+1)/2p of the flops, p={{len(K._panel_bounds(n)) - 1}})", gram_panels)
with routes.openblas_threads(1):
    T(f"Gram {{m}}x{{n}}: scipy dsyrk, OpenBLAS 1 thread (half the flops)", syrk)
T(f"Gram {{m}}x{{n}}: float32 GEMM (reference; not exact)", lambda: f32.T @ f32)
torch.set_num_threads(1)
T(f"Gram {{m}}x{{n}}: torch GEMM, 1 thread", lambda: d.T @ d)
T(f"eigh n={{n}}: torch.linalg.eigh, 1 thread", lambda: torch.linalg.eigh(g))
torch.set_num_threads(2)
T(f"eigh n={{n}}: torch.linalg.eigh (MKL syevd, 2 threads)", lambda: torch.linalg.eigh(g))
T(f"eigh n={{n}}: torch.linalg.eigvalsh (values only)", lambda: torch.linalg.eigvalsh(g))
with routes.openblas_threads(1):
    T(f"eigh n={{n}}: scipy eigh driver=evd (OpenBLAS 1 thread)", lambda: sl.eigh(gn, driver="evd"))
    T(f"eigh n={{n}}: scipy eigh driver=evr, all vectors", lambda: sl.eigh(gn, driver="evr"))
    T(f"eigh n={{n}}: scipy eigh driver=evr, subset of {{w}} vectors", lambda: sl.eigh(gn, driver="evr", subset_by_index=[0, w - 1]))
    lw = int(lapack.dsytrd_lwork(n, lower=1)[0])
    T(f"eigh n={{n}}: dsytrd only (tridiagonalisation, 1 thread)", lambda: lapack.dsytrd(gn, lower=1, lwork=lw))
    c, dd, e, tau, _ = lapack.dsytrd(gn, lower=1, lwork=lw)
    T(f"eigh n={{n}}: dstevd on the tridiagonal (all values + vectors)", lambda: lapack.dstevd(dd, e, compute_v=1))
    T(f"eigh n={{n}}: dsterf on the tridiagonal (values only)", lambda: lapack.dsterf(dd, e))
    eig = routes._Tridiagonal(g.clone())
    T(f"eigh n={{n}}: back-transform {{w}} vectors (torch.ormqr)", lambda: eig.vectors(torch.arange(w)))
T(f"eigh n={{n}}: fast route total (dsytrd + dstevd + {{w}}-vector back-transform)", lambda: routes._Tridiagonal(g.clone()).vectors(torch.arange(w)))
ed = None
def emb_gram(use_scipy):
    return routes.gram64(emb_b, emb_i, use_scipy=use_scipy)
T(f"Gram {{emb_b.shape[0]}}x{{emb_b.shape[1]}} (embedding, the kernel's row chunks): torch GEMM", lambda: emb_gram(False), 2)
T(f"Gram {{emb_b.shape[0]}}x{{emb_b.shape[1]}} (embedding, the kernel's row chunks): dsyrk 1 thread", lambda: emb_gram(True), 2)
# Last, because OpenBLAS threads keep spinning after a threaded call:
with routes.openblas_threads(2):
    T(f"Gram {{m}}x{{n}}: scipy dsyrk, OpenBLAS 2 threads", syrk)
    lapack.dsytrd(gn, lower=1, lwork=lw)
    T(f"eigh n={{n}}: dsytrd, OpenBLAS 2 threads", lambda: lapack.dsytrd(gn, lower=1, lwork=lw))
    def after():
        blas.dsyrk(1.0, d.numpy()[:512].T, trans=0, lower=0)
        torch.linalg.eigh(g)
    T(f"eigh n={{n}}: torch.linalg.eigh right after a 2-thread OpenBLAS call (spin contention)", after)
print(json.dumps(rows))
"""


def run_micro(args, small_pair) -> List[str]:
    if small_pair is None:
        return []
    pt = Path(args.workdir) / "micro_inputs.pt"
    base_dir, inst_dir = small_pair
    name = "model.layers.0.mlp.gate_proj.weight"
    torch.save(
        [
            open_pair_tensor(base_dir, name),
            open_pair_tensor(inst_dir, name),
            open_pair_tensor(base_dir, "model.embed_tokens.weight"),
            open_pair_tensor(inst_dir, "model.embed_tokens.weight"),
        ],
        pt,
    )
    code = MICRO_CODE.format(repo=str(REPO), pt=str(pt), reps=args.repeats + 2)
    log("[micro] Gram / eigen pieces in a separate process ...")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    pt.unlink(missing_ok=True)
    if proc.returncode != 0:
        return ["## Micro-benchmarks", "", "failed:", "```", proc.stderr[-3000:], "```"]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    out = [
        "## Micro-benchmarks: the pieces (Qwen3-0.6B gate_proj delta 3072x1024, float64)",
        "",
        f"best / median of {args.repeats + 2} (embedding Gram: of 2), seconds; run in a separate process, "
        "2-thread OpenBLAS rows last (its threads spin after each call and slow whatever runs next).",
        "",
        "| operation | best s | median s |",
        "|---|---|---|",
    ]
    out += [f"| {label} | {best:.3f} | {med:.3f} |" for label, best, med in rows]
    return out


# =========================================================================== floor


FLOOR_CODE = r"""
import json, sys, time, torch
from pathlib import Path
sys.path.insert(0, {scripts!r})
from benchmark import open_pair_tensor
from mergekit_timber import kernel
from mergekit_timber.method import as_matrix_stack
base_dir, inst_dir, names = Path({base!r}), Path({inst!r}), {names!r}
def get(model_dir, name):
    return open_pair_tensor(model_dir, name).clone()  # in memory: no page faults timed
def best(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return min(times), out
rows = []
for name, reps in names:
    b, i = get(base_dir, name), get(inst_dir, name)
    sb, si = as_matrix_stack(name, b), as_matrix_stack(name, i)
    tb, ti = kernel._as_tall(sb), kernel._as_tall(si)
    t_kernel, _ = best(lambda: kernel.refine_stack(sb, si, {lam}), reps)
    t_gram, (gram, cached) = best(lambda: kernel._gram(tb, ti), reps)
    t_eigh, (evals, vecs) = best(lambda: torch.linalg.eigh(gram), reps)
    k = int(kernel.head_size(kernel._singular_from_eigenvalues(evals.flip(-1)))[0])
    n = gram.shape[-1]
    vecs = vecs.flip(-1)
    cols = vecs[..., k:] if n - k <= k else vecs[..., :k]
    cols_t = cols.transpose(-1, -2)
    def rebuild():
        for rows_ in kernel._row_chunks(tb.shape):
            d = cached if cached is not None else kernel._delta64(tb, ti, rows_)
            (d @ cols) @ cols_t
    t_rebuild, _ = best(rebuild, reps)
    rows.append(dict(name=name, shape=list(b.shape), k=k, width=cols.shape[-1], kernel=t_kernel,
                     gram=t_gram, eigh=t_eigh, rebuild=t_rebuild))
    print(name, rows[-1], file=sys.stderr, flush=True)
print(json.dumps(rows))
"""

LAYER_MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def measure_floor(args, pair: Tuple[Path, Path]) -> Optional[List[dict]]:
    """Per-tensor kernel time and its irreducible parts, for layer 0 and the embedding.

    In a separate process, inputs copied into memory first (no page faults timed):
    `kernel` = kernel.refine_stack as the merge calls it; `gram` = the float64 delta and
    its Gram (panel GEMMs); `eigh` = torch.linalg.eigh of the Gram; `rebuild` = the two
    GEMMs D V_w V_w^T of the smaller of head and tail (width w). gram + eigh + rebuild
    is the floor of this route: what remains of the kernel is adds, casts and copies.
    """
    names = [(f"model.layers.0.{m}.weight", args.repeats) for m in LAYER_MATRICES]
    names.append(("model.embed_tokens.weight", 1))
    code = FLOOR_CODE.format(scripts=str(REPO / "scripts"), base=str(pair[0]), inst=str(pair[1]), names=names, lam=LAMBDA)
    log("[floor] kernel pieces per tensor (layer 0 and the embedding) in a separate process ...")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def floor_lines(floor: List[dict], layers: int, res: Dict[str, dict], naive_layers: Optional[int]) -> List[str]:
    """The floor table and what it implies for the issue's speed targets."""
    def total(field: str, n_layers: int) -> float:
        return sum(r[field] * (1 if ".layers." not in r["name"] else n_layers) for r in floor)

    lines = [
        "### How low can an exact merge go here? (the floor of the route, measured in this run)",
        "",
        "Per tensor, best of the repeats, inputs already in memory: `kernel` = kernel.refine_stack as the merge "
        "calls it; `Gram` = float64 delta and D^T D (panel GEMMs); `eigh` = torch.linalg.eigh (MKL syevd) of the "
        "Gram; `rebuild` = the two float64 GEMMs D V_w V_w^T (w = the smaller of head and tail). "
        "Gram + eigh + rebuild is the floor: the float64 work exactness needs on this route (the kernel table "
        "above shows every other exact route slower).",
        "",
        "| tensor | shape | K | w | kernel s | Gram s | eigh s | rebuild s | floor s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in floor:
        fl = r["gram"] + r["eigh"] + r["rebuild"]
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['k']} | {r['width']} | {r['kernel']:.3f} | "
            f"{r['gram']:.3f} | {r['eigh']:.3f} | {r['rebuild']:.3f} | {fl:.3f} |"
        )
    out_rows = []
    for L in sorted({layers} | ({naive_layers} if naive_layers else set())):
        kern = total("kernel", L)
        fl = total("gram", L) + total("eigh", L) + total("rebuild", L)
        alone = (res.get(f"passthrough L{L}") or {}).get("wall")
        timber = (res.get(f"timber L{L}") or {}).get("wall")
        naive = (res.get(f"naive L{L}") or {}).get("wall")
        best = None if alone is None else alone + fl
        cells = [
            f"{L}", f"{total('eigh', L):.1f}", f"{total('gram', L) + total('rebuild', L):.1f}", f"{fl:.1f}",
            f"{kern:.1f}", "n/a" if alone is None else f"{alone:.1f}", "n/a" if best is None else f"{best:.1f}",
            "n/a" if timber is None else f"{timber:.1f}",
            "n/a" if naive is None or best is None else f"{naive / best:.2f}x",
        ]  # fmt: skip
        out_rows.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Whole model (layer 0 times the layers, plus the embedding): `mergekit alone` = the wall time of "
        "`mergekit-yaml` on a passthrough of the instruct model (imports, reading, writing; no decomposition), "
        "measured above; `best possible` = mergekit alone + the floor; `naive / best possible` is the largest "
        "speed-up over the naive baseline this route can show on this machine.",
        "",
        "| layers | eigh s | Gram + rebuild GEMMs s | floor s | kernel s | mergekit alone s | best possible s | "
        "timber measured s | naive / best possible |",
        "|---|---|---|---|---|---|---|---|---|",
        *out_rows,
    ]
    return lines


# =========================================================================== end to end


def _children(pid: int) -> List[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                kids += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def _tree(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _rss(pid: int) -> Tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) in kB, 0 if gone."""
    vals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in vals:
                vals[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return vals["VmRSS"], vals["RssAnon"], vals["RssFile"]


def warm_page_cache(workdir: Path) -> None:
    """Read every input checkpoint once, so no job pays (or skips) the cold disk reads:
    measured here, whichever job ran first was up to 2x slower than the same job later."""
    for file in sorted((workdir / "pairs").rglob("*.safetensors")):
        with open(file, "rb") as fh:
            while fh.read(64 << 20):
                pass


def measure(cmd: List[str], label: str, workdir: Path, env: Optional[dict] = None) -> dict:
    """Run cmd in its own process tree; wall time, peak RSS (time -v / getrusage) and
    polled peaks of the tree's total, anonymous and file-backed RSS."""
    warm_page_cache(workdir)
    logf = workdir / "logs" / (label.replace(" ", "_").replace("/", "_") + ".log")
    logf.parent.mkdir(parents=True, exist_ok=True)
    stats = workdir / "logs" / (logf.stem + ".rusage")
    if shutil.which("time") or Path("/usr/bin/time").exists():
        timer = "/usr/bin/time" if Path("/usr/bin/time").exists() else shutil.which("time")
        full = [timer, "-v", "-o", str(stats)] + cmd
        how = "/usr/bin/time -v"
    else:
        full = [sys.executable, str(Path(__file__).resolve()), "--_rusage", str(stats), "--"] + cmd
        how = "getrusage(RUSAGE_CHILDREN) in a wrapper"
    log(f"[e2e] {label}: {' '.join(cmd)}")
    peaks = {"rss": 0, "anon": 0, "file": 0}
    done = threading.Event()
    with open(logf, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=env)

        def poll():
            while not done.is_set():
                tot = [0, 0, 0]
                for p in _tree(proc.pid):
                    if p == proc.pid:
                        continue  # the timer / wrapper itself
                    for j, v in enumerate(_rss(p)):
                        tot[j] += v
                peaks["rss"] = max(peaks["rss"], tot[0])
                peaks["anon"] = max(peaks["anon"], tot[1])
                peaks["file"] = max(peaks["file"], tot[2])
                done.wait(0.05)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        th.join()
    maxrss = None
    try:
        text = stats.read_text()
        for line in text.splitlines():
            if "Maximum resident set size" in line:
                maxrss = int(line.split(":")[-1])
            if line.startswith("maxrss_kb"):
                maxrss = int(line.split()[1])
    except OSError:
        pass
    res = dict(label=label, wall=wall, maxrss_kb=maxrss, poll_rss_kb=peaks["rss"],
               anon_kb=peaks["anon"], file_kb=peaks["file"], rc=rc, log=str(logf), how=how)  # fmt: skip
    log(f"[e2e]   -> rc {rc}, {wall:.1f}s, peak RSS {((maxrss or 0) / 1024):.0f} MB "
        f"(polled anon {peaks['anon'] / 1024:.0f} MB, file {peaks['file'] / 1024:.0f} MB)")  # fmt: skip
    if rc != 0:
        log(Path(logf).read_text()[-3000:])
    return res


def rusage_wrapper(stats: str, cmd: List[str]) -> int:
    import resource

    rc = subprocess.call(cmd)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(stats).write_text(f"maxrss_kb {ru.ru_maxrss}\n")
    return rc


def write_yaml(path: Path, base: Path, inst: Path) -> Path:
    from mergekit_timber.testing.synthetic import write_timber_yaml

    return write_timber_yaml(path, base, inst, method="timber", lambda_=LAMBDA)


PREVIEW = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
    "import mergekit_timber.method as m, fast_route as r; "
    "m.refine_stack = r.refine_stack_fast; "
    "from mergekit.scripts.run_yaml import main; sys.argv = ['mergekit-yaml'] + sys.argv[1:]; main()"
)


SWEEP_LAMBDAS = "0,0.2,0.5,0.8"


def mergekit_cmd(args, cfg: Path, out: Path, preview: bool = False) -> List[str]:
    extra = ["--quiet"] + (["--out-shard-size", args.out_shard_size] if args.out_shard_size else [])
    if args.device != "cpu":
        extra += ["--device", args.device]
    if preview:
        return [sys.executable, "-c", PREVIEW, str(cfg), str(out)] + extra
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    return [exe, str(cfg), str(out)] + extra


def weight_files(model_dir: Path) -> Dict[str, Path]:
    from safetensors import safe_open

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def compare_outputs(a_dir: Path, b_dir: Path) -> dict:
    from safetensors import safe_open

    fa, fb = weight_files(a_dir), weight_files(b_dir)
    common = sorted(set(fa) & set(fb))
    total = diff = 0
    worst = (0.0, "")
    maxabs = 0.0
    for k in common:
        with safe_open(str(fa[k]), "pt") as h:
            x = h.get_tensor(k)
        with safe_open(str(fb[k]), "pt") as h:
            y = h.get_tensor(k)
        if x.shape != y.shape:
            return dict(error=f"{k}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        nd = int((x != y).sum())
        total += x.numel()
        diff += nd
        frac = nd / max(1, x.numel())
        if frac > worst[0]:
            worst = (frac, k)
        if x.is_floating_point():
            maxabs = max(maxabs, float((x.float() - y.float()).abs().max()))
    return dict(
        tensors=len(common), only_a=sorted(set(fa) - set(fb)), only_b=sorted(set(fb) - set(fa)),
        frac=diff / max(1, total), worst=worst, maxabs=maxabs, dtype=str(x.dtype) if common else "",
    )  # fmt: skip


def naive_estimate(stats_file: Path, small: int, layers: int) -> Optional[float]:
    try:
        s = json.loads(stats_file.read_text())
    except (OSError, ValueError):
        return None
    per_layer = sum(t["seconds"] for t in s["tensors"] if ".layers." in t["name"]) / max(1, small)
    fixed = s["load_s"] + s["save_s"] + sum(t["seconds"] for t in s["tensors"] if ".layers." not in t["name"])
    # loading / saving scale with the model size too: count them per layer as well
    return fixed + per_layer * layers + (s["load_s"] + s["save_s"]) * (layers / small - 1)


def run_e2e(args, workdir: Path) -> List[str]:
    N, S = args.layers, args.small_layers
    pairs = {S: ensure_pair(workdir, S)}
    if N != S:
        pairs[N] = ensure_pair(workdir, N)
    outdir = workdir / "out"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    cfgs = {L: write_yaml(workdir / f"timber-L{L}.yml", *pairs[L]) for L in pairs}
    res: Dict[str, dict] = {}
    notes: List[str] = []

    def best_of(key, cmd):
        """Run `cmd` --e2e-repeats times: the fastest run's wall time, the largest peaks."""
        # Repeats write into the same output: let mergekit-timber replace it.
        env = dict(os.environ, MERGEKIT_TIMBER_REPLACE="1")
        runs = [measure(cmd, key if r == 0 else f"{key} (repeat {r + 1})", workdir, env) for r in range(args.e2e_repeats)]
        ok = [r for r in runs if r["rc"] == 0] or runs
        best = dict(min(ok, key=lambda r: r["wall"]))
        for field in ("maxrss_kb", "poll_rss_kb", "anon_kb", "file_kb"):
            vals = [r[field] for r in ok if r[field] is not None]
            best[field] = max(vals) if vals else None
        best["walls"] = [r["wall"] for r in runs]
        return best

    def timber(L, preview=False):
        key = f"timber{'-fast' if preview else ''} L{L}"
        res[key] = best_of(key, mergekit_cmd(args, cfgs[L], outdir / key.replace(" ", "_"), preview))
        res[key]["layers"] = L

    def naive(L):
        key = f"naive L{L}"
        stats = workdir / "logs" / f"naive-L{L}.json"
        cmd = [sys.executable, str(NAIVE), str(pairs[L][0]), str(pairs[L][1]), str(outdir / key.replace(" ", "_")),
               "--lambda", str(LAMBDA), "--stats", str(stats), "--quiet"]  # fmt: skip
        res[key] = best_of(key, cmd)
        res[key]["layers"] = L
        res[key]["stats"] = stats

    def passthrough(L):
        # mergekit's own cost on this pair (imports, reading, writing): no decomposition.
        key = f"passthrough L{L}"
        cfg = workdir / f"passthrough-L{L}.yml"
        cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {pairs[L][1]}\n")
        res[key] = best_of(key, mergekit_cmd(args, cfg, outdir / key.replace(" ", "_")))
        res[key]["layers"] = L

    def sweep(L):
        # Issue 4's target: 4 lambdas from one pass cost at most 1.3x one merge.
        key = f"sweep-4 L{L}"
        exe = shutil.which("mergekit-timber") or str(Path(sys.executable).parent / "mergekit-timber")
        cmd = [exe, "sweep", str(cfgs[L]), str(outdir / key.replace(" ", "_")), "--lambdas", SWEEP_LAMBDAS,
               "--quiet"] + (["--out-shard-size", args.out_shard_size] if args.out_shard_size else [])  # fmt: skip
        res[key] = best_of(key, cmd)
        res[key]["layers"] = L

    timber(N)
    if N != S:
        timber(S)
    for L in pairs:
        passthrough(L)
    if not args.no_sweep:
        sweep(N)
    naive_layers = None
    if not args.skip_naive:
        naive(S)
        naive_layers = S
        if N != S:
            est = naive_estimate(res[f"naive L{S}"]["stats"], S, N)
            if est is not None and est <= args.naive_budget:
                log(f"[e2e] naive at {N} layers estimated at {est:.0f}s (budget {args.naive_budget:.0f}s): running it")
                naive(N)
                naive_layers = N
            else:
                notes.append(
                    f"**The naive run at {N} layers was NOT run**: estimated at "
                    f"{(est or float('nan')) / 60:.1f} min from the {S}-layer run (budget "
                    f"{args.naive_budget / 60:.0f} min, --naive-budget); the naive-vs-timber ratios below "
                    f"compare the {S}-layer runs, like with like."
                )
    if not args.no_preview:
        timber(N, preview=True)
        if N != S:
            timber(S, preview=True)

    # ---- agreement
    agree_lines = []
    pairs_to_check = []
    if naive_layers is not None:
        pairs_to_check.append((f"timber L{naive_layers}", f"naive L{naive_layers}"))
    if not args.no_preview:
        pairs_to_check.append((f"timber L{N}", f"timber-fast L{N}"))
    for a, b in pairs_to_check:
        if res.get(a, {}).get("rc") != 0 or res.get(b, {}).get("rc") != 0:
            agree_lines.append(f"| {a} vs {b} | a run failed | | | |")
            continue
        c = compare_outputs(outdir / a.replace(" ", "_"), outdir / b.replace(" ", "_"))
        if "error" in c:
            agree_lines.append(f"| {a} vs {b} | {c['error']} | | | |")
            continue
        ok = "yes" if c["frac"] <= 1e-3 else "NO"
        extra = ""
        if c["only_a"] or c["only_b"]:
            extra = f" (only in {a}: {len(c['only_a'])}, only in {b}: {len(c['only_b'])})"
        agree_lines.append(
            f"| {a} vs {b} | {c['tensors']}{extra} | {c['frac']:.2e} ({ok}, <= 1e-3) | "
            f"{c['worst'][0]:.2e} {c['worst'][1]} | {c['maxabs']:.2e} |"
        )
    if not args.keep_outputs:
        shutil.rmtree(outdir, ignore_errors=True)
    floor = None if args.no_floor else measure_floor(args, pairs[S])

    # ---- tables
    def mb(kb):
        return f"{kb / 1024:.0f}" if kb else "n/a"

    lines = [
        "## End to end: Qwen3-0.6B-shaped synthetic pair (hidden 1024, intermediate 3072, "
        "16 q / 8 kv heads of 128, vocab 151936, tied embeddings, bf16), lambda = 0.2",
        "",
        "Each job in its own process; wall = seconds from start to exit; peak RSS = "
        f"{next(iter(res.values()))['how']} maximum resident set size of the job; anon / file = "
        "polled (every 50 ms) peaks of the job's anonymous and file-backed (mmapped safetensors) RSS"
        + (f"; best wall of {args.e2e_repeats} runs (all walls listed), largest peaks" if args.e2e_repeats > 1 else "")
        + ".",
        "`timber` = `mergekit-yaml CONFIG OUT --quiet"
        + (f" --out-shard-size {args.out_shard_size}" if args.out_shard_size else "")
        + "` (otherwise mergekit's defaults); `timber-fast` = the same run with method.refine_stack replaced by "
        "routes.refine_stack_fast (a preview of the proposed kernel route, not what ships); "
        "`naive` = scripts/naive_timber.py.",
        "",
        "| job | layers | wall s | peak RSS MB | peak anon MB | peak file MB | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in res.items():
        walls = "" if len(r.get("walls", [])) < 2 else " (" + ", ".join(f"{w:.1f}" for w in r["walls"]) + ")"
        lines.append(
            f"| {key.split()[0]} | {r['layers']} | {r['wall']:.1f}{walls} | {mb(r['maxrss_kb'])} | "
            f"{mb(r['anon_kb'])} | {mb(r['file_kb'])} | {r['rc']} |"
        )
    lines += ["", *notes, "", "### Ratios (targets from the issue; printed, not asserted)", "",
              "| ratio | value | target | met |", "|---|---|---|---|"]  # fmt: skip

    def ratio_row(name, num, den, target, good):
        if num is None or den is None or not den:
            lines.append(f"| {name} | n/a | {target} | |")
            return
        v = num / den
        lines.append(f"| {name} | {v:.2f} | {target} | {'yes' if good(v) else 'no'} |")

    def g(key, field):
        r = res.get(key)
        return None if r is None or r["rc"] != 0 else r.get(field)

    for variant in ["timber"] + ([] if args.no_preview else ["timber-fast"]):
        if naive_layers is not None:
            L = naive_layers
            ratio_row(f"naive wall / {variant} wall ({L} layers)", g(f"naive L{L}", "wall"),
                      g(f"{variant} L{L}", "wall"), ">= 5", lambda v: v >= 5)  # fmt: skip
            ratio_row(f"{variant} peak RSS / naive peak RSS ({L} layers)", g(f"{variant} L{L}", "maxrss_kb"),
                      g(f"naive L{L}", "maxrss_kb"), "<= 0.25", lambda v: v <= 0.25)  # fmt: skip
            ratio_row(f"{variant} peak anon RSS / naive peak anon RSS ({L} layers)", g(f"{variant} L{L}", "anon_kb"),
                      g(f"naive L{L}", "anon_kb"), "(<= 0.25)", lambda v: v <= 0.25)  # fmt: skip
        w = g(f"{variant} L{N}", "wall")
        lines.append(f"| {variant} wall at {N} layers (s) | {w:.1f} | < 60 | {'yes' if w < 60 else 'no'} |"
                     if w is not None else f"| {variant} wall at {N} layers | n/a | < 60 | |")  # fmt: skip
        if N != S:
            ratio_row(f"{variant} peak RSS {N} / {S} layers", g(f"{variant} L{N}", "maxrss_kb"),
                      g(f"{variant} L{S}", "maxrss_kb"), "<= 1.2", lambda v: v <= 1.2)  # fmt: skip
            ratio_row(f"{variant} peak anon RSS {N} / {S} layers", g(f"{variant} L{N}", "anon_kb"),
                      g(f"{variant} L{S}", "anon_kb"), "(<= 1.2)", lambda v: v <= 1.2)  # fmt: skip
    if not args.no_sweep:
        ratio_row(f"sweep of 4 lambdas wall / one timber merge wall ({N} layers)", g(f"sweep-4 L{N}", "wall"),
                  g(f"timber L{N}", "wall"), "<= 1.3", lambda v: v <= 1.3)  # fmt: skip
    if not args.no_preview:
        ratio_row(f"timber wall / timber-fast wall ({N} layers)", g(f"timber L{N}", "wall"),
                  g(f"timber-fast L{N}", "wall"), "(speed-up of the route)", lambda v: v > 1)  # fmt: skip
    if floor:
        lines += ["", *floor_lines(floor, N, res, naive_layers)]
    if agree_lines:
        lines += ["", "### Do the outputs agree?", "",
                  "| outputs | tensors compared | fraction of differing elements | worst tensor | max abs diff |",
                  "|---|---|---|---|---|", *agree_lines]  # fmt: skip
    return lines


# =========================================================================== profile


PROFILE_CODE = r"""
import cProfile, pstats, sys, io, json
sys.argv = ['mergekit-yaml', {cfg!r}, {out!r}, '--quiet']
from mergekit.scripts.run_yaml import main
pr = cProfile.Profile()
pr.enable()
try:
    main()
except SystemExit:
    pass
pr.disable()
st = pstats.Stats(pr)
want = {{
  'run_merge (everything)': ('merge.py', 'run_merge'),
  'tensor loading (LazyTensorLoader.get_tensor)': ('lazy_tensor_loader.py', 'get_tensor'),
  'output writing (TensorWriter.finalize)': ('tensor_writer.py', 'finalize'),
  'torch.linalg.eigh (builtin)': ('~', "<built-in method torch._C._linalg.linalg_eigh>"),
}}
rows = []
def add(label, f, fn):
    tot = 0.0; calls = 0
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        if func == fn and (f == '~' or file.endswith(f)):
            tot += ct; calls += nc
    if calls:
        rows.append((label, tot, calls))
for label, (f, fn) in want.items():
    add(label, f, fn)
# every function of the plugin (names change as the kernel evolves), by cumulative time
mine = []
for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
    if '/mergekit_timber/' in file and ct > 0.01:
        mine.append((f"mergekit_timber/{{file.split('/mergekit_timber/')[-1]}}:{{func}}", ct, nc))
mine.sort(key=lambda r: -r[1])
rows += mine[:14]
print(json.dumps(rows))
"""


def run_profile(args, workdir: Path) -> List[str]:
    S = args.small_layers
    pair = ensure_pair(workdir, S)
    cfg = write_yaml(workdir / f"timber-L{S}.yml", *pair)
    out = workdir / "out-profile"
    shutil.rmtree(out, ignore_errors=True)
    log(f"[profile] cProfile of a {S}-layer timber merge ...")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROFILE_CODE.format(cfg=str(cfg), out=str(out))],
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        return ["## Where the time goes", "", "profile failed:", "```", proc.stderr[-3000:], "```"]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    total = rows[0][1] or 1.0
    lines = [
        f"## Where the time goes: cProfile of a {S}-layer timber merge (mergekit-yaml, in-process)",
        "",
        f"process wall {wall:.1f}s (incl. imports; cProfile adds a little overhead). "
        "Cumulative seconds per function (a function's time includes the functions it calls, so rows overlap); "
        "the 14 slowest mergekit_timber functions are listed.",
        "",
        "| part | cumulative s | share of run_merge | calls |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label} | {t:.2f} | {100 * t / total:.0f}% | {n} |" for label, t, n in rows]
    return lines


# =========================================================================== main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_rusage"]:
        stats, cmd = argv[1], argv[argv.index("--") + 1 :]
        return rusage_wrapper(stats, cmd)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=textwrap.dedent(__doc__.split("\n\n", 1)[1]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--layers", type=int, default=28, help="layers of the end-to-end pair (default 28)")
    ap.add_argument("--small-layers", type=int, default=4, help="layers of the small pair (default 4)")
    ap.add_argument("--skip-naive", action="store_true", help="do not run the naive baseline")
    ap.add_argument("--naive-budget", type=float, default=900.0,
                    help="run the naive baseline at --layers only if estimated under this many seconds (default 900)")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "timber_bench"),
                    help="where pairs (cached), outputs and logs go (default $TMPDIR/timber_bench)")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--kernel-only", action="store_true")
    only.add_argument("--e2e-only", action="store_true")
    ap.add_argument("--device", default="cpu", help="device for the kernel table and mergekit (cpu or cuda)")
    ap.add_argument("--routes", default=",".join(ROUTES), help=f"kernel routes (default: all of {','.join(ROUTES)})")
    ap.add_argument("--llama", choices=["none", "layers", "full"], default="layers",
                    help="Llama-3.1-8B shapes in the kernel table: none; layers (k/v, q/o, gate/up; default); "
                    "full (also down_proj and the 128256x4096 embedding, the latter without oracle)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best of) for small matrices")
    ap.add_argument("--no-sweep", action="store_true", help="skip the 4-lambda sweep vs one merge")
    ap.add_argument("--no-preview", action="store_true", help="skip the timber-fast (routes) end-to-end preview runs")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile of a small merge")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor (kernel pieces per tensor) table")
    ap.add_argument("--out-shard-size", default="250M",
                    help="--out-shard-size for mergekit (default 250M: mergekit's own 5B default keeps the whole "
                         "output of a small model in memory until the end; 'default' keeps mergekit's)")
    ap.add_argument("--e2e-repeats", type=int, default=1,
                    help="run each end-to-end job this many times; report the best wall time (default 1)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged models in WORKDIR/out")
    args = ap.parse_args(argv)
    if args.out_shard_size == "default":
        args.out_shard_size = None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    report = ["# Timber benchmark", "", "## Machine", "", *machine_info(args.device)]
    small_pair = None
    if not args.e2e_only:
        small_pair = ensure_pair(workdir, args.small_layers)
        report += ["", *run_kernel_table(args, small_pair)]
        if not args.no_micro and args.device == "cpu":
            report += ["", *run_micro(args, small_pair)]
    if not args.kernel_only:
        report += ["", *run_e2e(args, workdir)]
        if not args.no_profile:
            report += ["", *run_profile(args, workdir)]
    report += ["", f"- load at end: {load_string()}", f"- benchmark wall time: {(time.perf_counter() - t_start) / 60:.1f} min"]
    text = "\n".join(report) + "\n"
    (workdir / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
