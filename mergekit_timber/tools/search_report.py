"""Pass@k against lambda from a search's lm-eval samples: table, plot, best lambda per k.

Every model's samples are read with mergekit_timber.tools.passk (the estimator and the bootstrap
bands of `mergekit-timber passk`); all models share the bootstrap's seed, so their bands
are over the same resampled problems, and the difference between the best lambda and the
Instruct model gets its own paired band.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from mergekit_timber.tools import passk as pk
from mergekit_timber.errors import TimberInputError
from mergekit_timber.tools.search_eval import EvalJob, sample_files

BEST_COLUMNS = ("k", "best_lambda", "pass_at_k", "ci_low", "ci_high", "instruct", "diff_vs_instruct",
                "diff_low", "diff_high")


@dataclasses.dataclass(frozen=True)
class Best:
    k: int
    lam: float
    curve: pk.Curve  # of the best lambda
    instruct: Optional[float]  # the Instruct's Pass@k
    diff: Optional[tuple]  # (best - instruct, band low, band high)


def read_counts(jobs: Sequence[EvalJob], warn: Callable[[str], None]) -> List[pk.ModelCounts]:
    """Each model's correct counts per problem; a Base that ran a variant of a task is scored
    under the task's own name (same documents, same order), so every model has the same problems."""
    tallies = []
    for job in jobs:
        for task, path in sample_files(Path(job.out)).items():
            as_task = job.as_tasks[job.tasks.index(task)]
            for tally in pk.read_tallies([path], fmt="lm-eval", label=job.label, warn=warn):
                doc_id = tally.problem.rsplit("/", 1)[-1]  # "<task>/<doc_id>", or "<doc_id>" if renamed
                tallies.append(dataclasses.replace(tally, problem=f"{as_task}/{doc_id}"))
    try:
        return pk.group_counts(tallies, [job.label for job in jobs])
    except pk.PasskError as error:
        raise TimberInputError(f"search: {error}") from None


def curves_of(counts: Sequence[pk.ModelCounts], ks: Optional[Sequence[int]], resamples: int,
              confidence: float, seed: int) -> List[pk.Curve]:
    return [pk.compute_curve(mc, ks, resamples, confidence, seed) for mc in counts]


def value_at(curve: pk.Curve, k: int) -> Optional[int]:
    hit = np.nonzero(curve.k == k)[0]
    return int(hit[0]) if hit.size else None


def best_per_k(counts: Dict[str, pk.ModelCounts], curves: Dict[str, pk.Curve], lambdas: Dict[str, float],
               ks: Sequence[int], resamples: int, confidence: float, seed: int) -> List[Best]:
    """At each k the lambda with the highest Pass@k, and its paired difference to the Instruct."""
    found = []
    for k in ks:
        scored = [(curves[label].pass_at_k[j], label) for label in lambdas
                  if (j := value_at(curves[label], k)) is not None]
        if not scored:
            continue
        _, label = max(scored, key=lambda item: (item[0], -lambdas[item[1]]))  # ties: the smaller lambda
        instruct, diff = None, None
        if "instruct" in curves and (j := value_at(curves["instruct"], k)) is not None:
            instruct = float(curves["instruct"].pass_at_k[j])
            delta = (pk.pass_at_k_matrix(counts[label].n, counts[label].correct, [k])
                     - pk.pass_at_k_matrix(counts["instruct"].n, counts["instruct"].correct, [k]))
            low, high = pk.bootstrap_ci(delta, resamples, confidence, seed) if resamples else ([np.nan], [np.nan])
            diff = (float(delta.mean()), float(low[0]), float(high[0]))
        found.append(Best(k, lambdas[label], curves[label], instruct, diff))
    return found


def percent(curve: pk.Curve, k: int) -> str:
    j = value_at(curve, k)
    if j is None:
        return "-"
    text = f"{100 * curve.pass_at_k[j]:.1f}"
    if not np.isnan(curve.ci_low[j]):
        text += f" [{100 * curve.ci_low[j]:.1f}, {100 * curve.ci_high[j]:.1f}]"
    return text


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def summary_text(curves: Sequence[pk.Curve], lambdas: Dict[str, float], bests: Sequence[Best],
                 ks: Sequence[int], confidence: float, tasks: Sequence[str]) -> str:
    n = max(c.n for c in curves)
    rows = []
    for c in curves:
        lam = f"{lambdas[c.model]:g}" if c.model in lambdas else ("1 (no change)" if c.model == "instruct" else "-")
        rows.append([c.model, lam] + [percent(c, k) for k in ks])
    table = markdown(["model", "lambda"] + [f"Pass@{k}" for k in ks], rows)
    best_rows = []
    for b in bests:
        j = value_at(b.curve, b.k)
        instruct = "-" if b.instruct is None else f"{100 * b.instruct:.1f}"
        diff = "-" if b.diff is None else f"{100 * b.diff[0]:+.1f}" + (
            "" if np.isnan(b.diff[1]) else f" [{100 * b.diff[1]:+.1f}, {100 * b.diff[2]:+.1f}]")
        best_rows.append([str(b.k), f"{b.lam:g}", percent(b.curve, b.k) if j is not None else "-", instruct, diff])
    best = markdown(["k", "best lambda", "its Pass@k", "Instruct Pass@k", "best - Instruct"], best_rows)
    return (f"Pass@k in % on {curves[0].problems} problems of {', '.join(tasks)}, n = {n} samples per problem, "
            f"[{confidence:.0%} bootstrap band over problems]:\n\n{table}\n\n"
            f"Best lambda at each k (highest Pass@k among the lambdas; the difference to the Instruct "
            f"model with its paired band):\n\n{best}\n")


def write_best_csv(bests: Sequence[Best], path: Path) -> None:
    def num(x) -> str:
        return "" if x is None or np.isnan(x) else repr(float(x))

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(BEST_COLUMNS)
        for b in bests:
            j = value_at(b.curve, b.k)
            diff = b.diff or (None, None, None)
            writer.writerow([b.k, repr(b.lam), num(b.curve.pass_at_k[j]), num(b.curve.ci_low[j]),
                             num(b.curve.ci_high[j]), num(b.instruct), *map(num, diff)])


def plot_vs_lambda(curves: Dict[str, pk.Curve], lambdas: Dict[str, float], ks: Sequence[int], path: Path,
                   confidence: float) -> None:
    """Pass@k against lambda, one line per k with its band; the Instruct (lambda = 1) as a
    point with its band, the Base as a dotted line, in the k's colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    order = sorted(lambdas, key=lambdas.get)
    x = np.array([lambdas[label] for label in order])
    for k in ks:
        points = [(value_at(curves[label], k), curves[label]) for label in order]
        if any(j is None for j, _ in points):
            continue
        y = np.array([c.pass_at_k[j] for j, c in points])
        (line,) = ax.plot(x, y, marker="o", label=f"k={k}")
        low = np.array([c.ci_low[j] for j, c in points])
        if not np.isnan(low).all():
            ax.fill_between(x, low, [c.ci_high[j] for j, c in points], color=line.get_color(), alpha=0.15, linewidth=0)
        instruct = curves.get("instruct")
        if instruct is not None and (j := value_at(instruct, k)) is not None:
            err = None if np.isnan(instruct.ci_low[j]) else [[instruct.pass_at_k[j] - instruct.ci_low[j]],
                                                              [instruct.ci_high[j] - instruct.pass_at_k[j]]]
            ax.errorbar([1.0], [instruct.pass_at_k[j]], yerr=err, marker="*", markersize=10,
                        color=line.get_color(), capsize=3)
        base = curves.get("base")
        if base is not None and (j := value_at(base, k)) is not None:
            ax.axhline(base.pass_at_k[j], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("lambda (star at 1: the Instruct model; dotted: the Base)")
    ax.set_ylabel("pass@k")
    problems = next(iter(curves.values())).problems
    ax.set_title(f"pass@k against lambda over {problems} problems (bands: {confidence:.0%} bootstrap)")
    ax.set_xlim(-0.05, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.savefig(path, dpi=120)


def report(jobs: Sequence[EvalJob], lambdas: Dict[str, float], ks: Optional[Sequence[int]], resamples: int,
           confidence: float, seed: int, out: Path, say: Callable[[str], None]) -> str:
    """Score every finished evaluation; write OUT/summary.md, passk.csv, best_lambda.csv,
    passk_vs_lambda.png; return the summary."""
    counts = read_counts(jobs, warn=lambda message: say(f"warning: {message}"))
    table_ks = list(ks) if ks else pk.table_ks([pk.Curve(mc.model, mc.n, 0, *([np.array([])] * 4)) for mc in counts])
    n_max = max(mc.n for mc in counts)
    dropped = [k for k in table_ks if k > n_max]
    if dropped:
        say(f"note: k={','.join(map(str, dropped))} left out: the models have n={n_max} samples per problem")
        table_ks = [k for k in table_ks if k <= n_max]
    if not table_ks:
        raise TimberInputError(f"search: every --k exceeds the {n_max} samples per problem")
    curves = curves_of(counts, table_ks, resamples, confidence, seed)
    by_label = {c.model: c for c in curves}
    swept = {label: lam for label, lam in lambdas.items() if label in by_label}
    bests = best_per_k({mc.model: mc for mc in counts}, by_label, swept, table_ks, resamples, confidence, seed)
    tasks = list(dict.fromkeys(task for job in jobs for task in job.as_tasks))
    text = summary_text(curves, swept, bests, table_ks, confidence, tasks)
    out.mkdir(parents=True, exist_ok=True)
    pk.write_csv(curves, out / "passk.csv")
    write_best_csv(bests, out / "best_lambda.csv")
    (out / "summary.md").write_text(text, encoding="utf-8")
    plot_vs_lambda(by_label, swept, table_ks, out / "passk_vs_lambda.png", confidence)
    return text
