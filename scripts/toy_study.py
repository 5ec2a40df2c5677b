#!/usr/bin/env python
"""Timber on a pair that was actually trained: train, merge, sample, score, analyse.

    python scripts/toy_study.py [-o toy_study] [--setting default|fast|smallest] [--smallest]

1. trains a tiny Qwen3 Base/Instruct pair (scripts/toy_pair.py) unless --pair gives one;
2. merges it with the unmodified `mergekit-yaml`: `timber_l` and `timber` at each lambda;
3. samples every model on the held-out problems with scripts/sample.py (Base on plain
   prompts, Instruct and every Timber output through their chat template);
4. scores them with `mergekit-timber passk` (Pass@k curves, bootstrap bands) and runs
   `mergekit-timber analyze` on the pair (eRank plots);
5. prints a table (also written as OUT/summary.md) with Pass@k and the mean number of
   distinct completions and distinct final answers per problem (diversity).

Outputs: OUT/pair/, OUT/recipes/*.yml, OUT/models/*, OUT/samples/*.jsonl,
OUT/passk/passk.{csv,png}, OUT/analyze/*.png, OUT/summary.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from answer_check import extract_boxed  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    preset: str  # toy_pair preset
    lambdas: tuple[float, ...]
    n: int  # samples per problem
    bootstrap: int
    table_ks: tuple[int, ...]


SETTINGS = {
    "default": Setting("default", (0.2, 0.5, 0.8), n=32, bootstrap=1000, table_ks=(1, 4, 16, 32)),
    "fast": Setting("fast", (0.2, 0.5, 0.8), n=16, bootstrap=200, table_ks=(1, 4, 16)),
    "smallest": Setting("smallest", (0.5,), n=4, bootstrap=50, table_ks=(1, 4)),
}
TEMPERATURE = 1.0
MAX_NEW_TOKENS = 64


def bin_path(name: str) -> str:
    """A console script installed beside this interpreter (the venv's), else from PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def run(args: list, env: dict, log: Path) -> str:
    """Run one step as a user would; its output goes to LOG; stop on failure."""
    name = Path(str(args[1] if args[0] == sys.executable else args[0])).name
    start = time.time()
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed ({proc.returncode}); "
                         f"last output:\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"  {name}: {time.time() - start:.0f} s", file=sys.stderr)
    return proc.stdout


def recipe(method: str, base: Path, instruct: Path, lam: float | None) -> dict:
    """A plain mergekit recipe: nothing but the pair and the method's parameters."""
    config = {"merge_method": method, "base_model": str(base), "models": [{"model": str(instruct)}]}
    if lam is not None:
        config["parameters"] = {"lambda": lam}
    return config


def merged_models(setting: Setting) -> list[tuple[str, str, float | None]]:
    """(label, method, lambda) of every Timber model of the study."""
    return [("timber_l", "timber_l", None)] + [(f"timber-{lam:g}", "timber", lam) for lam in setting.lambdas]


def diversity(records_path: Path) -> tuple[float, float]:
    """Mean distinct completions and mean distinct final answers per problem."""
    completions, answers = defaultdict(set), defaultdict(set)
    with open(records_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            completions[r["problem"]].add(" ".join(r["completion"].split()))
            answers[r["problem"]].add(extract_boxed(r["completion"]))
    problems = len(completions)
    return (sum(map(len, completions.values())) / problems, sum(map(len, answers.values())) / problems)


def summary_table(passk_csv: Path, labels: list[str], ks: tuple[int, ...], samples: dict[str, Path]) -> str:
    """Markdown: Pass@k [95% band] per model and k, and the diversity columns."""
    cells: dict[tuple[str, int], str] = {}
    with open(passk_csv, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            k = int(row["k"])
            if k in ks:
                value, low, high = (100 * float(row[c]) for c in ("pass_at_k", "ci_low", "ci_high"))
                cells[(row["model"], k)] = f"{value:.1f} [{low:.1f}, {high:.1f}]"
    head = ["model"] + [f"Pass@{k}" for k in ks] + ["distinct completions", "distinct answers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        distinct, answers = diversity(samples[label])
        row = [label] + [cells.get((label, k), "") for k in ks] + [f"{distinct:.1f}", f"{answers:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=Path("toy_study"), help="output directory (default toy_study/)")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="default",
                   help="default: about 10 minutes on 2 cores; fast; smallest: a smoke run")
    p.add_argument("--smallest", action="store_const", const="smallest", dest="setting", help="same as --setting smallest")
    p.add_argument("--pair", type=Path, help="use this toy_pair.py output (base/, instruct/, heldout_*.jsonl) instead of training")
    p.add_argument("--seed", type=int, default=0, help="seed of training, sampling and bootstrap")
    p.add_argument("--threads", type=int, default=1, help="torch threads per step (default 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setting = SETTINGS[args.setting]
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    log.write_text("")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    python = sys.executable
    start = time.time()

    pair = args.pair.resolve() if args.pair else out / "pair"
    if not args.pair:
        print(f"training the {setting.preset} pair", file=sys.stderr)
        run([python, SCRIPTS / "toy_pair.py", pair, "--preset", setting.preset, "--seed", args.seed,
             "--threads", args.threads], env, log)
    base, instruct = pair / "base", pair / "instruct"

    print("merging with mergekit-yaml", file=sys.stderr)
    models = {"base": base, "instruct": instruct}
    for label, method, lam in merged_models(setting):
        config = out / "recipes" / f"{label}.yml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(recipe(method, base, instruct, lam), sort_keys=False))
        models[label] = out / "models" / label
        run([bin_path("mergekit-yaml"), config, models[label]], env, log)

    print(f"sampling n={setting.n} per problem", file=sys.stderr)
    samples = {}
    for label, model in models.items():
        samples[label] = out / "samples" / f"{label}.jsonl"
        chat = label != "base"  # Base is a plain-text model: no chat template
        run([python, SCRIPTS / "sample.py", "--model", model, "--label", label, "-o", samples[label],
             "--prompts", pair / ("heldout_chat.jsonl" if chat else "heldout_base.jsonl"),
             "--n", setting.n, "--temperature", TEMPERATURE, "--max-new-tokens", MAX_NEW_TOKENS,
             "--batch-size", 64, "--checker", "boxed", "--seed", args.seed, "--device", "cpu"]
            + (["--chat"] if chat else []), env, log)

    print("scoring and analysing", file=sys.stderr)
    labels = list(models)
    passk_out = run([bin_path("mergekit-timber"), "passk", *samples.values(), "-o", out / "passk",
                     "--models", ",".join(labels), "--bootstrap", setting.bootstrap, "--seed", args.seed],
                    env, log)
    analyze_out = run([bin_path("mergekit-timber"), "analyze", base, instruct, "-o", out / "analyze",
                       "--lambda", setting.lambdas[0]], env, log)

    table = summary_table(out / "passk" / "passk.csv", labels, setting.table_ks, samples)
    pair_info = json.loads((pair / "pair.json").read_text())
    (out / "summary.md").write_text(
        f"Toy pair: preset {pair_info['preset']}, seed {pair_info['seed']}, "
        f"{pair_info['parameters']} parameters; {setting.n} samples per problem at temperature "
        f"{TEMPERATURE:g}; Pass@k in % with 95% bootstrap bands over problems.\n\n{table}\n"
    )
    print(passk_out)
    print(analyze_out)
    print(table)
    print(f"\nwrote {out / 'summary.md'}, {out / 'passk' / 'passk.png'} and {out / 'analyze'}/*.png "
          f"in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
