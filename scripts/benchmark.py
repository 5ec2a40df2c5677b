#!/usr/bin/env python
"""Timber speed and memory benchmark: one command, tables on stdout.

    python scripts/benchmark.py [--layers 28] [--small-layers 4] [--skip-naive]
        [--workdir DIR] [--kernel-only | --e2e-only] [--device cpu|cuda]
        [--llama none|layers|full] [--no-profile] [--no-micro] [--readme-out PATH]

Sections (all on the same synthetic Qwen3-0.6B-shaped pair, built and cached in
WORKDIR/pairs by pairs.synthetic):

1. Kernel routes (scripts/bench_routes.py): every candidate way of computing Timber
   on one matrix, timed and compared with the float64-SVD oracle (deviation = ||out - oracle||_F /
   ||oracle - W_I||_F, K vs the oracle's K) on the pair's Qwen3-0.6B tensors, on
   Llama-3.1-8B shapes (same synthetic delta recipe), and on a 1/i and an 8-decade
   spectrum. Exact means deviation <= 1e-6 and the same K, on every case.
2. Micro-benchmarks of the pieces (Gram variants, eigen-solver variants, threads),
   in a separate process (scripts/bench_micro.py; needs SciPy).
3. End to end: `mergekit-yaml` with `merge_method: timber` (lambda 0.2) at --layers
   and at --small-layers, against scripts/naive_timber.py (the authors' approach),
   each job in its own process under /usr/bin/time -v (wall time, peak RSS) with the
   process tree's RSS also polled (anonymous vs file-backed). Prints the ratios and
   the project's speed and memory targets beside them; it never asserts them. Checks that the timber and
   naive outputs agree (fraction of differing bf16 elements). A passthrough merge of
   the same pair measures what mergekit itself costs (imports, reading, writing).
4. The floor: per tensor of layer 0 and the embedding, the kernel's time beside the
   float64 work exactness needs on this route (delta + Gram, eigh, rebuild GEMMs);
   with mergekit's own cost, the best wall time this route can reach here and the
   largest speed-up over the naive baseline it allows (scripts/bench_floor.py).
5. Optionally a profile of a --small-layers merge (where the time goes;
   scripts/bench_profile.py).

--readme-out PATH also writes what docs/speed_and_memory.md's benchmark block shows (the jobs
table, the targets table and a paragraph of the floor's figures) from this run.

Timings are wall-clock on whatever else the machine is running: the load average and
CPU pressure before and after are printed with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from bench_routes import ROUTES  # scripts/ is on sys.path when this file runs
from mergekit_timber.checkpoint import Checkpoint

SCRIPTS = Path(__file__).resolve().parent
NAIVE = SCRIPTS / "naive_timber.py"
LAMBDA = 0.2
EXACT = 1e-6  # the exactness bar: deviation <= 1e-6 of the edit's norm

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


def _exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through the `finally` that removes the folder


@contextlib.contextmanager
def scratch_workdir(workdir: Optional[Path], keep: bool, prefix: str) -> Iterator[Path]:
    """The folder a benchmark writes its pairs and outputs into (gigabytes). A folder the
    user names (--workdir) is theirs: used, and kept. Otherwise a new temporary folder,
    removed at the end, on an error, Ctrl-C, SIGTERM or SIGHUP, unless `keep` (--keep)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield folder
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keep:
            print(f"kept the work folder {folder} (--keep): remove it when done", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed the work folder {folder} (--keep keeps it)", file=sys.stderr)


def ensure_pair(workdir: Path, layers: int, tiny: bool = False) -> Tuple[Path, Path]:
    from pairs.synthetic import QWEN3_0_6B_SHAPE, write_pair

    # tiny: write_pair's default (toy) shapes, for smoke tests of the script itself
    kwargs = dict(layers=layers) if tiny else dict(QWEN3_0_6B_SHAPE, layers=layers)
    out = workdir / "pairs" / (f"tiny-L{layers}" if tiny else f"qwen3-0.6b-L{layers}")
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
    with Checkpoint(model_dir, "model") as checkpoint:
        return checkpoint.tensor(name)


# =========================================================================== kernel routes


def decay_pair(m: int, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """bf16 (base, instruct) with the same 'decay' delta recipe as pairs.synthetic:
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


def run_kernel_table(args, small_pair, measured: Optional[dict] = None) -> List[str]:
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
            if huge and r != "kernel":
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
            del out
            out = None
            log(f"    {r:8s} {min(times):8.3f}s" + (f"  dev {results[r].get('dev', 0):.1e}" if "dev" in results[r] else ""))
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
    if measured is not None:
        measured["routes"] = summary
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
    log("[micro] Gram / eigen pieces in a separate process ...")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_micro.py"), str(pt), str(args.repeats + 2)],
                          capture_output=True, text=True)  # fmt: skip
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


LAYER_MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def measure_floor(args, pair: Tuple[Path, Path]) -> List[dict]:
    """Per-tensor kernel time and its irreducible parts, for layer 0 and the embedding.

    See scripts/bench_floor.py. gram + eigh + rebuild is the floor of this route: what
    remains of the kernel is adds, casts and copies. Raises RuntimeError (its stderr)
    if the measuring process fails.
    """
    names = [f"model.layers.0.{m}.weight:{args.repeats}" for m in LAYER_MATRICES]
    names.append("model.embed_tokens.weight:1")
    log("[floor] kernel pieces per tensor (layer 0 and the embedding) in a separate process ...")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_floor.py"), str(pair[0]), str(pair[1]), str(LAMBDA), *names],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def floor_lines(floor: List[dict], layers: int, res: Dict[str, dict], naive_layers: Optional[int]) -> List[str]:
    """The floor table and what it implies for the project's speed targets."""
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


def mb(kb) -> str:
    """kB as whole MB for the tables ("n/a" when not measured)."""
    return f"{kb / 1024:.0f}" if kb else "n/a"


def measure(cmd: List[str], label: str, workdir: Path) -> dict:
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
        proc = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT)

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
    from pairs.synthetic import write_timber_yaml

    return write_timber_yaml(path, base, inst, method="timber", lambda_=LAMBDA)


SWEEP_LAMBDAS = "0,0.2,0.5,0.8"


def mergekit_cmd(args, cfg: Path, out: Path) -> List[str]:
    extra = ["--quiet"] + (["--out-shard-size", args.out_shard_size] if args.out_shard_size else [])
    if args.device != "cpu":
        extra += ["--device", args.device]
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    return [exe, str(cfg), str(out)] + extra


def compare_outputs(a_dir: Path, b_dir: Path) -> dict:
    with Checkpoint(a_dir, "output") as a, Checkpoint(b_dir, "output") as b:
        return _compare(a, b)


def _compare(a: Checkpoint, b: Checkpoint) -> dict:
    fa, fb = set(a.names()), set(b.names())
    common = sorted(fa & fb)
    total = diff = 0
    worst = (0.0, "")
    maxabs = 0.0
    for k in common:
        x, y = a.tensor(k), b.tensor(k)
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


def run_e2e(args, workdir: Path, measured: Optional[dict] = None) -> List[str]:
    N, S = args.layers, args.small_layers
    pairs = {S: ensure_pair(workdir, S, args.tiny_pair)}
    if N != S:
        pairs[N] = ensure_pair(workdir, N, args.tiny_pair)
    outdir = workdir / "out"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    cfgs = {L: write_yaml(workdir / f"timber-L{L}.yml", *pairs[L]) for L in pairs}
    res: Dict[str, dict] = {}
    notes: List[str] = []

    def best_of(key, cmd):
        """Run `cmd` --e2e-repeats times: the fastest run's wall time, the largest peaks."""
        # Repeats write into the same output: a re-run replaces the model, as with mergekit.
        runs = [measure(cmd, key if r == 0 else f"{key} (repeat {r + 1})", workdir) for r in range(args.e2e_repeats)]
        ok = [r for r in runs if r["rc"] == 0] or runs
        best = dict(min(ok, key=lambda r: r["wall"]))
        for field in ("maxrss_kb", "poll_rss_kb", "anon_kb", "file_kb"):
            vals = [r[field] for r in ok if r[field] is not None]
            best[field] = max(vals) if vals else None
        best["walls"] = [r["wall"] for r in runs]
        return best

    def timber(L):
        key = f"timber L{L}"
        res[key] = best_of(key, mergekit_cmd(args, cfgs[L], outdir / key.replace(" ", "_")))
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
        # The sweep's target: 4 lambdas from one pass cost at most 1.3x one merge.
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

    # ---- agreement
    agree_lines = []
    agreement = None
    pairs_to_check = []
    if naive_layers is not None:
        pairs_to_check.append((f"timber L{naive_layers}", f"naive L{naive_layers}"))
    for a, b in pairs_to_check:
        if res.get(a, {}).get("rc") != 0 or res.get(b, {}).get("rc") != 0:
            agree_lines.append(f"| {a} vs {b} | a run failed | | | |")
            continue
        c = compare_outputs(outdir / a.replace(" ", "_"), outdir / b.replace(" ", "_"))
        if "error" in c:
            agree_lines.append(f"| {a} vs {b} | {c['error']} | | | |")
            continue
        agreement = c
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
    floor, floor_error = None, None
    if not args.no_floor:
        try:
            floor = measure_floor(args, pairs[S])
        except RuntimeError as error:  # in the report, as micro/profile failures are
            floor_error = str(error)

    if measured is not None:
        measured.update(res=res, floor=floor, agreement=agreement, naive_layers=naive_layers)

    # ---- tables
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
        + "` (otherwise mergekit's defaults); `naive` = scripts/naive_timber.py.",
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
    lines += ["", *notes, "", "### Ratios (the project's targets; printed, not asserted)", "",
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

    for variant in ["timber"]:
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
    if floor_error:
        lines += ["", "### How low can an exact merge go here?", "", "floor failed:", "```", floor_error, "```"]
    if floor:
        lines += ["", *floor_lines(floor, N, res, naive_layers)]
    if agree_lines:
        lines += ["", "### Do the outputs agree?", "",
                  "| outputs | tensors compared | fraction of differing elements | worst tensor | max abs diff |",
                  "|---|---|---|---|---|", *agree_lines]  # fmt: skip
    return lines


# =========================================================================== README figures


JOB_LABELS = {
    "timber": "`mergekit-yaml` timber",
    "naive": "naive float64 SVD, whole model in memory",
    "passthrough": "`mergekit-yaml` passthrough of the instruct model (mergekit alone)",
    "sweep-4": "`mergekit-timber sweep`, 4 lambdas",
}


def readme_markdown(args, measured: dict) -> str:
    """What docs/speed_and_memory.md's benchmark block shows, from this run's measurements:
    the jobs table, the targets table and a paragraph of the floor's figures."""
    N, S = args.layers, args.small_layers
    res: Dict[str, dict] = measured.get("res") or {}
    routes: Dict[str, dict] = measured.get("routes") or {}
    floor: Optional[List[dict]] = measured.get("floor")
    naive_layers: Optional[int] = measured.get("naive_layers")

    def ok(key: str) -> Optional[dict]:
        r = res.get(key)
        return r if r is not None and r["rc"] == 0 else None

    lines = ["| job | layers | wall s | peak RSS MB | anon MB | file-backed MB |", "|---|---|---|---|---|---|"]
    order = list(JOB_LABELS)
    for key, r in sorted(res.items(), key=lambda kv: (order.index(kv[0].split()[0]), -kv[1]["layers"])):
        wall = f"{r['wall']:.1f}" if r["rc"] == 0 else f"failed (exit {r['rc']})"
        lines.append(f"| {JOB_LABELS[key.split()[0]]} | {r['layers']} | {wall} | {mb(r['maxrss_kb'])} | "
                     f"{mb(r['anon_kb'])} | {mb(r['file_kb'])} |")  # fmt: skip
    see_floor = " (see the floor)" if floor else ""

    def row(target: str, value: Optional[float], shown: str, good, why_not: str = "") -> None:
        if value is None:
            lines.append(f"| {target} | not measured | |")
        else:
            lines.append(f"| {target} | {shown.format(value)} | {'yes' if good(value) else 'no' + why_not} |")

    def ratio(a: Optional[dict], b: Optional[dict], field: str) -> Optional[float]:
        return a[field] / b[field] if a and b and a.get(field) and b.get(field) else None

    L = naive_layers
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    shown = "{:.2f}x" + ("" if L == N else f" at {L} layers")
    row("end to end >= 5x faster than naive", ratio(ok(f"naive L{L}"), ok(f"timber L{L}"), "wall"), shown, lambda v: v >= 5, see_floor)
    shown = "{:.2f}" + ("" if L == N else f" at {L} layers")
    row("peak RSS <= 1/4 of naive", ratio(ok(f"timber L{L}"), ok(f"naive L{L}"), "maxrss_kb"), shown, lambda v: v <= 0.25)
    wall = (ok(f"timber L{N}") or {}).get("wall")
    row(f"{N} layers under 60 s", wall, "{:.1f} s", lambda v: v < 60, see_floor)
    row(f"peak RSS {N} layers <= 1.2x {S} layers", ratio(ok(f"timber L{N}"), ok(f"timber L{S}"), "maxrss_kb")
        if N != S else None, "{:.2f}", lambda v: v <= 1.2)  # fmt: skip
    row("4-lambda sweep <= 1.3x one merge", ratio(ok(f"sweep-4 L{N}"), ok(f"timber L{N}"), "wall"), "{:.2f}",
        lambda v: v <= 1.3)  # fmt: skip
    kernel = routes.get("kernel")
    if kernel and kernel["n"]:
        same = kernel["n"] - kernel["kbad"]
        met = "yes" if kernel["worst"] <= EXACT and kernel["kbad"] == 0 else "no"
        lines.append(f"| exact: <= 1e-6 of the edit's norm, same K, on every case | worst {kernel['worst']:.1e}, "
                     f"same K in {same}/{kernel['n']} cases | {met} |")  # fmt: skip
    else:
        lines.append("| exact: <= 1e-6 of the edit's norm, same K, on every case | not measured | |")
    gpu = "not measured (no GPU)" if args.device == "cpu" else f"kernel table of the full report ({args.device})"
    lines.append(f"| GPU: Qwen3-0.6B < 10 s, Llama-3.1-8B < 2 min on one H100 | {gpu} | unknown |")

    prose = []
    if floor:
        def total(field: str) -> float:
            return sum(r[field] * (N if ".layers." in r["name"] else 1) for r in floor)

        eighs = sum(N if ".layers." in r["name"] else 1 for r in floor)
        fl = total("gram") + total("eigh") + total("rebuild")
        prose.append(
            f"**The floor** ({N} layers, this run): the float64 work exactness needs on this route "
            f"(delta + Gram GEMMs, `eigh`, the two rebuild GEMMs; inputs in memory) takes {fl:.1f} s "
            f"(eigh {total('eigh'):.1f} s: {eighs} eigen-decompositions at ~{total('eigh') / eighs:.2f} s; "
            f"GEMMs {total('gram') + total('rebuild'):.1f} s); the kernel as called takes {total('kernel'):.1f} s."
        )
        alone = (ok(f"passthrough L{N}") or {}).get("wall")
        if alone is not None:
            prose.append(f"Mergekit alone takes {alone:.1f} s, so the best this route can do here is about "
                         f"{alone + fl:.1f} s" + ("." if not ok(f"naive L{N}") else
                         f", at most {ok(f'naive L{N}')['wall'] / (alone + fl):.2f}x the naive run."))  # fmt: skip
    if kernel and kernel["time"]:
        others = []
        for name, sm in routes.items():
            if name == "kernel" or not sm["time"]:
                continue
            exact = name == "svd64" or (sm["worst"] <= EXACT and sm["kbad"] == 0)
            others.append(f"`{name}` {sm['time'] / kernel['time']:.1f}x" +
                          ("" if exact else f" (not exact: worst deviation {sm['worst']:.0e})"))  # fmt: skip
        if others:
            prose.append("Time of the other routes on the Qwen3-0.6B tensors, relative to the kernel: "
                         + ", ".join(others) + ".")  # fmt: skip
    agreement = measured.get("agreement")
    if agreement:
        prose.append(f"Outputs of timber and of the naive baseline ({naive_layers} layers) differ on "
                     f"{agreement['frac']:.1e} of the bf16 elements (largest difference {agreement['maxabs']:.1e}).")  # fmt: skip
    if "minutes" in measured:
        prose.append(f"This run of the benchmark took about {measured['minutes']:.0f} minutes.")
    if prose:
        lines += ["", " ".join(prose)]
    return "\n".join(lines) + "\n"


# =========================================================================== profile


def run_profile(args, workdir: Path) -> List[str]:
    S = args.small_layers
    pair = ensure_pair(workdir, S, args.tiny_pair)
    cfg = write_yaml(workdir / f"timber-L{S}.yml", *pair)
    out = workdir / "out-profile"
    shutil.rmtree(out, ignore_errors=True)
    log(f"[profile] cProfile of a {S}-layer timber merge ...")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_profile.py"), str(cfg), str(out)],
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
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile of a small merge")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor (kernel pieces per tensor) table")
    ap.add_argument("--out-shard-size", default="250M",
                    help="--out-shard-size for mergekit (default 250M: mergekit's own 5B default keeps the whole "
                         "output of a small model in memory until the end; 'default' keeps mergekit's)")
    ap.add_argument("--e2e-repeats", type=int, default=1,
                    help="run each end-to-end job this many times; report the best wall time (default 1)")
    ap.add_argument("--readme-out", metavar="PATH",
                    help="also write the README's figures (jobs table, targets table, the floor) to PATH (markdown)")
    ap.add_argument("--tiny-pair", action="store_true",
                    help="toy shapes instead of Qwen3-0.6B's (a smoke test of this script; figures meaningless)")
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
    measured: dict = {}
    if not args.e2e_only:
        small_pair = ensure_pair(workdir, args.small_layers, args.tiny_pair)
        report += ["", *run_kernel_table(args, small_pair, measured)]
        if not args.no_micro and args.device == "cpu":
            report += ["", *run_micro(args, small_pair)]
    if not args.kernel_only:
        report += ["", *run_e2e(args, workdir, measured)]
        if not args.no_profile:
            report += ["", *run_profile(args, workdir)]
    report += ["", f"- load at end: {load_string()}", f"- benchmark wall time: {(time.perf_counter() - t_start) / 60:.1f} min"]
    text = "\n".join(report) + "\n"
    (workdir / "report.md").write_text(text)
    if args.readme_out:
        measured["minutes"] = (time.perf_counter() - t_start) / 60
        Path(args.readme_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.readme_out).write_text(readme_markdown(args, measured))
        log(f"[readme] the README's figures written to {args.readme_out}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
