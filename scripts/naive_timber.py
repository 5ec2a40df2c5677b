#!/usr/bin/env python
"""Timber the way the authors' published script does it: the baseline of the benchmark.

    python scripts/naive_timber.py BASE INSTRUCT OUT --lambda 0.2 [--stats FILE]

Deliberately naive (the paper's per-tensor operation, as the authors' script runs it):
both state dicts are loaded whole into memory (safetensors), every floating tensor with 2 or more
dimensions is reshaped to [out, -1] and gets a float64 full `torch.linalg.svd` of its
delta, K = ceil(eRank), the tail singular values are scaled by lambda, the tensor is
rebuilt in float32 and cast to the base model's dtype; 1-D (and non-float) tensors are
the instruct model's. The whole output model is held in memory and saved with
safetensors in one file; config, generation config and tokenizer files are copied
from INSTRUCT. `--stats FILE` writes per-tensor timings as JSON (the benchmark uses
them to extrapolate the run time to more layers).

Independent of mergekit and of mergekit_timber on purpose.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_state_dict(model_dir: Path) -> dict:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no safetensors weights in {model_dir}")
    state = {}
    for name in files:
        state.update(load_file(str(model_dir / name)))
    return state


def erank_k(s: torch.Tensor) -> int:
    s = s.double()
    total = float(s.sum())
    if total <= 0:
        return 0
    p = s / total
    p = p[p > 0]
    return math.ceil(math.exp(-float((p * torch.log(p)).sum())))


def timber_tensor(wb: torch.Tensor, wi: torch.Tensor, lam: float) -> tuple:
    shape = wi.shape
    d = wi.reshape(shape[0], -1).to(torch.float64) - wb.reshape(shape[0], -1).to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = erank_k(s)
    if k == 0:
        return wi.to(wb.dtype), 0
    s[k:] *= lam
    rebuilt = wb.reshape(shape[0], -1).to(torch.float32) + (u.to(torch.float32) * s.to(torch.float32)) @ vh.to(torch.float32)
    return rebuilt.reshape(shape).to(wb.dtype), k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("instruct")
    ap.add_argument("out")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.2)
    ap.add_argument("--stats", help="write per-tensor timings (JSON) here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not 0 <= args.lam <= 1:
        raise SystemExit(f"--lambda must lie in [0, 1]; got {args.lam}")

    t0 = time.perf_counter()
    base = load_state_dict(Path(args.base))
    inst = load_state_dict(Path(args.instruct))
    t_load = time.perf_counter() - t0
    out = {}
    per_tensor = []
    for name, wi in inst.items():
        wb = base.get(name)
        if wb is None or wb.shape != wi.shape:
            raise SystemExit(f"{name}: missing from base or shape differs")
        ts = time.perf_counter()
        if wi.is_floating_point() and wi.ndim >= 2:
            out[name], k = timber_tensor(wb, wi, args.lam)
        else:
            out[name], k = wi.clone(), None
        dt = time.perf_counter() - ts
        per_tensor.append({"name": name, "shape": list(wi.shape), "seconds": dt, "k": k})
        if not args.quiet and k is not None:
            print(f"{name} {tuple(wi.shape)} K={k} {dt:.2f}s", file=sys.stderr, flush=True)
    t_merge = time.perf_counter() - t0 - t_load

    ts = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    src = Path(args.instruct)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and not f.name.endswith((".safetensors", ".bin")):
            shutil.copyfile(f, out_dir / f.name)
    t_save = time.perf_counter() - ts
    if args.stats:
        Path(args.stats).write_text(
            json.dumps(
                {"load_s": t_load, "merge_s": t_merge, "save_s": t_save, "tensors": per_tensor},
                indent=1,
            )
        )
    if not args.quiet:
        print(f"naive timber: load {t_load:.1f}s, SVDs {t_merge:.1f}s, save {t_save:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
