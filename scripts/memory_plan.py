#!/usr/bin/env python
"""The kernel's memory plan for one MoE layer of the largest open models: arithmetic only.

    python scripts/memory_plan.py [-o docs/memory_plan.md]

For each model's stacked expert tensors (gate_up [E, 2I, H] split into its gate and up
stacks, down [E, H, I]), what mergekit holds (both inputs and the output in bf16), and
what the kernel adds under two budgets: the free memory of an 80 GB GPU once mergekit's
inputs and output are on it (mergekit_timber.method.kernel.memory_budget takes 90% of it), and
a budget set by hand (MERGEKIT_TIMBER_MEMORY_BUDGET=8GiB). The planner is
mergekit_timber.method.kernel.plan_batches; nothing is allocated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergekit_timber.method.kernel import DEVICE_BUDGET_SHARE, plan_batches

# (label, experts, hidden, expert width)
MODELS = (
    ("DeepSeek-V3 / R1", 256, 7168, 2048),
    ("Kimi-K2", 384, 7168, 2048),
    ("Qwen3-235B-A22B", 128, 4096, 1536),
    ("Qwen3-30B-A3B", 128, 2048, 768),
)
GPU_BYTES = 80e9
HAND_BUDGET = 8 << 30
GB = 1e9


def stack_rows(experts: int, hidden: int, width: int):
    """(tensor, parts, matrix [m, n] as the kernel sees it (tall), elements of the stored tensor)."""
    tall = (max(hidden, width), min(hidden, width))
    return [
        ("gate_up_proj", 2, tall, experts * 2 * width * hidden),
        ("down_proj", 1, tall, experts * hidden * width),
    ]


def rows() -> list:
    out = []
    for label, experts, hidden, width in MODELS:
        for tensor, parts, (m, n), elements in stack_rows(experts, hidden, width):
            held = 3 * 2 * elements  # base + instruct + output, bf16
            shape = (experts, m, n)  # one part's stack; the parts run one after the other
            everything = plan_batches(shape, 1 << 62)
            for budget_label, budget in (
                ("80 GB GPU", int(DEVICE_BUDGET_SHARE * (GPU_BYTES - held))),
                ("8 GiB set", HAND_BUDGET),
            ):
                plan = plan_batches(shape, budget)
                out.append(dict(
                    model=label, tensor=tensor, stack=f"{parts} x [{experts}, {m}, {n}]", held=held / GB,
                    unbatched=everything.peak / GB, budget_label=budget_label, budget=budget / GB,
                    batch=plan.batch, batches=parts * plan.batches, peak=plan.peak / GB,
                    total=(held + plan.peak) / GB, passes=-(-m // plan.rows), fits=plan.fits,
                ))
    return out


def markdown() -> str:
    lines = [
        "| model | tensor | stacks (parts x [E, m, n]) | inputs + output GB | scratch unbatched GB "
        "| budget | batch | batches | scratch peak GB | total GB | Gram passes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows():
        lines.append(
            f"| {r['model']} | {r['tensor']} | {r['stack']} | {r['held']:.1f} | {r['unbatched']:.1f} "
            f"| {r['budget_label']}: {r['budget']:.1f} GB | {r['batch']} | {r['batches']} | {r['peak']:.1f} "
            f"| {r['total']:.1f} | {r['passes']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    text = markdown()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
