#!/usr/bin/env python
"""`mergekit-timber search` on the trained toy pair, end to end on the CPU.

    python scripts/toy_search.py [-o toy_search] [--pair DIR] [--workers 2]

1. the default toy pair (scripts/toy_pair.py, preset default, seed 0: the pair of
   `bash scripts/toy_study.sh`): taken from --pair, else from toy_study/default/seed-0/pair
   when that run exists, else trained into OUT/pair/ (7 to 14 min with the pinned math);
2. local lm-eval tasks over its 100 held-out problems, 16 repeats each
   (scripts/toy_lmeval_task.py): OUT/tasks/;
3. the plain recipe (`mergekit-timber recipe`): OUT/timber.yml;
4. `mergekit-timber search` with Ray embedded (2 CPU workers): lambdas 0, 0.2, 0.5, 0.8,
   the Instruct and the Base (on its plain prompts), temperature 1, k = 1, 4, 16:
   OUT/search/ (summary.md, passk.csv, best_lambda.csv, passk_vs_lambda.png, models/, evals/).
Writes OUT/timing.md: the search command's wall time. Re-running resumes (nothing redone).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pinned_math  # noqa: E402,F401,I001 - sets the pinned math for every process started below (Ray's too)

import argparse
import os
import subprocess
import time

REPO = Path(__file__).resolve().parent.parent
LAMBDAS, KS, REPEATS, MAX_GEN_TOKS = "0,0.2,0.5,0.8", "1,4,16", 16, 64


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=Path("toy_search"))
    p.add_argument("--pair", type=Path, help="a scripts/toy_pair.py output (default: the toy study's, or trained)")
    p.add_argument("--workers", type=int, default=2, help="evaluations at once (embedded Ray; default 2)")
    args = p.parse_args(argv)
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(out / "hf"), TOKENIZERS_PARALLELISM="false")

    pair = args.pair or REPO / "toy_study" / "default" / "seed-0" / "pair"
    if not (pair / "pair.json").exists():
        pair = out / "pair"
        if not (pair / "pair.json").exists():
            print(f"training the default toy pair into {pair} (7 to 14 min with the pinned math)", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, REPO / "scripts" / "toy_pair.py", pair, "--preset", "default",
                            "--seed", "0", "--threads", "1"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, REPO / "scripts" / "toy_lmeval_task.py", pair, out / "tasks",
                    "--repeats", str(REPEATS)], check=True, stdout=subprocess.DEVNULL)
    recipe = subprocess.run([tool("mergekit-timber"), "recipe", pair / "base", pair / "instruct"],
                            check=True, capture_output=True, text=True, env=env).stdout
    (out / "timber.yml").write_text(recipe)

    command = ["mergekit-timber", "search", "timber.yml", "-o", "search", "--lambdas", LAMBDAS,
               "--tasks", "toy_sums", "--base-tasks", "toy_sums_base", "--include-path", "tasks",
               "--max-gen-toks", str(MAX_GEN_TOKS), "--k", KS, "--workers", str(args.workers)]
    print("$ (cd", out, "&&", " ".join(command) + ")", file=sys.stderr, flush=True)
    start = time.time()
    subprocess.run([tool(command[0]), *command[1:]], check=True, cwd=out, env=env)
    seconds = time.time() - start
    models = len(LAMBDAS.split(",")) + 2
    (out / "timing.md").write_text(
        "| command | models | wall time |\n|---|---|---|\n"
        f"| `{' '.join(command)}` (Ray embedded, {args.workers} CPU workers) | {models} | {seconds:.0f} s |\n"
    )
    print(f"search: {seconds:.0f} s (written to {out / 'timing.md'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
