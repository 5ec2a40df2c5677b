#!/usr/bin/env python
"""Timber on pairs that were actually trained: train, merge, sample, score, analyse.

    python scripts/toy_study.py [-o toy_study] [--setting default|narrow|narrow-pg] [--smallest|--fast]

Settings (scripts/toy_pair.py has their presets):
  default  Instruct = Base fine-tuned (SFT) on one teacher answer style; seeds 0-4.
  narrow   Instruct = Base after rounds of rejection-sampling fine-tuning on its own correct
           samples (no teacher), on longer sums; seeds 0-4 (docs/toy_narrow_plan.md).
  narrow-pg  the same Base and problems; Instruct = one rejection-sampling round, then
           on-policy policy gradient with a 0/1 reward; seeds 0-4
           (docs/toy_narrow_pg_plan.md).
--smallest shrinks any setting (a smoke run), --fast the default one (a quick look).
Each run writes its own folder OUT/SETTING[-SIZE]/ and refuses one that already holds
files, so runs of different settings or sizes never mix.

Per seed, in OUT/NAME/seed-S/:
1. trains the Base/Instruct pair (scripts/toy_pair.py) unless --pair gives one: pair/;
2. merges it with the unmodified mergekit: `mergekit-yaml` for `timber_l`, `mergekit-timber
   sweep` for `timber` at the setting's lambdas (identical to one mergekit-yaml run per
   lambda): recipes/, models/;
3. samples every model on the held-out problems with scripts/sample.py (Base on plain
   prompts, Instruct and every Timber output through their chat template): samples/;
4. scores them with `mergekit-timber passk` (Pass@k, bootstrap bands): passk/; runs
   `mergekit-timber analyze` on the pair (eRank plots, summary.json): analyze/.
With several seeds, OUT/NAME/pooled/ scores the problems of all seeds together.
OUT/NAME/summary.md (also printed) holds the tables: precondition per seed (Instruct
Pass@1 above Base's, Base Pass@k above the Instruct's at the largest k, each outside the
95% bootstrap bands), Pass@k with bands and diversity per model, and `analyze` per pair.
The CPU math is pinned (scripts/pinned_math.py), so the numbers are the same on any x86-64
CPU; the summary names the CPU it ran on and the pinned settings.
Training and sampling show progress bars on a terminal and a line every few seconds in a
log; each seed's study.log (and OUT/NAME/study.log for the pooled scores) has every
command run and its standard output.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pinned_math  # noqa: E402,I001 - before torch: every process of the study takes the same math paths

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import importlib.metadata
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import time
from collections import defaultdict

import yaml

SCRIPTS = Path(__file__).resolve().parent
from answer_check import extract_boxed  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    preset: str  # toy_pair preset
    seeds: tuple[int, ...]
    lambdas: tuple[float, ...]
    n: int  # samples per problem
    bootstrap: int
    table_ks: tuple[int, ...]
    batch_size: int = 64  # sequences per generate() call; part of what fixes the samples
    max_new_tokens: int = 64
    # Passed to every model explicitly (none inherited from a generation_config.json): the
    # plans' top-k 50 was transformers' default before; it is now stated.
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0


FULL_SEEDS = (0, 1, 2, 3, 4)  # at least five: conclusions that one CPU or one seed decides are none


# Fixed in docs/toy_narrow_plan.md before any Timber merge of this setting was run.
NARROW = Setting("narrow", FULL_SEEDS, (0.2, 0.5, 0.8), n=32, bootstrap=1000, table_ks=(1, 4, 16, 32),
                 batch_size=256, max_new_tokens=96)
NARROW_SMALLEST = Setting("narrow-smallest", (0, 1), (0.5,), n=4, bootstrap=50, table_ks=(1, 4),
                          batch_size=256, max_new_tokens=48)
SETTINGS = {
    "default": Setting("default", FULL_SEEDS, (0.2, 0.5, 0.8), n=32, bootstrap=1000, table_ks=(1, 4, 16, 32)),
    "default-fast": Setting("fast", (0,), (0.2, 0.5, 0.8), n=16, bootstrap=200, table_ks=(1, 4, 16)),
    "default-smallest": Setting("smallest", (0,), (0.5,), n=4, bootstrap=50, table_ks=(1, 4)),
    "narrow": NARROW,
    "narrow-smallest": NARROW_SMALLEST,
    # Fixed in docs/toy_narrow_pg_plan.md before any Timber merge of this setting was run:
    # the narrow setting's evaluation unchanged, only the post-training (the preset) differs.
    "narrow-pg": dataclasses.replace(NARROW, preset="narrow-pg"),
    "narrow-pg-smallest": dataclasses.replace(NARROW_SMALLEST, preset="narrow-pg-smallest"),
}
SIZES = ("full", "fast", "smallest")
TEMPERATURE = 1.0
CONFIDENCE = 0.95


def setting_name(setting: str, size: str) -> str:
    return setting if size == "full" else f"{setting}-{size}"


def bin_path(name: str) -> str:
    """A console script installed beside this interpreter (the venv's), else from PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: list, env: dict, log: Path) -> str:
    """Run one step as a user would: its progress (stderr) shows as it comes, its standard
    output goes to LOG and is returned; stop on failure."""
    name = Path(str(args[1] if args[0] == sys.executable else args[0])).name
    start = time.time()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(map(str, args))}\n")
    proc = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, text=True, env=env)
    with open(log, "a", encoding="utf-8") as f:
        f.write(proc.stdout + "\n")
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed ({proc.returncode}); its messages are above, "
                         f"its output in {log}:\n{proc.stdout[-2000:]}")
    say(f"  {name}: {time.time() - start:.0f} s")
    return proc.stdout


def recipe(method: str, base: Path, instruct: Path, lam: float | None) -> dict:
    """A plain mergekit recipe: nothing but the pair and the method's parameters."""
    config = {"merge_method": method, "base_model": str(base), "models": [{"model": str(instruct)}]}
    if lam is not None:
        config["parameters"] = {"lambda": lam}
    return config


def write_recipe(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def merge(setting: Setting, pair: Path, out: Path, env: dict, log: Path) -> dict[str, Path]:
    """Every model of the study: the pair, timber_l, and timber at each lambda (one sweep)."""
    base, instruct = pair / "base", pair / "instruct"
    models = {"base": base, "instruct": instruct, "timber_l": out / "models" / "timber_l"}
    run([bin_path("mergekit-yaml"), write_recipe(out / "recipes" / "timber_l.yml",
                                                 recipe("timber_l", base, instruct, None)),
         models["timber_l"]], env, log)
    lambdas = ",".join(f"{lam:g}" for lam in setting.lambdas)
    sweep = write_recipe(out / "recipes" / "timber.yml", recipe("timber", base, instruct, setting.lambdas[0]))
    run([bin_path("mergekit-timber"), "sweep", sweep, out / "models" / "timber", "--lambdas", lambdas], env, log)
    for lam in setting.lambdas:
        models[f"timber-{lam:g}"] = out / "models" / "timber" / f"lambda-{lam:g}"
    return models


def sample_all(setting: Setting, seed: int, pair: Path, models: dict[str, Path], out: Path,
               log: Path) -> dict[str, Path]:
    """scripts/sample.py for every model, in this process (one start-up of torch and
    transformers instead of one per model; the samples are the same)."""
    import sample

    samples = {}
    for label, model in models.items():
        samples[label] = out / "samples" / f"{label}.jsonl"
        chat = label != "base"  # Base is a plain-text model: no chat template
        args = ["--model", model, "--label", label, "-o", samples[label],
                "--prompts", pair / ("heldout_chat.jsonl" if chat else "heldout_base.jsonl"),
                "--n", setting.n, "--temperature", TEMPERATURE, "--top-p", setting.top_p, "--top-k", setting.top_k,
                "--min-p", setting.min_p, "--max-new-tokens", setting.max_new_tokens,
                "--batch-size", setting.batch_size, "--checker", "boxed", "--seed", seed, "--device", "cpu"]
        args += ["--chat"] if chat else []
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ python scripts/sample.py {' '.join(map(str, args))}\n")
        start = time.time()
        sample.main([str(a) for a in args])
        say(f"  sample.py {label}: {time.time() - start:.0f} s")
    return samples


def timber_cli(args: list, log: Path) -> str:
    """`mergekit-timber ARGS` in this process (passk, analyze: saves a start-up of torch
    per call); its standard output goes to LOG and is returned."""
    import click

    from mergekit_timber.cli import main as timber_main

    args = [str(a) for a in args]
    start, captured = time.time(), io.StringIO()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ mergekit-timber {' '.join(args)}\n")
    try:
        with contextlib.redirect_stdout(captured):
            timber_main.main(args, standalone_mode=False)
    except click.ClickException as error:
        raise SystemExit(f"error: mergekit-timber {args[0]} failed: {error.format_message()}") from None
    with open(log, "a", encoding="utf-8") as f:
        f.write(captured.getvalue() + "\n")
    say(f"  mergekit-timber {args[0]}: {time.time() - start:.0f} s")
    return captured.getvalue()


def passk(setting: Setting, samples: dict[str, Path], out: Path, seed: int, log: Path) -> Path:
    timber_cli(["passk", *samples.values(), "-o", out, "--models", ",".join(samples),
                "--bootstrap", setting.bootstrap, "--seed", seed, "--confidence", CONFIDENCE], log)
    return out / "passk.csv"


def pool_samples(per_seed: dict[int, dict[str, Path]], out: Path) -> dict[str, Path]:
    """One records file per model with every seed's problems, renamed seed-S/PROBLEM."""
    pooled = {}
    out.mkdir(parents=True, exist_ok=True)
    for label in next(iter(per_seed.values())):
        pooled[label] = out / f"{label}.jsonl"
        with open(pooled[label], "w", encoding="utf-8") as f:
            for seed, samples in per_seed.items():
                for line in samples[label].read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    record["problem"] = f"seed-{seed}/{record['problem']}"
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return pooled


# --------------------------------------------------------------------------- tables


def read_passk(path: Path) -> dict[tuple[str, int], tuple[float, float, float]]:
    """(model, k) -> (Pass@k, band low, band high), in %."""
    with open(path, encoding="utf-8") as f:
        return {(row["model"], int(row["k"])): tuple(100 * float(row[c]) for c in ("pass_at_k", "ci_low", "ci_high"))
                for row in csv.DictReader(f)}


def cell(value: tuple[float, float, float] | None) -> str:
    return "" if value is None else f"{value[0]:.1f} [{value[1]:.1f}, {value[2]:.1f}]"


def diversity(records: list[Path]) -> tuple[float, float]:
    """Mean distinct completions and mean distinct final answers per problem."""
    completions, answers = defaultdict(set), defaultdict(set)
    for path in records:
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            key = (str(path), r["problem"])
            completions[key].add(" ".join(r["completion"].split()))
            answers[key].add(extract_boxed(r["completion"]))
    problems = len(completions)
    return (sum(map(len, completions.values())) / problems, sum(map(len, answers.values())) / problems)


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def precondition(scores: dict, k_max: int) -> tuple[bool, bool]:
    """(Instruct Pass@1 above Base's, Base Pass@k_max above the Instruct's), bands apart."""
    base1, inst1 = scores[("base", 1)], scores[("instruct", 1)]
    base_k, inst_k = scores[("base", k_max)], scores[("instruct", k_max)]
    return inst1[1] > base1[2], base_k[1] > inst_k[2]


def precondition_table(per_seed: dict[int, dict], k_max: int, pooled: dict | None) -> str:
    """One row per seed and, with several seeds, one for all seeds' problems together;
    then how many seeds meet it (the plans judge it per seed and pooled)."""
    rows, met = [], 0
    for seed, scores in list(per_seed.items()) + ([("pooled", pooled)] if pooled else []):
        sharper, narrower = precondition(scores, k_max)
        met += sharper and narrower and seed != "pooled"
        verdict = "met" if sharper and narrower else "not met (" + ", ".join(
            what for what, ok in (("Pass@1", sharper), (f"Pass@{k_max}", narrower)) if not ok) + ")"
        rows.append([str(seed), cell(scores[("base", 1)]), cell(scores[("instruct", 1)]),
                     cell(scores[("base", k_max)]), cell(scores[("instruct", k_max)]), verdict])
    table = markdown(["seed", "base Pass@1", "instruct Pass@1", f"base Pass@{k_max}", f"instruct Pass@{k_max}",
                      "precondition"], rows)
    return table + (f"\n\nMet on {met} of {len(per_seed)} seeds." if pooled else "")


def spread(values: list[float]) -> str:
    """Mean, standard deviation and range over seeds, in %."""
    return (f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} "
            f"({min(values):.1f}-{max(values):.1f})")


def results_table(setting: Setting, scores: dict, per_seed_scores: dict[int, dict],
                  samples: dict[int, dict[str, Path]]) -> str:
    ks, k_max = setting.table_ks, setting.table_ks[-1]
    several = len(per_seed_scores) > 1
    head = ["model"] + [f"Pass@{k}" for k in ks]
    head += [f"Pass@1 over seeds", f"Pass@{k_max} over seeds"] if several else []
    head += ["distinct completions", "distinct answers"]
    rows = []
    for label in next(iter(samples.values())):
        row = [label] + [cell(scores.get((label, k))) for k in ks]
        if several:
            row += [spread([s[(label, k)][0] for s in per_seed_scores.values()]) for k in (1, k_max)]
        distinct, answers = diversity([by_label[label] for by_label in samples.values()])
        rows.append(row + [f"{distinct:.1f}", f"{answers:.1f}"])
    return markdown(head, rows)


def seed_table(setting: Setting, per_seed_scores: dict[int, dict]) -> str:
    """Each model's Pass@1 and Pass@k_max minus the Instruct's, seed by seed, and how many
    seeds put it above (below) the Instruct's band: whether the seeds agree."""
    k_max = setting.table_ks[-1]
    labels = [label for label in dict.fromkeys(m for s in per_seed_scores.values() for m, _ in s)
              if label not in ("base", "instruct")]
    rows = []
    for label in labels:
        row = [label]
        for k in (1, k_max):
            diffs = [s[(label, k)][0] - s[("instruct", k)][0] for s in per_seed_scores.values()]
            above = sum(s[(label, k)][1] > s[("instruct", k)][2] for s in per_seed_scores.values())
            below = sum(s[(label, k)][2] < s[("instruct", k)][1] for s in per_seed_scores.values())
            row += [" / ".join(f"{d:+.1f}" for d in diffs), f"{above} / {below}"]
        rows.append(row)
    return markdown(["model", "Pass@1 minus instruct, per seed", "bands above / below",
                     f"Pass@{k_max} minus instruct, per seed", "bands above / below"], rows)


def number(value: float | None, percent: bool = False) -> str:
    """summary.json writes NaN (no matrix had it) as null."""
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}"


def analyze_table(analyses: dict[int, Path]) -> str:
    rows = []
    for seed, path in analyses.items():
        s = json.loads(path.read_text())
        rows.append([str(seed)] + [number(s[key]) for key in (
            "median_erank_ratio_base", "median_erank_ratio_instruct", "median_erank_ratio_delta",
            "median_k_ratio")] + [number(s["mean_energy_kept"], percent=True)])
    return markdown(["seed", "eRank/rank Base", "eRank/rank Instruct", "eRank/rank delta", "K/rank",
                     "delta energy in the head"], rows)


def versions() -> str:
    import torch

    names = ("transformers", "mergekit", "mergekit-timber")
    found = [f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"] + [f"{n} {importlib.metadata.version(n)}" for n in names]
    return ", ".join(found) + f", Python {sys.version_info.major}.{sys.version_info.minor}"


def describe(name: str, setting: Setting, pair_info: dict, threads: int) -> str:
    rounds = len(pair_info.get("rft_rounds") or ())
    if pair_info.get("pg"):
        post = (f"{rounds} round{'s' * (rounds > 1)} of rejection-sampling fine-tuning on its own correct samples, "
                f"then {pair_info['pg']['steps']} steps of policy gradient with a 0/1 reward on its own samples")
    elif rounds:
        post = f"{rounds} rounds of rejection-sampling fine-tuning on its own correct samples"
    else:
        post = "SFT on one teacher answer style"
    lengths = pair_info["settings"].get("lengths", (3, 4, 5))  # a pair.json from before the narrow setting
    seeds = ", ".join(map(str, setting.seeds))
    if len(setting.seeds) > 2 and setting.seeds == tuple(range(setting.seeds[0], setting.seeds[-1] + 1)):
        seeds = f"{setting.seeds[0]}-{setting.seeds[-1]}"
    return (f"Toy setting `{name}`: {pair_info['parameters']} parameters (preset {pair_info['preset']}), sums of "
            f"{lengths[0]} to {lengths[-1]} digits, Instruct = Base + {post}; seed{'s' * (len(setting.seeds) > 1)} "
            f"{seeds}; {pair_info['settings']['held_out']} held-out problems per seed, {setting.n} samples per "
            f"problem at temperature {TEMPERATURE:g}, top_p {setting.top_p:g}, top_k {setting.top_k}, min_p "
            f"{setting.min_p:g} (every model alike). Pass@k in %, [95% bootstrap band over problems]. "
            f"Measured with {versions()}; {pinned_math.describe(threads)}.")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=Path("toy_study"),
                   help="parent directory; the run writes OUTPUT/SETTING[-SIZE]/ (default toy_study/)")
    p.add_argument("--setting", choices=("default", "narrow", "narrow-pg"), default="default",
                   help="default: SFT Instruct; narrow: rejection-sampling Instruct; narrow-pg: "
                        "policy-gradient Instruct; 5 seeds each")
    p.add_argument("--size", choices=SIZES, default="full", help="full (default), fast, smallest")
    p.add_argument("--smallest", action="store_const", const="smallest", dest="size", help="same as --size smallest")
    p.add_argument("--fast", action="store_const", const="fast", dest="size", help="same as --size fast")
    p.add_argument("--pair", type=Path,
                   help="use this toy_pair.py output (base/, instruct/, heldout_*.jsonl) instead of training (one seed)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the setting's)")
    p.add_argument("--precondition-only", action="store_true",
                   help="train and score Base and Instruct only, no merge: check a setting's precondition "
                        "before any Timber run (writes OUTPUT/SETTING[-SIZE]-precondition/)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="seeds run at once, one process each (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per step (default 1; results depend on it)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be at least 1")
    args.name = setting_name(args.setting, args.size)
    if args.name not in SETTINGS:
        sizes = [size for size in SIZES if setting_name(args.setting, size) in SETTINGS]
        p.error(f"setting {args.setting} has no {args.size} size; its sizes: {', '.join(sizes)}")
    seeds = SETTINGS[args.name].seeds
    args.folder = args.name + ("-precondition" if args.precondition_only else "")
    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.pair and len(seeds) != 1:
        p.error(f"--pair gives one pair; setting {args.name} has seeds {seeds}: add --seeds with one seed")
    args.seed_list = seeds
    return args


def run_seed(args: argparse.Namespace, setting: Setting, root: Path, seed: int) -> dict:
    """Train (or take) one pair, merge it, sample and score every model: ROOT/seed-SEED/."""
    pinned_math.pin_torch(args.threads)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # in-process sampling too
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = root / f"seed-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    pair = args.pair.resolve() if args.pair else out / "pair"
    if not args.pair:
        say(f"[seed {seed}] training the {setting.preset} pair")
        run([sys.executable, SCRIPTS / "toy_pair.py", pair, "--preset", setting.preset, "--seed", seed,
             "--threads", args.threads], env, log)
    if args.precondition_only:
        models = {"base": pair / "base", "instruct": pair / "instruct"}
    else:
        say(f"[seed {seed}] merging with mergekit-yaml and mergekit-timber sweep")
        models = merge(setting, pair, out, env, log)
    say(f"[seed {seed}] sampling n={setting.n} per problem")
    samples = sample_all(setting, seed, pair, models, out, log)
    say(f"[seed {seed}] scoring and analysing")
    result = {"samples": samples, "scores": read_passk(passk(setting, samples, out / "passk", seed, log)),
              "pair": json.loads((pair / "pair.json").read_text())}
    if not args.precondition_only:
        timber_cli(["analyze", pair / "base", pair / "instruct", "-o", out / "analyze",
                    "--lambda", setting.lambdas[0]], log)
        result["analysis"] = out / "analyze" / "summary.json"
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setting = dataclasses.replace(SETTINGS[args.name], seeds=args.seed_list)
    root = (args.output / args.folder).resolve()
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: {root} already holds a run of setting {args.name}; "
                         f"choose another -o or move that folder away")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "study.log"
    log.write_text("")
    start = time.time()
    jobs = min(args.jobs, len(setting.seeds))
    if jobs > 1:
        # One process per seed, each on its own threads: the same numbers as one after the
        # other. Their progress bars would overwrite each other: progress lines instead.
        os.environ["TOY_PROGRESS"] = "lines"
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {seed: pool.submit(run_seed, args, setting, root, seed) for seed in setting.seeds}
            results = {seed: future.result() for seed, future in futures.items()}
    else:
        results = {seed: run_seed(args, setting, root, seed) for seed in setting.seeds}
    samples = {seed: r["samples"] for seed, r in results.items()}
    scores = {seed: r["scores"] for seed, r in results.items()}
    analyses = {seed: r["analysis"] for seed, r in results.items() if "analysis" in r}
    pair_info = results[setting.seeds[-1]]["pair"]

    if len(setting.seeds) > 1:
        say(f"scoring the {len(setting.seeds)} seeds' problems together")
        pooled = pool_samples(samples, root / "pooled" / "samples")
        overall = read_passk(passk(setting, pooled, root / "pooled" / "passk", setting.seeds[0], log))
        curve = root / "pooled" / "passk" / "passk.png"
    else:
        overall, curve = scores[setting.seeds[0]], root / f"seed-{setting.seeds[0]}" / "passk" / "passk.png"

    k_max = setting.table_ks[-1]
    several = len(setting.seeds) > 1
    text = "\n\n".join([
        describe(args.name, setting, pair_info, args.threads),
        "Precondition (Instruct Pass@1 above Base's and Base Pass@"
        f"{k_max} above the Instruct's, each with the 95% bands apart):",
        precondition_table(scores, k_max, overall if several else None),
        ("All seeds' problems scored together (band over those problems); over seeds: mean ± standard "
         "deviation (range) of the seeds' values; " if several else "")
        + "distinct: mean distinct completions / final answers per problem:",
        results_table(setting, overall, scores, samples),
    ] + ([] if args.precondition_only or not several else [
        "Each Timber model against the Instruct, seed by seed (points of Pass@k), and on how many seeds "
        "its 95% band lies above / below the Instruct's:",
        seed_table(setting, scores),
    ]) + ([] if args.precondition_only else [
        "`mergekit-timber analyze` on each pair (medians over the matrices; head energy: mean share of "
        "the delta's energy in the top K directions):",
        analyze_table(analyses),
    ]) + [
        # The one line that differs between machines; scripts/check_readme.py does not compare it.
        f"Machine: {pinned_math.cpu_model()}.",
    ]) + "\n"
    (root / "summary.md").write_text(text)
    print(text, end="")
    say(f"wrote {root / 'summary.md'}, {curve} and the analyze plots in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
