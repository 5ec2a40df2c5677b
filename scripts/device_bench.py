#!/usr/bin/env python
"""Timber on a device against the CPU kernel and mergekit's `linear`: wall time and peak
device memory, ratios in one run (the second half of scripts/device_check.sh).

    python scripts/device_bench.py [--device cuda] [--reduced] [--cpu-experts 8]
        [--workdir DIR] [-o docs/device_check.md]

Cases (--reduced: the same cases at toy sizes, so that the script is proven on a CPU):
1. a Qwen3-0.6B-shaped pair, 28 layers: `mergekit-yaml`'s run_merge in this process, Timber
   on --device, Timber on the CPU, `linear` on --device;
2. one Llama-3.1-8B-shaped layer (q, k, v, o, gate, up, down), 3. the expert tensors of
   one Qwen3-30B-A3B-shaped MoE layer and 4. of one DeepSeek-V3-shaped MoE layer under
   the memory budget: the method (mergekit_timber.method.adapter.refine_tensor: layout split and
   kernel) on --device, the same on the CPU, and mergekit's `linear` method on --device
   (the same direct call mergekit's executor makes). On MoE layers the CPU runs the first
   --cpu-experts experts and its time is scaled to all of them (said in the table).
Every device result is compared with the CPU result (bf16 elements that differ: at most
a rounding step where the two float64 results straddle a boundary). Peak device memory is
torch's max_memory_allocated beyond what the case's inputs already held; on the CPU
(--device cpu) it is not measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmark import LLAMA_3_1_8B, ensure_pair  # scripts/ is on sys.path when this file runs
from bench_memory import write_linear_yaml
from mergekit_timber.method import kernel, layout
from mergekit_timber.method.adapter import refine_tensor

LAMBDA = 0.2
GB = 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> Tuple[float, Optional[float], object]:
    """(wall s, peak device GB beyond what was allocated before, result)."""
    sync(device)
    base_mem = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base_mem) / GB if device.type == "cuda" else None
    return wall, peak, result


def differing(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() != b.cpu()).sum()) / max(1, a.numel())


def linear_method(base: torch.Tensor, instruct: torch.Tensor, name: str) -> torch.Tensor:
    """mergekit's `linear` (weights 0.8/0.2), called as mergekit's executor calls a method."""
    from mergekit import merge_methods
    from mergekit.common import ModelReference
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    refs = ModelReference.model_validate("base"), ModelReference.model_validate("instruct")
    group = TensorGroup(
        entries=(TensorEntry(id=refs[0], tensor=base, is_base=True), TensorEntry(id=refs[1], tensor=instruct, is_base=False)),
        metadata=TensorMetadata(name=name),
    )
    (out,) = merge_methods.get("linear")((group,), parameters={"weight": {refs[0]: 1 - LAMBDA, refs[1]: LAMBDA}})
    return out


# ----------------------------------------------------------------------------- cases


def layer_tensors(case: str, reduced: bool, device: torch.device, seed: int) -> Tuple[Dict, Dict, layout.Architecture, str]:
    """(base, instruct) tensors of one layer in mergekit's in-memory layout, made on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    if case == "llama":
        h, inter, q, kv = (LLAMA_3_1_8B["hidden"], LLAMA_3_1_8B["intermediate"], 4096, 1024)
        if reduced:
            h, inter, q, kv = 256, 896, 256, 64
        shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}  # fmt: skip
        arch, what = layout.architecture_of({"model_type": "llama", "hidden_size": h}), f"hidden {h}, intermediate {inter}"
    else:
        experts, h, width = {"qwen3_30b": (128, 2048, 768), "deepseek": (256, 7168, 2048)}[case]
        if reduced:
            experts, h, width = {"qwen3_30b": (16, 256, 96), "deepseek": (32, 384, 128)}[case]
        shapes = {"mlp.experts.gate_up_proj": (experts, 2 * width, h), "mlp.experts.down_proj": (experts, h, width)}
        # Qwen3-MoE's layout (DeepSeek-V3's experts are read the same way: layout.converted_layout).
        arch = layout.architecture_of({"model_type": "qwen3_moe", "hidden_size": h})
        what = f"{experts} experts, hidden {h}, expert width {width}"
    base, instruct = {}, {}
    for short, shape in shapes.items():
        name = f"model.layers.0.{short}" + ("" if short.startswith("mlp.experts") else ".weight")
        b = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.02)
        delta = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.002)
        base[name], instruct[name] = b.to(torch.bfloat16), b.add_(delta).to(torch.bfloat16)
        del b, delta
    return base, instruct, arch, what


def refine_all(base: Dict, instruct: Dict, arch) -> Dict:
    return {name: refine_tensor(name, base[name], instruct[name], LAMBDA,
                                split=layout.split(name, instruct[name].shape, arch)) for name in instruct}  # fmt: skip


def layer_case(case: str, label: str, args, device: torch.device) -> dict:
    cpu = torch.device("cpu")
    base, instruct, arch, what = layer_tensors(case, args.reduced, device, seed=1)
    held = sum(t.numel() * t.element_size() for t in (*base.values(), *instruct.values()))
    plan = None
    if case != "llama":
        name = next(n for n in instruct if n.endswith("gate_up_proj"))
        e, two_w, h = instruct[name].shape
        plan = kernel.plan_batches((e, max(h, two_w // 2), min(h, two_w // 2)), kernel.memory_budget(device))
    t_dev, peak, out_dev = timed(device, lambda: refine_all(base, instruct, arch))
    t_lin, peak_lin, _ = timed(device, lambda: {n: linear_method(base[n], instruct[n], n) for n in instruct})
    # The CPU kernel on the same tensors (the first --cpu-experts experts of a MoE layer).
    share = 1.0
    cpu_base, cpu_inst = {}, {}
    for name in instruct:
        b, i = base[name], instruct[name]
        if b.ndim == 3 and b.shape[0] > args.cpu_experts:
            share = b.shape[0] / args.cpu_experts
            b, i = b[: args.cpu_experts], i[: args.cpu_experts]
        cpu_base[name], cpu_inst[name] = b.to(cpu), i.to(cpu)
    t_cpu, _, out_cpu = timed(cpu, lambda: refine_all(cpu_base, cpu_inst, arch))
    diff = max(differing(out_dev[n][: out_cpu[n].shape[0]] if out_dev[n].ndim == 3 else out_dev[n], out_cpu[n])
               for n in out_cpu)  # fmt: skip
    del base, instruct, out_dev
    return dict(label=f"{label} ({what})", device_s=t_dev, cpu_s=t_cpu * share, cpu_scaled=share > 1,
                linear_s=t_lin, peak=peak, peak_linear=peak_lin, held=held / GB, diff=diff, plan=plan)


def pair_case(args, device: torch.device) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from pairs.synthetic import write_timber_yaml
    import yaml

    layers = 2 if args.reduced else 28
    base, instruct = ensure_pair(args.workdir, layers, tiny=args.reduced)
    out = Path(tempfile.mkdtemp(dir=args.workdir))

    def merge(cfg_path: Path, where: str, target: str):
        config = MergeConfiguration.model_validate(yaml.safe_load(cfg_path.read_text()))
        run_merge(config, str(out / target), options=MergeOptions(device=where, quiet=True))

    timber = write_timber_yaml(args.workdir / "timber.yml", base, instruct, lambda_=LAMBDA)
    linear = write_linear_yaml(args.workdir / "linear.yml", base, instruct, LAMBDA)
    t_dev, peak, _ = timed(device, lambda: merge(timber, device.type if device.type != "cuda" else str(device), "device"))
    t_cpu, _, _ = timed(torch.device("cpu"), lambda: merge(timber, "cpu", "cpu"))
    t_lin, peak_lin, _ = timed(device, lambda: merge(linear, str(device), "linear"))
    from mergekit_timber.checkpoint import Checkpoint

    with Checkpoint(out / "device", "a") as a, Checkpoint(out / "cpu", "b") as b:
        diff = max(differing(a.tensor(n), b.tensor(n)) for n in a.names())
    what = "Qwen3-0.6B-shaped pair" if not args.reduced else "toy pair"
    return dict(label=f"{what}, {layers} layers, `mergekit-yaml` end to end", device_s=t_dev, cpu_s=t_cpu,
                cpu_scaled=False, linear_s=t_lin, peak=peak, peak_linear=peak_lin, held=None, diff=diff, plan=None)


def fmt(x: Optional[float], spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(rows: List[dict], device: torch.device, args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"Device: {device} ({name}); CPU: {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"lambda {LAMBDA}; {'reduced sizes' if args.reduced else 'full sizes'}.",
        "",
        "| case | Timber on device s | Timber on CPU s | CPU / device | `linear` on device s | Timber / `linear` "
        "| peak device GB (Timber) | peak device GB (`linear`) | batches per stack x matrices (budget GB) | bf16 differing from CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan = r["plan"]
        batches = f"{plan.batches} x {plan.batch} ({plan.budget / GB:.3g})" if plan else "-"
        cpu = fmt(r["cpu_s"], ".1f") + (" (scaled)" if r["cpu_scaled"] else "")
        lines.append(
            f"| {r['label']} | {r['device_s']:.2f} | {cpu} | {r['cpu_s'] / r['device_s']:.1f} | {r['linear_s']:.2f} "
            f"| {r['device_s'] / max(r['linear_s'], 1e-9):.1f} | {fmt(r['peak'])} | {fmt(r['peak_linear'])} | {batches} "
            f"| {r['diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reduced", action="store_true", help="toy sizes (proves the script on a CPU)")
    parser.add_argument("--cpu-experts", type=int, default=8)
    parser.add_argument("--budget", help="MERGEKIT_TIMBER_MEMORY_BUDGET for the MoE layers (default: the kernel's; "
                        "--reduced: 4M, so that they run in several batches)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-timber-device-check"))
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/device_check.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.workdir.mkdir(parents=True, exist_ok=True)
    budget = args.budget or ("4M" if args.reduced else None)
    if budget:
        os.environ[kernel.BUDGET_ENV] = budget
    # The libraries' first call (cuBLAS, cuSOLVER handles) is not part of any case.
    warm = torch.randn(1, 64, 32, device=device)
    kernel.refine_stack(warm, warm + 1e-3 * torch.randn_like(warm), LAMBDA)
    rows = [pair_case(args, device)]
    for case, label in (("llama", "one Llama-3.1-8B-shaped layer"),
                        ("qwen3_30b", "experts of one Qwen3-30B-A3B-shaped MoE layer"),
                        ("deepseek", "experts of one DeepSeek-V3-shaped MoE layer")):  # fmt: skip
        print(f"[device_bench] {label} ...", file=sys.stderr, flush=True)
        rows.append(layer_case(case, label, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = table(rows, device, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    worst = max(r["diff"] for r in rows)
    return 0 if worst <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
