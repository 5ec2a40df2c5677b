"""Pass@k from per-sample correctness records, with bootstrap confidence intervals.

Pure logic (numpy only): reading records, the unbiased estimator, the bootstrap,
the table and the CSV. The `mergekit-timber passk` command wraps it.

Input formats
-------------
Each input file is JSON Lines. With ``fmt="auto"`` the first object of a file decides:
a ``doc_id`` key means lm-eval, anything else means native records.

Native records (``fmt="records"``), one object per drawn sample::

    {"model": "timber", "problem": "gsm8k/17", "correct": true, ...}

``model`` is a non-empty string, ``problem`` a string or integer id, ``correct`` a JSON
boolean (0/1 and "true" are refused: a typo must not become a score). Other keys, such
as ``completion``, are ignored. Several lines for one (model, problem) are several samples.

lm-evaluation-harness ``--log_samples`` files (``fmt="lm-eval"``), named
``samples_<task>_<date>.jsonl`` and written one line per (doc, filter) (as of lm-eval
0.4.x, ``evaluator.py`` and ``loggers/evaluation_tracker.py``). Fields used:

* ``doc_id``: with ``<task>`` from the file name it forms the problem id ``<task>/<doc_id>``;
* ``filter``: the filter-pipeline name; a file holding several (e.g. gsm8k's
  ``strict-match`` and ``flexible-extract``) needs one chosen (``filter_name``);
* ``metrics``: the list of metric names on the line; the metric read is ``metric`` if
  given, else the first of ``exact_match``, ``acc``, ``pass@1`` present, else the only one;
* ``<metric>``: the per-sample correctness, in one of these shapes:
  - a 0/1 number or boolean: one scored sample (the default ``take_first`` filter
    scores only the first of ``repeats`` samples, so such runs give n = 1);
  - a list of 0/1 values: one scored sample each (custom ``process_results``);
  - ``pass@1`` as a fraction, with ``filtered_resps[0]`` the list of the doc's n
    completions (humaneval/cruxeval style, ``repeats: n`` with ``k: [1]``): pass@1 of
    one doc is exactly c/n, so it gives the count of correct samples c = pass@1 * n.
  Other fractions (``pass@8``, ``acc`` of 0.5, ...) carry no per-sample correctness
  and are refused.

The model label of an lm-eval file is ``label`` if given, else the name of the file's
directory (lm-eval writes into ``<output_path>/<model_name_sanitized>/``).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("auto", "records", "lm-eval")
PREFERRED_METRICS = ("exact_match", "acc", "pass@1")
CSV_COLUMNS = ("model", "k", "pass_at_k", "ci_low", "ci_high", "n", "problems")
_HARNESS_NAME = re.compile(r"^samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d.\-]+$")


class PasskError(ValueError):
    """Bad input for pass@k; the message is one line meant for the user."""


@dataclass(frozen=True)
class Tally:
    """`n` scored samples of one problem by one model, `c` of them correct."""

    model: str
    problem: str
    n: int
    c: int


@dataclass(frozen=True)
class ModelCounts:
    """One model's correct-sample counts; every problem has the same number of samples n."""

    model: str
    n: int
    problems: tuple[str, ...]
    correct: np.ndarray  # int, one entry per problem


@dataclass(frozen=True)
class Curve:
    """pass@k of one model at the ks <= n, with the bootstrap interval (NaN if none)."""

    model: str
    n: int
    problems: int
    k: np.ndarray
    pass_at_k: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


# --------------------------------------------------------------------------- reading


def read_tallies(
    paths: Iterable[str | Path],
    *,
    fmt: str = "auto",
    label: str | None = None,
    metric: str | None = None,
    filter_name: str | None = None,
) -> list[Tally]:
    """Read every file; `label`, `metric` and `filter_name` apply to lm-eval files only."""
    if fmt not in FORMATS:
        raise PasskError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    tallies: list[Tally] = []
    for path in map(Path, paths):
        rows = read_jsonl(path)
        if not rows:
            raise PasskError(f"{path}: no records")
        kind = fmt
        if kind == "auto":
            kind = "lm-eval" if "doc_id" in rows[0][1] else "records"
        if kind == "records":
            tallies.extend(_native_tallies(path, rows))
        else:
            tallies.extend(_harness_tallies(path, rows, label, metric, filter_name))
    return tallies


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; one-line PasskError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PasskError(f"{path}: cannot read ({exc.strerror or exc})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PasskError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise PasskError(f"{path} line {lineno}: expected a JSON object")
        rows.append((lineno, obj))
    return rows


def _native_tallies(path: Path, rows: list[tuple[int, dict]]) -> Iterable[Tally]:
    for lineno, obj in rows:
        where = f"{path} line {lineno}"
        missing = [key for key in ("model", "problem", "correct") if key not in obj]
        if missing:
            raise PasskError(f"{where}: missing key {', '.join(map(repr, missing))}")
        model, problem, correct = obj["model"], obj["problem"], obj["correct"]
        if not isinstance(model, str) or not model:
            raise PasskError(f"{where}: 'model' must be a non-empty string, got {model!r}")
        if isinstance(problem, bool) or not isinstance(problem, (str, int)):
            raise PasskError(f"{where}: 'problem' must be a string or integer, got {problem!r}")
        if not isinstance(correct, bool):
            raise PasskError(f"{where}: 'correct' must be true or false, got {correct!r}")
        yield Tally(model, str(problem), 1, int(correct))


def _harness_tallies(
    path: Path,
    rows: list[tuple[int, dict]],
    label: str | None,
    metric: str | None,
    filter_name: str | None,
) -> Iterable[Tally]:
    model = label or path.resolve().parent.name
    match = _HARNESS_NAME.match(path.stem)
    task = match["task"] if match else path.stem

    filters = list(dict.fromkeys(obj.get("filter") for _, obj in rows))
    if filter_name is not None:
        if filter_name not in filters:
            shown = ", ".join(str(f) for f in filters)
            raise PasskError(f"{path}: no filter {filter_name!r}; the file has: {shown}")
        rows = [(lineno, obj) for lineno, obj in rows if obj.get("filter") == filter_name]
    elif len(filters) > 1:
        shown = ", ".join(str(f) for f in filters)
        raise PasskError(f"{path}: several filters ({shown}); choose one with --filter")

    for lineno, obj in rows:
        where = f"{path} line {lineno}"
        if "doc_id" not in obj:
            raise PasskError(f"{where}: missing key 'doc_id'")
        name = metric or _pick_metric(obj, where)
        if name not in obj:
            raise PasskError(f"{where}: missing metric {name!r}")
        n, c = _harness_counts(obj, name, where)
        yield Tally(model, f"{task}/{obj['doc_id']}", n, c)


def _pick_metric(obj: dict, where: str) -> str:
    names = obj.get("metrics")
    if not isinstance(names, list):  # older harness versions do not list them
        names = [m for m in PREFERRED_METRICS if m in obj]
    for preferred in PREFERRED_METRICS:
        if preferred in names:
            return preferred
    if len(names) == 1:
        return names[0]
    if not names:
        raise PasskError(f"{where}: no metric found; name one with --metric")
    raise PasskError(f"{where}: several metrics ({', '.join(names)}); choose one with --metric")


def _harness_counts(obj: dict, name: str, where: str) -> tuple[int, int]:
    value = obj[name]
    if isinstance(value, list):
        if not value:
            raise PasskError(f"{where}: metric {name!r} is an empty list")
        bits = [_as_bit(v) for v in value]
        if None in bits:
            raise PasskError(f"{where}: metric {name!r} has non-0/1 values; no per-sample correctness")
        return len(bits), sum(bits)
    resps = obj.get("filtered_resps")
    if (
        name == "pass@1"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0.0 <= value <= 1.0
        and isinstance(resps, list)
        and len(resps) == 1
        and isinstance(resps[0], list)
        and resps[0]
    ):
        # pass@1 of one doc over its n completions is c/n exactly: the count is recoverable.
        n = len(resps[0])
        c = round(value * n)
        if abs(value * n - c) < 1e-6:
            return n, c
    else:
        bit = _as_bit(value)
        if bit is not None:
            return 1, bit
    raise PasskError(
        f"{where}: metric {name!r} = {value!r} is not per-sample correctness"
        " (need 0/1, a list of 0/1, or pass@1 with the list of completions)"
    )


def _as_bit(value: object) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return None


# --------------------------------------------------------------------------- grouping


def group_counts(tallies: Sequence[Tally], models: Sequence[str] | None = None) -> list[ModelCounts]:
    """Sum tallies per (model, problem) and check every model is evaluated the same way.

    Models come in the order of `models`, else in order of first appearance.
    """
    per_model: dict[str, dict[str, list[int]]] = {}
    for t in tallies:
        n_c = per_model.setdefault(t.model, {}).setdefault(t.problem, [0, 0])
        n_c[0] += t.n
        n_c[1] += t.c
    if not per_model:
        raise PasskError("no records")

    if models is not None:
        unknown = [m for m in models if m not in per_model]
        if unknown:
            raise PasskError(
                f"unknown model {unknown[0]!r} in --models; available: {', '.join(per_model)}"
            )
        order = list(dict.fromkeys(models))
    else:
        order = list(per_model)

    result = [_model_counts(name, per_model[name]) for name in order]
    _check_same_problems(result)
    return result


def _model_counts(model: str, problems: dict[str, list[int]]) -> ModelCounts:
    sizes = Counter(n for n, _ in problems.values())
    n = sizes.most_common(1)[0][0]
    if len(sizes) > 1:
        # Pass@k of a problem with fewer samples is not comparable; say which one.
        ref = next(p for p, (m, _) in problems.items() if m == n)
        odd, (odd_n, _) = next((p, v) for p, v in problems.items() if v[0] != n)
        raise PasskError(
            f"model {model!r}: problem {odd!r} has {_samples(odd_n)} but problem {ref!r} has {n}"
            " (every problem of a model needs the same number of samples)"
        )
    names = tuple(sorted(problems))
    correct = np.array([problems[p][1] for p in names], dtype=np.int64)
    return ModelCounts(model, n, names, correct)


def _samples(count: int) -> str:
    return f"{count} sample" if count == 1 else f"{count} samples"


def _check_same_problems(counts: Sequence[ModelCounts]) -> None:
    everything = set().union(*(set(mc.problems) for mc in counts))
    for mc in counts:
        missing = sorted(everything - set(mc.problems))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise PasskError(
                f"model {mc.model!r} has no samples for problem {missing[0]!r}{more}"
                " that other models have; compare models on the same problems"
            )


# --------------------------------------------------------------------------- estimator


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as a product (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise PasskError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i)
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(-np.expm1(np.sum(np.log1p(-k / i))))


def pass_at_k_matrix(n: int, correct: np.ndarray, ks: Sequence[int], chunk: int = 256) -> np.ndarray:
    """pass@k for every problem (rows) and every k (columns); all ks must be <= n.

    One cumulative sum of log(1 - k/i) over i = n, n-1, ... serves every problem at
    once: the product for c correct samples is the sum of its first c terms.
    Chunked over k so n in the thousands stays within a few MB.
    """
    correct = np.asarray(correct, dtype=np.int64)
    ks_arr = np.asarray(ks, dtype=np.int64)
    if ks_arr.size and (ks_arr.min() < 1 or ks_arr.max() > n):
        raise PasskError(f"k must be within 1..{n}")
    out = np.empty((correct.size, ks_arr.size), dtype=np.float64)
    i = np.arange(n, 0, -1, dtype=np.float64)  # n, n-1, ..., 1
    for start in range(0, ks_arr.size, chunk):
        k = ks_arr[start : start + chunk, None].astype(np.float64)
        # A factor with i <= k is zero or negative; it only enters when n - c < k,
        # where pass@k is 1, so -inf (a zero factor) is the right value.
        with np.errstate(divide="ignore"):
            terms = np.where(i > k, np.log1p(-np.minimum(k / i, 1.0)), -np.inf)
        log_ratio = np.concatenate([np.zeros((k.shape[0], 1)), np.cumsum(terms, axis=1)], axis=1)
        out[:, start : start + chunk] = -np.expm1(log_ratio[:, correct].T)
    return out


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    per_problem: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    progress: Callable[[int], None] | None = None,
    chunk: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap over problems of the mean of each column of `per_problem`.

    Resampling P problems with replacement is the same as drawing multinomial counts
    over them, so each resample is one row of weights and all of them one matmul.
    """
    if not 0.0 < confidence < 1.0:
        raise PasskError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 1:
        raise PasskError(f"the bootstrap needs at least 1 resample, got {resamples}")
    values = np.asarray(per_problem, dtype=np.float64)
    problems = values.shape[0]
    rng = np.random.default_rng(seed)
    uniform = np.full(problems, 1.0 / problems)
    means = np.empty((resamples, values.shape[1]))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        weights = rng.multinomial(problems, uniform, size=size).astype(np.float64)
        means[start : start + size] = weights @ values / problems
        if progress is not None:
            progress(size)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail], axis=0)
    return low, high


def compute_curve(
    counts: ModelCounts,
    ks: Sequence[int] | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    progress: Callable[[int], None] | None = None,
) -> Curve:
    """pass@k of one model at `ks` (default 1..n); ks above n are left out, never guessed.

    Every model's bootstrap starts from the same seed, so models evaluated on the same
    problems see the same resamples (paired), whatever order they are listed in.
    """
    wanted = range(1, counts.n + 1) if ks is None else ks
    kept = np.array(sorted({int(k) for k in wanted if 1 <= k <= counts.n}), dtype=np.int64)
    per_problem = pass_at_k_matrix(counts.n, counts.correct, kept)
    point = per_problem.mean(axis=0)
    if resamples > 0 and kept.size:
        low, high = bootstrap_ci(per_problem, resamples, confidence, seed, progress)
    else:
        low = high = np.full(kept.size, np.nan)
    return Curve(counts.model, counts.n, len(counts.problems), kept, point, low, high)


def parse_ks(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; each must be a positive integer."""
    ks = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise PasskError(f"k values must be positive integers, got {part!r}")
        ks.append(int(part))
    return sorted(set(ks))


def table_ks(curves: Sequence[Curve]) -> list[int]:
    """Powers of two up to the largest n, plus every model's n."""
    top = max(c.n for c in curves)
    powers = [2**e for e in range(int(math.log2(top)) + 1)]
    return sorted(set(powers) | {c.n for c in curves})


# --------------------------------------------------------------------------- output


def format_table(curves: Sequence[Curve], ks: Sequence[int], confidence: float = 0.95) -> str:
    """Models side by side, one row per k; '-' where k > n for that model."""
    cells = [["k"] + [c.model for c in curves]]
    cells.append(["n"] + [str(c.n) for c in curves])
    cells.append(["problems"] + [str(c.problems) for c in curves])
    for k in ks:
        row = [str(k)]
        for c in curves:
            hit = np.nonzero(c.k == k)[0]
            if not hit.size:
                row.append("-")
                continue
            j = hit[0]
            text = f"{c.pass_at_k[j]:.3f}"
            if not np.isnan(c.ci_low[j]):
                text += f" [{c.ci_low[j]:.3f}, {c.ci_high[j]:.3f}]"
            row.append(text)
        cells.append(row)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    lines.insert(3, "  ".join("-" * w for w in widths))
    title = f"pass@k with {confidence:.0%} bootstrap CI over problems"
    return "\n".join([title, *lines])


def write_csv(curves: Sequence[Curve], path: str | Path) -> None:
    """One row per (model, k); the CI columns are empty when no bootstrap was run."""

    def num(x: float) -> str:
        return "" if np.isnan(x) else repr(float(x))

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for c in curves:
            for j, k in enumerate(c.k):
                writer.writerow(
                    [c.model, int(k), num(c.pass_at_k[j]), num(c.ci_low[j]), num(c.ci_high[j]), c.n, c.problems]
                )
