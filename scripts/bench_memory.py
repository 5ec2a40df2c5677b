#!/usr/bin/env python
"""Peak RSS of Timber on many-expert MoE pairs within a memory budget, against mergekit's
`linear` merge of the same pair: the memory the kernel adds stays within the budget
whatever the number of experts.

    python scripts/bench_memory.py [--experts 32,128] [--budget 64M] [--workdir DIR | --keep] [-o docs/bench_memory.md]

Pairs: Qwen3-MoE-shaped (qwen3_moe), 2 layers, hidden 512, expert width 256, vocab
1024, E experts (pairs.synthetic). Per pair, each in its own process
under /usr/bin/time -v (scripts/benchmark.py: measure): `linear` (weights 0.8/0.2),
Timber with MERGEKIT_TIMBER_MEMORY_BUDGET=BUDGET, and Timber with the default budget.
Beside each: the kernel's predicted scratch peak for the largest stack
(mergekit_timber.method.kernel.plan_batches, as refine_stack calls it on the host). Pairs and
outputs go to a temporary folder removed at the end unless --keep; a --workdir is kept
(its pairs, outputs and logs are rebuilt on each run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml

from benchmark import measure, scratch_workdir  # scripts/ is on sys.path when this file runs
import torch

from mergekit_timber.method.kernel import CHUNK_BYTES, memory_budget, parse_bytes, plan_batches
from pairs.synthetic import write_pair, write_timber_yaml

BIN = Path(sys.executable).parent
SHAPE = dict(arch="qwen3_moe", layers=2, hidden=512, moe_intermediate=256, vocab=1024, heads=4, kv_heads=2, head_dim=64)


def write_linear_yaml(path: Path, base: Path, instruct: Path, weight: float = 0.2) -> Path:
    """mergekit's `linear` of the pair: (1 - weight) * Base + weight * Instruct."""
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(Path(base).resolve()), "parameters": {"weight": 1.0 - weight}},
            {"model": str(Path(instruct).resolve()), "parameters": {"weight": weight}},
        ],
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="32,128")
    parser.add_argument("--budget", default="64M")
    parser.add_argument("--workdir", type=Path, help="work in (and keep) this folder; default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/bench_memory.md"))
    args = parser.parse_args(argv)
    with scratch_workdir(args.workdir, args.keep, "bench-memory-") as work:
        return measure_memory(args, work)


def measure_memory(args, work: Path) -> int:
    for previous_run in [*work.glob("pair-*"), work / "out", work / "logs"]:  # this script's own folders only
        shutil.rmtree(previous_run, ignore_errors=True)
    lines = [
        f"Qwen3-MoE-shaped pairs, {SHAPE['layers']} layers, hidden {SHAPE['hidden']}, expert width "
        f"{SHAPE['moe_intermediate']}, vocab {SHAPE['vocab']}; peak RSS of each merge in its own process "
        "(wall times, which vary with the machine's load, are in the log).",
        "",
        "| experts | job | predicted kernel scratch MB | peak RSS MB | RSS over `linear` MB | RSS / `linear` |",
        "|---|---|---|---|---|---|",
    ]
    failed = False
    for experts in (int(e) for e in args.experts.split(",")):
        base, instruct = write_pair(work / f"pair-{experts}", **SHAPE, experts=experts, seed=1)
        # The largest stack the kernel decomposes: gate or up, [E, hidden, width] tall.
        shape = (experts, SHAPE["hidden"], SHAPE["moe_intermediate"])
        jobs = []
        cfg = write_linear_yaml(work / f"linear-{experts}.yml", base, instruct)
        jobs.append(("mergekit `linear`", None, cfg))
        timber = write_timber_yaml(work / f"timber-{experts}.yml", base, instruct)
        for budget in (args.budget, ""):
            label = f"timber, budget {budget}" if budget else "timber, default budget"
            jobs.append((label, budget, timber))
        linear_rss = None
        for label, budget, cfg in jobs:
            env_budget = {"MERGEKIT_TIMBER_MEMORY_BUDGET": budget} if budget else {}
            os.environ.pop("MERGEKIT_TIMBER_MEMORY_BUDGET", None)  # "": the default
            os.environ.update(env_budget)
            out = work / "out" / f"{experts}-{label.split()[0].strip('`,')}-{budget or 'default'}"
            job = measure([str(BIN / "mergekit-yaml"), str(cfg), str(out), "--quiet"], f"{experts} experts {label}", work)
            os.environ.pop("MERGEKIT_TIMBER_MEMORY_BUDGET", None)
            failed |= job["rc"] != 0
            rss = (job["maxrss_kb"] or 0) / 1024
            timber_job = budget is not None
            linear_rss = linear_rss if timber_job else rss
            in_bytes = parse_bytes(budget) if budget else memory_budget(torch.device("cpu"))
            predicted = f"{plan_batches(shape, in_bytes, chunk_cap=CHUNK_BYTES).peak / 2**20:.0f}" if timber_job else "-"
            over = f"{rss - linear_rss:.0f}" if timber_job else "-"
            ratio = f"{rss / linear_rss:.2f}" if timber_job else "1.00"
            lines.append(f"| {experts} | {label} | {predicted} | {rss:.0f} | {over} | {ratio} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
