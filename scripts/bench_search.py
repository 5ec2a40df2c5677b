#!/usr/bin/env python
"""Benchmark of `mergekit-timber search` on the toy pair: Ray against one process, 1 and 2 workers.

    python scripts/bench_search.py [--pair DIR] [--problems 100] [--repeats 16] [-o bench-out/search]

Three runs of the same search (the default toy pair, lambdas 0, 0.2, 0.5, 0.8, Instruct and
Base: one sweep and six lm-eval evaluations, the same settings), each from nothing in its own
folder and its own process, timed from the process's start to its result:
- sequential: the same sweep, then each evaluation one after another in one process (no
  Ray), one torch thread as each Ray worker below (more threads would change the floating-
  point sums, hence the samples; and a 0.45 M-parameter model has little work to split);
- search, 1 worker: `run_search` with Ray embedded on 1 CPU (one evaluation at a time);
- search, 2 workers: the same on 2 CPUs (two evaluations at a time, one thread each).
Prints (and writes to OUT/bench.md) a table with the ratios (sequential / search with 2
workers; 1 worker / 2 workers); the load average around each run goes to stderr. All three
write the same samples (same seeds and batches; checked). The pair comes from --pair,
toy_search/pair, toy_study/default/seed-0/pair, or is trained (7 to 14 min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAMBDAS = (0.0, 0.2, 0.5, 0.8)
RUNS = ("sequential", "workers-1", "workers-2")


def find_pair(given: Path | None, out: Path) -> Path:
    for pair in (given, REPO / "toy_search" / "pair", REPO / "toy_study" / "default" / "seed-0" / "pair", out / "pair"):
        if pair is not None and (pair / "pair.json").exists():
            return pair
    pair = out / "pair"
    print(f"training the default toy pair into {pair} (7 to 14 min with the pinned math)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, REPO / "scripts" / "toy_pair.py", pair, "--preset", "default", "--seed", "0"],
                   check=True, stdout=subprocess.DEVNULL)
    return pair


def request_for(work: Path, threads: int, workers: int):
    from mergekit_timber.tools.search import SearchRequest
    from mergekit_timber.tools.search_eval import Sampling

    return SearchRequest(
        recipe=work / "timber.yml", out=work / "out", lambdas=LAMBDAS, tasks=("toy_sums",),
        base_tasks=("toy_sums_base",), with_base=True, include_path=work.parent / "tasks", ks=(1, 4),
        sampling=Sampling(max_gen_toks=64), repeats=None, num_fewshot=None, limit=None, batch_size=16,
        backend="hf", device="cpu", dtype="auto", threads=threads, workers=workers, address=None,
        bootstrap=200, confidence=0.95,
    )


def one_run(kind: str, work: Path) -> None:
    """In a child process: the search, or the same work one after another without Ray."""
    from mergekit.options import MergeOptions

    from mergekit_timber.tools import search
    from mergekit_timber.tools.search_eval import evaluate
    from mergekit_timber.tools.search_report import report

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    options = MergeOptions()
    if kind == "sequential":
        request = request_for(work, threads=1, workers=1)
        base, instruct = search.validate(request)
        lambdas = search.sweep_missing(request, options, say)
        models = [search.Model("base", base, None), *lambdas, search.Model("instruct", instruct, None)]
        jobs = search.build_jobs(request, models, "cpu", "hf")
        for job in jobs:
            evaluate(job)
            say(f"evaluation of {job.label}: done")
        report(jobs, {m.label: m.lam for m in lambdas}, request.ks, request.bootstrap, request.confidence,
               search.BOOTSTRAP_SEED, request.out, say)
    else:
        workers = int(kind.split("-")[1])
        search.run_search(request_for(work, threads=1, workers=workers), options, say)


def samples_of(work: Path) -> dict:
    """Every model's completions, to check the three runs sampled the same."""
    found = {}
    for record in sorted((work / "out" / "evals").glob("*/record.json")):
        data = json.loads(record.read_text())
        for task, name in data["samples"].items():
            lines = (record.parent / name).read_text().splitlines()
            found[(data["label"], task)] = [json.loads(line)["resps"] for line in lines]
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=Path("bench-out/search"))
    p.add_argument("--pair", type=Path)
    p.add_argument("--problems", type=int, default=100, help="held-out problems used (default 100: all)")
    p.add_argument("--repeats", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # a child's run
    args = p.parse_args(argv)
    out = args.output.resolve()
    if args.one:
        one_run(args.one, out / args.one)
        return 0

    import shutil

    sys.path.insert(0, str(REPO / "scripts"))
    import toy_lmeval_task

    if out.exists():
        for kind in RUNS:
            shutil.rmtree(out / kind, ignore_errors=True)  # this script's own runs: each starts from nothing
    out.mkdir(parents=True, exist_ok=True)
    pair = find_pair(args.pair, out)
    toy_lmeval_task.write_tasks(pair, out / "tasks", args.repeats, args.problems)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(out / "hf"), TOKENIZERS_PARALLELISM="false")
    seconds, loads = {}, {}
    for kind in RUNS:
        work = out / kind
        work.mkdir(parents=True)
        (work / "timber.yml").write_text(
            f"merge_method: timber\nbase_model: {pair / 'base'}\nmodels:\n  - model: {pair / 'instruct'}\n")
        before = os.getloadavg()[0]
        start = time.time()
        with open(work / "run.log", "w") as log:
            subprocess.run([sys.executable, __file__, "-o", out, "--one", kind], check=True, env=env,
                           stdout=log, stderr=subprocess.STDOUT)
        seconds[kind] = time.time() - start
        loads[kind] = (before, os.getloadavg()[0])
        print(f"{kind}: {seconds[kind]:.1f} s", file=sys.stderr, flush=True)
    same = samples_of(out / "sequential") == samples_of(out / "workers-1") == samples_of(out / "workers-2")

    lines = []
    rows = [("sequential: sweep + 6 evaluations one after another, one process, no Ray", "sequential"),
            ("`run_search`, Ray embedded, 1 CPU worker", "workers-1"),
            ("`run_search`, Ray embedded, 2 CPU workers", "workers-2")]
    lines.append(f"Toy pair, {len(LAMBDAS)} lambdas + Instruct + Base, {args.problems} problems x {args.repeats}"
                 f" samples, max 64 new tokens; {os.cpu_count()} cores. Same samples in all three runs:"
                 f" {'yes' if same else 'NO'}.\n")
    lines.append("| run | wall time |\n|---|---|")
    for text, kind in rows:
        lines.append(f"| {text} | {seconds[kind]:.1f} s |")
        # The load says how busy the cores were (not in the file: it varies too much to compare).
        print(f"{kind}: load average {loads[kind][0]:.1f} before, {loads[kind][1]:.1f} after", file=sys.stderr)
    lines.append(f"\nsequential / search with 2 workers: {seconds['sequential'] / seconds['workers-2']:.2f}x; "
                 f"1 worker / 2 workers: {seconds['workers-1'] / seconds['workers-2']:.2f}x")
    text = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(text)
    print(text, end="")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
