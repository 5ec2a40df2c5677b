#!/usr/bin/env python
"""Peak memory of block-FP8 inputs: a Timber merge of an FP8 pair against the same merge of
its dequantized bf16 pair, and `mergekit-timber dequantize` of one model.

    python scripts/bench_quantized.py [--layers 4] [--workdir DIR | --keep] [--out docs/bench_quantized.md]

The pair is Qwen3-0.6B-shaped (hidden 1024, intermediate 3072, 16/8 heads of 128; vocab
8192 to keep it small), written in block-FP8 as DeepSeek-V3 is (128x128 blocks,
pairs.quantized_pairs). Each job runs in its own process under
/usr/bin/time -v (scripts/benchmark.py: measure). Writes a markdown table to --out and
counts the elements where the two merges differ: the FP8 merge reads the exact float32
values and rounds once, the other merge starts from weights already rounded to bf16.
The pairs and outputs (about 0.7 GB) go to a temporary folder removed at the end unless
--keep; a --workdir is kept (its pairs/, out/ and logs/ are rebuilt on each run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from benchmark import measure, scratch_workdir  # scripts/ is on sys.path when this file runs
from mergekit_timber.checkpoint import Checkpoint
from pairs.quantized_pairs import write_block_fp8
from pairs.synthetic import QWEN3_0_6B_SHAPE, write_pair, write_timber_yaml

BIN = Path(sys.executable).parent


def model_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20


def differing(a: Path, b: Path) -> float:
    """Share of the elements of two outputs (same tensor names) that differ."""
    with Checkpoint(a, "a") as x, Checkpoint(b, "b") as y:
        if sorted(x.names()) != sorted(y.names()):
            raise SystemExit("the two merges wrote different tensor names")
        differ = sum(int((x.tensor(n) != y.tensor(n)).sum()) for n in x.names())
        return differ / sum(x.tensor(n).numel() for n in x.names())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", type=Path, help="work in (and keep) this folder; default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_quantized.md"))
    args = parser.parse_args()
    with scratch_workdir(args.workdir, args.keep, "bench-quantized-") as work:
        return measure_quantized(args, work)


def measure_quantized(args, work: Path) -> int:
    for previous_run in ("pairs", "out", "logs"):  # this script's own folders, nothing else of WORKDIR
        shutil.rmtree(work / previous_run, ignore_errors=True)
    pairs = work / "pairs"
    # Qwen3-0.6B's layer shapes, fewer layers and a smaller vocabulary.
    base, instruct = write_pair(pairs / "bf16", **dict(QWEN3_0_6B_SHAPE, layers=args.layers, vocab=8192), seed=0)
    fp8 = [write_block_fp8(m, pairs / "fp8" / m.name) for m in (base, instruct)]
    shutil.rmtree(pairs / "bf16")  # the reference pair is the dequantized one
    deq = pairs / "deq"
    jobs = []
    for model in fp8:
        jobs.append(measure([str(BIN / "mergekit-timber"), "dequantize", str(model), str(deq / model.name)],
                            f"dequantize {model.name}", work))  # fmt: skip
    outs = {}
    for label, pair in (("FP8 pair", fp8), ("dequantized bf16 pair", [deq / "base", deq / "instruct"])):
        cfg = write_timber_yaml(work / f"{label.split()[0]}.yml", pair[0], pair[1])
        outs[label] = work / "out" / label.split()[0]
        cmd = [str(BIN / "mergekit-yaml"), str(cfg), str(outs[label]), "--out-shard-size", "250M"]
        jobs.append(measure(cmd, f"mergekit-yaml timber, {label}", work))
    if any(job["rc"] for job in jobs):
        print("a job failed; see the logs under", work / "logs")
        return 1
    differ = differing(*outs.values())
    lines = [
        f"Qwen3-0.6B-shaped pair, {args.layers} layers, vocab 8192: one FP8 model "
        f"{model_mb(fp8[1]):.0f} MB, dequantized {model_mb(deq / 'instruct'):.0f} MB, merged output "
        f"{model_mb(outs['FP8 pair']):.0f} MB; elements where the FP8 merge (exact float32 values, "
        f"rounded once) differs from the merge of the bf16 dequantized pair: {100 * differ:.1f}%.",
        "",
        "| job | wall s | peak RSS MB |",
        "|---|---|---|",
    ]
    for job in jobs[2:] + jobs[:1]:
        lines.append(f"| {job['label']} | {job['wall']:.1f} | {(job['maxrss_kb'] or 0) / 1024:.0f} |")
    fp8_rss, bf16_rss = (job["maxrss_kb"] or 0 for job in jobs[2:4])
    lines += ["", f"Peak RSS of the FP8 merge / the bf16 merge: {fp8_rss / max(bf16_rss, 1):.2f}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
