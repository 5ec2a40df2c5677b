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
``samples_<task>_<date>.jsonl`` and written one line per (doc, filter) into
``<output_path>/<model_name_sanitized>/`` (lm-eval 0.4.x, ``evaluator.py`` and
``loggers/evaluation_tracker.py``; the fixtures under ``tests/data/lm_eval-*`` are
real output). A line is read by its structure, never by its values alone:

* the problem id is ``<task>/<doc_id>`` (``<task>`` from the file name);
* ``filter`` names the filter pipeline; a file holding several needs one chosen;
* n, the completions scored per problem, is the length of ``filtered_resps[0]`` when
  that is a list (all ``repeats`` kept), 1 when the filter reduced it to one answer
  (``take_first``, ``majority_vote``: a warning says how many of the ``resps[0]``
  completions went unscored), 1 for likelihood tasks (no completions);
* the metric is ``metric`` if given, else the first of ``exact_match``, ``acc``,
  ``pass@1`` on the line, else the only one (``pass@k`` with k >= 2 never counts);
* c, the correct ones, comes from the metric's value: a list of n 0/1 values (a task's
  ``process_results`` scoring each repeat) gives c directly; with n = 1 a 0/1 value is
  c; with n > 1, ``pass@1`` (c/n for one doc) and ``exact_match`` (lm-eval's is the mean
  over the completions, c/n) give c = value * n, checked to be a whole number.
* refused, in one line naming what to use instead: ``pass@k`` with k >= 2 (one score
  for the n completions: ``pass@8`` of 8 is "any correct"), any other single value over
  n > 1 completions, fractions over one completion, lists of the wrong length.

The model label of an lm-eval file is ``label`` if given; else, for a file named as
lm-eval names it, its directory (lm-eval's sanitized model name), shown without the
sanitizer's underscores (``__work__out__timber`` reads ``work/out/timber``) and cut to
the trailing path parts that tell the models read together apart (``timber``); for a
file named otherwise, its file name without ``.jsonl`` (problem ids are then the bare
``doc_id``, so renamed files of several models line up).
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("auto", "records", "lm-eval")
PREFERRED_METRICS = ("exact_match", "acc", "pass@1")
# lm-eval metrics whose value for one doc is the mean correctness of its completions.
MEAN_METRICS = ("pass@1", "exact_match")
CSV_COLUMNS = ("model", "k", "pass_at_k", "ci_low", "ci_high", "n", "problems")
README_HINT = "see docs/passk.md, 'Pass@k from lm-evaluation-harness'"
_HARNESS_NAME = re.compile(r"^samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d.\-]+$")
_PASS_AT = re.compile(r"^pass@(\d+)$")


class PasskError(ValueError):
    """Bad input for pass@k; the message is one line meant for the user."""


class PasskWarning(UserWarning):
    """Input that is read, but less than it looks (e.g. repeats left unscored)."""


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
    warn: Callable[[str], None] | None = None,
) -> list[Tally]:
    """Read every file; `label`, `metric` and `filter_name` apply to lm-eval files only.

    `warn` receives one-line notes on input read with less than it seems to hold (default:
    `warnings.warn` with PasskWarning).
    """
    if fmt not in FORMATS:
        raise PasskError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if warn is None:
        warn = lambda message: warnings.warn(message, PasskWarning, stacklevel=4)  # noqa: E731
    files = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.resolve() in seen:  # its samples would count twice: n doubled, silently
            raise PasskError(f"{path}: given twice")
        seen.add(path.resolve())
        rows = _read_input(path)
        kind = fmt
        if kind == "auto":
            kind = "lm-eval" if "doc_id" in rows[0][1] else "records"
        files.append((path, kind, rows))

    _check_same_sampling(files, warn)
    harness_paths = [path for path, kind, _ in files if kind == "lm-eval"]
    labels = harness_labels(harness_paths) if label is None else dict.fromkeys(harness_paths, label)
    tallies: list[Tally] = []
    for path, kind, rows in files:
        if kind == "records":
            tallies.extend(_native_tallies(path, rows))
        else:
            tallies.extend(_harness_tallies(path, rows, labels[path], metric, filter_name, warn))
    return tallies


# What decides how completions were drawn, besides the model and the seed. lm-eval names
# the token budget max_gen_toks; scripts/sample.py records all of them in "sampling".
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "max_new_tokens")
_UNSET = "unset"  # sampled, but the knob left to the model's generation_config.json


def sampling_of(kind: str, rows: list[tuple[int, dict]]) -> dict | None:
    """The sampling settings a file records (None: it records none). lm-eval lines carry
    the generation arguments the harness passed; a knob it did not pass (lm-eval sends only
    do_sample and temperature unless the task's generation_kwargs say more) came from each
    model's own generation config: "unset"."""
    if kind == "records":
        found = [obj.get("sampling") for _, obj in rows]
        if not any(isinstance(s, dict) for s in found):
            return None
        first = found[0] if isinstance(found[0], dict) else {}
        return first if all(s == first for s in found) else {"mixed": "several settings in one file"}
    try:
        args = rows[0][1]["arguments"]["gen_args_0"]["arg_1"]
    except (KeyError, TypeError, IndexError):
        return None  # a likelihood task: nothing sampled
    if not isinstance(args, dict):
        return None
    args = {("max_new_tokens" if k == "max_gen_toks" else k): v for k, v in args.items()}
    settings = {k: args[k] for k in SAMPLING_KEYS if k in args}
    if args.get("do_sample") or (args.get("temperature") or 0) > 0:
        settings.update({k: _UNSET for k in ("top_p", "top_k", "min_p") if k not in args})
    return settings


def _check_same_sampling(files: list[tuple[Path, str, list]], warn: Callable[[str], None]) -> None:
    """One line when the files compared were sampled with different settings (or left a
    knob to each model's generation config): their Pass@k curves are then not comparable."""
    recorded = {path: sampling_of(kind, rows) for path, kind, rows in files}
    if len(files) < 2 or all(s is None for s in recorded.values()):
        return  # nothing recorded anywhere (records written by hand, older files): nothing to compare
    differ = []
    unrecorded = [path.name for path, s in recorded.items() if s is None]
    if unrecorded:
        differ.append("no settings recorded in " + ", ".join(unrecorded))
    recorded = {path: s for path, s in recorded.items() if s is not None}
    unpinned, where = [], set()
    for key in dict.fromkeys(k for s in recorded.values() for k in s):
        values = {path: s.get(key, "not recorded") for path, s in recorded.items()}
        if _UNSET in values.values():
            unpinned.append(key)
            where.update(path.name for path, v in values.items() if v == _UNSET)
        elif len(set(map(str, values.values()))) > 1:
            differ.append(f"{key}: " + ", ".join(f"{v} in {p.name}" for p, v in values.items()))
    if unpinned:
        files_named = "every file" if len(where) == len(recorded) else ", ".join(sorted(where))
        differ.append(f"{', '.join(unpinned)} not passed in {files_named}, so each model's "
                      "generation_config.json decided them")
    if differ:
        warn("the files were not sampled alike (" + "; ".join(differ) + "): Pass@k of models sampled "
             "differently is not comparable; pin every knob (scripts/sample.py does; for lm-eval, the "
             "task's generation_kwargs)")


def _read_input(path: Path) -> list[tuple[int, dict]]:
    try:
        rows = read_jsonl(path)
    except PasskError:
        if _is_results_file(path):  # lm-eval writes it indented: not JSON Lines
            raise PasskError(_results_hint(path)) from None
        raise
    if not rows:
        raise PasskError(f"{path}: no records")
    if len(rows) == 1 and _is_results(rows[0][1]):
        raise PasskError(_results_hint(path))
    return rows


def _is_results_file(path: Path) -> bool:
    try:
        return _is_results(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def _is_results(obj: object) -> bool:
    """lm-eval's results_<date>.json: one object of aggregated 'results' per task."""
    return isinstance(obj, dict) and isinstance(obj.get("results"), dict) and ("configs" in obj or "versions" in obj)


def _results_hint(path: Path) -> str:
    return (
        f"{path}: lm-eval's results file holds scores averaged over problems; pass the"
        " samples_<task>_*.jsonl files beside it instead (lm_eval --log_samples writes them)"
    )


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; one-line PasskError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PasskError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise PasskError(
            f"{path}: not a text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} is not UTF-8); "
            "pass JSON Lines records or lm-eval's samples_<task>_*.jsonl files"
        ) from None
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


# ----------------------------------------------------------------- lm-evaluation-harness


def harness_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Display label of each lm-eval samples file (see the module docstring)."""
    full: dict[Path, tuple[str, ...]] = {}
    for path in paths:
        if _HARNESS_NAME.match(path.stem):
            # lm-eval's sanitizer turns each run of / : | ... into "__"; a local path
            # starts with it, and matplotlib hides legend labels that start with "_".
            parts = tuple(p for p in path.resolve().parent.name.split("__") if p)
            full[path] = parts or (path.resolve().parent.name,)
        else:
            full[path] = (path.name.removesuffix(".jsonl"),)
    names = set(full.values())
    return {path: _short_name(parts, names) for path, parts in full.items()}


def _short_name(parts: tuple[str, ...], names: set[tuple[str, ...]]) -> str:
    """The fewest trailing parts that no other model's name ends with."""
    for size in range(1, len(parts) + 1):
        tail = parts[-size:]
        if not any(other != parts and other[-size:] == tail for other in names):
            return "/".join(tail)
    return "/".join(parts)


def _harness_tallies(
    path: Path,
    rows: list[tuple[int, dict]],
    model: str,
    metric: str | None,
    filter_name: str | None,
    warn: Callable[[str], None],
) -> Iterable[Tally]:
    match = _HARNESS_NAME.match(path.stem)
    task = match["task"] + "/" if match else ""

    filters = list(dict.fromkeys(obj.get("filter") for _, obj in rows))
    if filter_name is not None:
        if filter_name not in filters:
            shown = ", ".join(str(f) for f in filters)
            raise PasskError(f"{path}: no filter {filter_name!r}; the file has: {shown}")
        rows = [(lineno, obj) for lineno, obj in rows if obj.get("filter") == filter_name]
    elif len(filters) > 1:
        raise PasskError(_several_filters(path, rows, filters))

    unscored = None  # (scored, generated) of the first line that left completions out
    tallies = []
    for lineno, obj in rows:
        where = f"{path} line {lineno}"
        if "doc_id" not in obj:
            raise PasskError(f"{where}: missing key 'doc_id'")
        scored, generated = _completions(obj, where)
        name = metric or _pick_metric(obj, where)
        if name not in obj:
            raise PasskError(f"{where}: missing metric {name!r}")
        n, c = _harness_counts(obj, name, scored, where)
        if scored < generated and unscored is None:
            unscored = (scored, generated)
        tallies.append(Tally(model, f"{task}{obj['doc_id']}", n, c))
    if unscored is not None:
        warn(_unscored_note(path, rows[0][1].get("filter"), *unscored))
    return tallies


def _completions(obj: dict, where: str) -> tuple[int, int]:
    """(completions scored, completions generated) for one lm-eval line.

    A generation task stores the doc's `repeats` completions as resps[0] (a list of
    strings) and what the filter kept as filtered_resps[0]: still a list when every
    completion is kept, one string after take_first. Likelihood tasks store numbers.
    """
    resps = obj.get("resps")
    first = resps[0] if isinstance(resps, list) and resps else None
    # Completions are strings (None where a backend returned nothing); likelihood
    # requests store [log-likelihood, is_greedy] pairs or numbers instead.
    texts = isinstance(first, list) and all(isinstance(r, str) or r is None for r in first)
    if not (texts and any(isinstance(r, str) for r in first)):
        return 1, 1  # a likelihood request: one scored answer
    generated = len(first)
    if "filtered_resps" not in obj:  # older harness versions: the raw completions
        return generated, generated
    filtered = obj["filtered_resps"]
    if not isinstance(filtered, list) or not filtered:
        raise PasskError(f"{where}: 'filtered_resps' is not a list of answers")
    kept = filtered[0]
    if not isinstance(kept, list):
        return 1, generated
    if not kept:
        raise PasskError(f"{where}: the filter kept no completion ('filtered_resps' is [[]])")
    return len(kept), generated


def _pick_metric(obj: dict, where: str) -> str:
    names = obj.get("metrics")
    if not isinstance(names, list):  # older harness versions do not list them
        names = [m for m in PREFERRED_METRICS if m in obj]
    for preferred in PREFERRED_METRICS:
        if preferred in names:
            return preferred
    usable = [m for m in names if _pass_at(m) is None or _pass_at(m) == 1]
    if len(usable) == 1:
        return usable[0]
    if not names:
        raise PasskError(f"{where}: no metric found; name one with --metric")
    if not usable:  # only pass@k with k >= 2: say why none of them is read
        return names[0]
    raise PasskError(f"{where}: several metrics ({', '.join(usable)}); choose one with --metric")


def _pass_at(name: str) -> int | None:
    match = _PASS_AT.match(name)
    return int(match[1]) if match else None


def _harness_counts(obj: dict, name: str, scored: int, where: str) -> tuple[int, int]:
    """(n, c) of one line: `scored` completions and the correct ones among them."""
    value = obj[name]
    k = _pass_at(name)
    if k is not None and k >= 2:
        instead = "use --metric pass@1" if "pass@1" in obj else "score with pass@1 (k: [1]) or one 0/1 per completion"
        raise PasskError(
            f"{where}: metric {name!r} is one Pass@{k} score for the problem's {_completions_text(scored)},"
            f" not per-sample correctness; {instead} ({README_HINT})"
        )
    if isinstance(value, list):
        bits = [_as_bit(v) for v in value]
        if not bits or None in bits:
            raise PasskError(f"{where}: metric {name!r} = {value!r} is not a list of 0/1, one per completion")
        if len(bits) != scored:
            raise PasskError(
                f"{where}: metric {name!r} has {len(bits)} values for {_completions_text(scored)} kept by the filter"
            )
        return scored, sum(bits)
    if scored == 1:
        bit = _as_bit(value)
        if bit is None:
            raise PasskError(
                f"{where}: metric {name!r} = {value!r} is not per-sample correctness"
                " (need 0/1 for one completion, or a list of 0/1)"
            )
        return 1, bit
    # One number for `scored` > 1 completions: only a mean of their correctness gives c.
    if name not in MEAN_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PasskError(
            f"{where}: metric {name!r} = {value!r} is one score for the problem's {_completions_text(scored)},"
            f" not per-sample correctness; use a per-repeat list, pass@1 or exact_match ({README_HINT})"
        )
    c = round(value * scored)
    if not 0 <= c <= scored or abs(value * scored - c) > 1e-6:
        raise PasskError(
            f"{where}: metric {name!r} = {value!r} is not a whole number of correct completions"
            f" out of {scored} ({value!r} x {scored} = {value * scored:g})"
        )
    return scored, c


def _completions_text(count: int) -> str:
    return f"{count} completion" if count == 1 else f"{count} completions"


def _as_bit(value: object) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return None


def _several_filters(path: Path, rows: list[tuple[int, dict]], filters: list) -> str:
    shown = ", ".join(str(f) for f in filters)
    keep_all = []
    for name in filters:
        lineno, obj = next((i, o) for i, o in rows if o.get("filter") == name)
        scored, generated = _completions(obj, f"{path} line {lineno}")
        if generated > 1 and scored == generated:
            keep_all.append(repr(name))
    hint = ""
    if keep_all:
        hint = f" ({', '.join(keep_all)} {'keeps' if len(keep_all) == 1 else 'keep'} every completion)"
    return f"{path}: several filters ({shown}); choose one with --filter{hint}"


def _unscored_note(path: Path, filter_name: object, scored: int, generated: int) -> str:
    if scored == 1:
        what = (f"one answer per problem out of {generated} completions (take_first keeps the first,"
                f" majority_vote a vote), so n = 1 and {generated - 1} of every {generated} went unscored")
    else:
        what = f"{scored} of the {generated} completions per problem, so n = {scored}"
    return f"{path}: filter {filter_name!r} scored {what}; for Pass@k keep every completion ({README_HINT})"


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
