"""Pass@k: estimator, bootstrap, record readers, checkers and the `passk` command."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
from helpers import cli
import pytest
from click.testing import CliRunner

from mergekit_timber.tools import passk as pk
from answer_check import (
    check_boxed,
    check_exact,
    extract_boxed,
    extract_last_number,
    normalize,
    to_number,
)
from mergekit_timber.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HARNESS_NAME = "samples_{task}_2024-05-01T12-34-56.789012.jsonl"


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(model: str, correct_per_problem: dict[str, list[bool]]) -> list[dict]:
    return [
        {"model": model, "problem": p, "correct": c, "completion": "x"}
        for p, flags in correct_per_problem.items()
        for c in flags
    ]


def harness_line(doc_id, metric="exact_match", value=1.0, filter_name="strict-match", resps=None):
    """A line shaped like lm-eval's --log_samples output (fields as in evaluator.py)."""
    resps = resps if resps is not None else ["42"]  # filtered: one answer, or [[n completions]]
    return {
        "doc_id": doc_id,
        "doc": {"question": "q", "answer": "42"},
        "target": "42",
        "arguments": {"gen_args_0": {"arg_0": "Q: q\nA:", "arg_1": {"until": ["Q:"]}}},
        "resps": [resps[0] if isinstance(resps[0], list) else [resps[0]]],
        "filtered_resps": resps,
        "filter": filter_name,
        "metrics": [metric],
        "doc_hash": "d",
        "prompt_hash": "p",
        "target_hash": "t",
        metric: value,
    }


# --------------------------------------------------------------------------- estimator


def enumerate_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) holding a correct one."""
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


def test_estimator_matches_exact_enumeration():
    for n in range(1, 9):
        ks = list(range(1, n + 1))
        correct = np.arange(n + 1)
        matrix = pk.pass_at_k_matrix(n, correct, ks)
        for c in range(n + 1):
            for k in ks:
                exact = enumerate_pass_at_k(n, c, k)
                assert pk.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
                assert matrix[c, k - 1] == pytest.approx(exact, abs=1e-12)


def test_published_values():
    assert pk.pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    expected = 1 - math.comb(7, 5) / math.comb(10, 5)
    assert expected == pytest.approx(0.9166666666666666)
    assert pk.pass_at_k(10, 3, 5) == pytest.approx(expected, abs=1e-15)
    assert pk.pass_at_k_matrix(10, np.array([3]), [1, 5]) == pytest.approx(np.array([[0.3, expected]]))


def lgamma_pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    log_ratio = (
        math.lgamma(n - c + 1) - math.lgamma(n - c - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1)
    )
    return -math.expm1(log_ratio)


def test_estimator_is_stable_for_large_n():
    n = 5000
    correct = np.array([0, 1, 7, 100, 2500, 4990, 4999, 5000])
    ks = np.arange(1, n + 1)
    matrix = pk.pass_at_k_matrix(n, correct, ks)
    assert np.isfinite(matrix).all()
    assert (matrix >= 0).all() and (matrix <= 1).all()
    assert (np.diff(matrix, axis=1) >= -1e-12).all(), "pass@k must not decrease with k"
    assert (matrix[0] == 0).all() and (matrix[-1] == 1).all()
    for row, c in enumerate(correct):
        for k in (1, 2, 10, 100, 1000, 2500, 4999, 5000):
            ref = lgamma_pass_at_k(n, int(c), k)
            assert matrix[row, k - 1] == pytest.approx(ref, rel=1e-9, abs=1e-9)
            assert pk.pass_at_k(n, int(c), k) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # pass@1 is exactly c/n.
    assert matrix[:, 0] == pytest.approx(correct / n, abs=1e-12)


def test_pass_at_k_rejects_impossible_arguments():
    with pytest.raises(pk.PasskError, match="1 <= k <= n"):
        pk.pass_at_k(4, 1, 5)
    with pytest.raises(pk.PasskError, match="within 1..4"):
        pk.pass_at_k_matrix(4, np.array([1]), [5])


# --------------------------------------------------------------------------- bootstrap


def spread_counts(problems: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.binomial(n, rng.uniform(0.0, 0.8, size=problems))


def test_bootstrap_contains_point_and_is_deterministic():
    n, ks = 64, [1, 2, 4, 8, 16, 32, 64]
    per_problem = pk.pass_at_k_matrix(n, spread_counts(30, n), ks)
    point = per_problem.mean(axis=0)
    low, high = pk.bootstrap_ci(per_problem, 1000, 0.95, seed=7)
    assert (low <= point).all() and (point <= high).all()
    assert low[0] < high[0]  # at k = n every problem here is solved: a zero-width interval
    again = pk.bootstrap_ci(per_problem, 1000, 0.95, seed=7)
    assert np.array_equal(low, again[0]) and np.array_equal(high, again[1])
    other = pk.bootstrap_ci(per_problem, 1000, 0.95, seed=8)
    assert not np.array_equal(low, other[0])
    wider = pk.bootstrap_ci(per_problem, 1000, 0.99, seed=7)
    assert (wider[0] <= low).all() and (wider[1] >= high).all()


def test_bootstrap_narrows_with_more_problems():
    n, ks = 32, [1, 4, 32]
    few = pk.pass_at_k_matrix(n, spread_counts(10, n), ks)
    many = np.tile(few, (16, 1))  # same distribution, 16x the problems
    low_few, high_few = pk.bootstrap_ci(few, 1000, seed=0)
    low_many, high_many = pk.bootstrap_ci(many, 1000, seed=0)
    assert ((high_many - low_many) < (high_few - low_few)).all()


def test_bootstrap_covers_every_k_for_n320_30_problems():
    counts = pk.ModelCounts("m", 320, tuple(f"p{i}" for i in range(30)), spread_counts(30, 320))
    curve = pk.compute_curve(counts, None, resamples=1000, seed=0)
    assert curve.k.tolist() == list(range(1, 321))
    assert (curve.ci_low <= curve.pass_at_k + 1e-12).all() and (curve.pass_at_k <= curve.ci_high + 1e-12).all()


def test_bootstrap_reports_progress_and_validates():
    seen = []
    pk.bootstrap_ci(np.ones((3, 2)), 250, progress=seen.append)
    assert sum(seen) == 250
    with pytest.raises(pk.PasskError, match="confidence must be between 0 and 1"):
        pk.bootstrap_ci(np.ones((3, 2)), 10, confidence=1.5)
    with pytest.raises(pk.PasskError, match="at least 1 resample"):
        pk.bootstrap_ci(np.ones((3, 2)), 0)


def test_curve_leaves_out_k_above_n_and_no_bootstrap_gives_nan():
    counts = pk.ModelCounts("m", 4, ("a", "b"), np.array([1, 4]))
    curve = pk.compute_curve(counts, [1, 2, 4, 8, 16], resamples=0)
    assert curve.k.tolist() == [1, 2, 4]
    assert curve.pass_at_k[0] == pytest.approx((0.25 + 1.0) / 2)
    assert np.isnan(curve.ci_low).all() and np.isnan(curve.ci_high).all()


def test_parse_ks_and_table_ks():
    assert pk.parse_ks("8, 1,2,2") == [1, 2, 8]
    for bad in ("0", "1,x", "-2", "1.5", ""):
        with pytest.raises(pk.PasskError, match="k values must be positive integers"):
            pk.parse_ks(bad)
    curves = [pk.compute_curve(pk.ModelCounts(m, n, ("a",), np.array([1])), resamples=0)
              for m, n in (("a", 10), ("b", 5))]
    assert pk.table_ks(curves) == [1, 2, 4, 5, 8, 10]


# --------------------------------------------------------------------------- readers


def test_native_records_are_grouped_per_model(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", records("base", {"p1": [True, False], "p2": [False, False]})
                       + records("timber", {"p2": [True, True], "p1": [True, False]}))
    counts = pk.group_counts(pk.read_tallies([path]))
    assert [c.model for c in counts] == ["base", "timber"]
    base, timber = counts
    assert base.n == 2 and base.problems == ("p1", "p2") and base.correct.tolist() == [1, 0]
    assert timber.correct.tolist() == [1, 2]
    # --models picks and orders.
    only = pk.group_counts(pk.read_tallies([path]), ["timber"])
    assert [c.model for c in only] == ["timber"]


def test_native_records_split_over_files_accumulate(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", records("m", {"p": [True]}))
    b = write_jsonl(tmp_path / "b.jsonl", records("m", {"p": [False, False]}))
    (counts,) = pk.group_counts(pk.read_tallies([a, b]))
    assert counts.n == 3 and counts.correct.tolist() == [1]


def test_harness_binary_metric_label_from_directory(tmp_path):
    path = write_jsonl(tmp_path / "timber" / HARNESS_NAME.format(task="gsm8k"),
                       [harness_line(0, value=1.0), harness_line(1, value=0.0), harness_line(2, value=True)])
    tallies = pk.read_tallies([path])
    assert [(t.model, t.problem, t.n, t.c) for t in tallies] == [
        ("timber", "gsm8k/0", 1, 1), ("timber", "gsm8k/1", 1, 0), ("timber", "gsm8k/2", 1, 1)]
    labelled = pk.read_tallies([path], label="mine")
    assert {t.model for t in labelled} == {"mine"}


def test_harness_list_metric_and_pass_at_1_fraction(tmp_path):
    four = [["a", "b", "c", "d"]]
    lines = [
        harness_line(0, metric="acc", value=[1, 0, 1, 1], filter_name="none", resps=four),
        harness_line(1, metric="acc", value=[0.0, 0.0, 0.0, 0.0], filter_name="none", resps=four),
    ]
    listed = write_jsonl(tmp_path / "base" / HARNESS_NAME.format(task="custom"), lines)
    completions = [["def f(): 1", "def f(): 2", "def f(): 3", "def f(): 4"]]
    fractions = write_jsonl(tmp_path / "instruct" / HARNESS_NAME.format(task="custom"), [
        harness_line(0, metric="pass@1", value=0.75, filter_name="create_test", resps=completions),
        harness_line(1, metric="pass@1", value=0.0, filter_name="create_test", resps=completions),
    ])
    counts = pk.group_counts(pk.read_tallies([listed, fractions]))
    assert [(c.model, c.n, c.correct.tolist()) for c in counts] == [
        ("base", 4, [3, 0]), ("instruct", 4, [3, 0])]


def test_harness_completions_by_structure(tmp_path):
    # A completion a backend left empty (None) is still one of the n generated.
    gaps = harness_line(0, value=0.5, resps=[["42", None, "42", "7"]])
    gaps["resps"] = [["42", None, "42", "7"]]
    # A likelihood task: resps[0] holds [log-likelihood, is_greedy], not completions.
    choice = harness_line(1, metric="acc", value=1, resps=[[-0.5, True]])
    choice["resps"] = [[[-0.5, True]], [[-2.0, False]]]
    path = write_jsonl(tmp_path / "m" / HARNESS_NAME.format(task="t"), [gaps])
    assert pk.read_tallies([path]) == [pk.Tally("m", "t/0", 4, 2)]
    path = write_jsonl(tmp_path / "m" / HARNESS_NAME.format(task="mc"), [choice])
    assert pk.read_tallies([path]) == [pk.Tally("m", "mc/1", 1, 1)]


def test_harness_filter_and_metric_choice(tmp_path):
    lines = [harness_line(0, value=1.0, filter_name="strict-match"),
             harness_line(0, value=0.0, filter_name="flexible-extract")]
    path = write_jsonl(tmp_path / "m" / HARNESS_NAME.format(task="gsm8k"), lines)
    with pytest.raises(pk.PasskError, match=r"several filters \(strict-match, flexible-extract\); choose one with --filter"):
        pk.read_tallies([path])
    (tally,) = pk.read_tallies([path], filter_name="flexible-extract")
    assert tally.c == 0
    with pytest.raises(pk.PasskError, match=r"no filter 'nope'; the file has: strict-match, flexible-extract"):
        pk.read_tallies([path], filter_name="nope")

    two = harness_line(0, metric="acc_norm", value=1.0)
    two["metrics"] = ["acc_norm", "f1"]
    two["f1"] = 0.0
    multi = write_jsonl(tmp_path / "m2" / "samples_mc.jsonl", [two])
    with pytest.raises(pk.PasskError, match=r"samples_mc.jsonl line 1: several metrics \(acc_norm, f1\); choose one with --metric"):
        pk.read_tallies([multi])
    assert pk.read_tallies([multi], metric="f1")[0].c == 0
    # A file not named as lm-eval names it: the bare doc_id, the file name as the label.
    assert pk.read_tallies([multi], metric="acc_norm")[0] == pk.Tally("samples_mc", "0", 1, 1)


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", records("m", {"p": [True]}))
    with pytest.raises(pk.PasskError, match="line 1: missing key 'doc_id'"):
        pk.read_tallies([path], fmt="lm-eval")
    with pytest.raises(pk.PasskError, match="unknown format 'csv'"):
        pk.read_tallies([path], fmt="csv")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"model": "m", "problem": "p"}, r"bad.jsonl line 2: missing key 'correct'"),
        ({"problem": "p", "correct": True}, r"bad.jsonl line 2: missing key 'model'"),
        ({"correct": True}, r"bad.jsonl line 2: missing key 'model', 'problem'"),
        ({"model": "m", "problem": "p", "correct": 1}, r"line 2: 'correct' must be true or false, got 1"),
        ({"model": "m", "problem": "p", "correct": "true"}, r"line 2: 'correct' must be true or false, got 'true'"),
        ({"model": "m", "problem": "p", "correct": None}, r"'correct' must be true or false, got None"),
        ({"model": "", "problem": "p", "correct": True}, r"line 2: 'model' must be a non-empty string"),
        ({"model": "m", "problem": [1], "correct": True}, r"line 2: 'problem' must be a string or integer"),
    ],
)
def test_bad_native_records(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"model": "m", "problem": "p", "correct": True}, row])
    with pytest.raises(pk.PasskError, match=message):
        pk.read_tallies([path])


def test_bad_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"model": "m", "problem": "p", "correct": true}\n\n{"model": oops}\n')
    with pytest.raises(pk.PasskError, match=r"broken.jsonl line 3: invalid JSON"):
        pk.read_tallies([broken])
    array = tmp_path / "array.jsonl"
    array.write_text("[1, 2]\n")
    with pytest.raises(pk.PasskError, match=r"array.jsonl line 1: expected a JSON object"):
        pk.read_tallies([array])
    good = write_jsonl(tmp_path / "good.jsonl", records("m", {"p": [True]}))
    with pytest.raises(pk.PasskError, match=r"^.*good.jsonl: given twice$"):
        pk.read_tallies([good, tmp_path / "." / "good.jsonl"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(pk.PasskError, match=r"empty.jsonl: no records"):
        pk.read_tallies([empty])
    with pytest.raises(pk.PasskError, match=r"missing.jsonl: cannot read"):
        pk.read_tallies([tmp_path / "missing.jsonl"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (harness_line(1, value=0.5), r"line 2: metric 'exact_match' = 0.5 is not per-sample correctness"),
        (harness_line(1, metric="pass@8", value=0.9), r"line 2: metric 'pass@8' is one Pass@8 score"),
        # pass@1 fraction but the completions were reduced to one (take_first): n unknown.
        (harness_line(1, metric="pass@1", value=0.5, resps=["x"]), r"metric 'pass@1' = 0.5 is not per-sample"),
        # 0.3 of 4 completions is not a whole count.
        (harness_line(1, metric="pass@1", value=0.3, resps=[["a", "b", "c", "d"]]),
         r"'pass@1' = 0.3 is not a whole number of correct completions out of 4 \(0.3 x 4 = 1.2\)"),
        (harness_line(1, value=[1, 0.5]), r"line 2: metric 'exact_match' = \[1, 0.5\] is not a list of 0/1"),
        (harness_line(1, value=[]), r"line 2: metric 'exact_match' = \[\] is not a list of 0/1"),
        # Four values for one kept completion.
        (harness_line(1, value=[1, 0, 0, 1]), r"metric 'exact_match' has 4 values for 1 completion kept"),
        (harness_line(1, value=[1, 0], resps=[["a", "b", "c"]]), r"has 2 values for 3 completions kept"),
        # exact_match of 1.2 over 4 completions is not a mean of 0/1.
        (harness_line(1, value=1.25, resps=[["a", "b", "c", "d"]]), r"not a whole number .* out of 4"),
        (harness_line(1, value=True, resps=[["a", "b"]]), r"'exact_match' = True is one score for the problem's 2"),
        ({**harness_line(1), "exact_match": None}, r"metric 'exact_match' = None is not per-sample"),
    ],
)
def test_bad_harness_values(tmp_path, line, message):
    path = write_jsonl(tmp_path / "m" / HARNESS_NAME.format(task="t"), [harness_line(0), line])
    with pytest.raises(pk.PasskError, match=message):
        pk.read_tallies([path])


def test_bad_harness_keys(tmp_path):
    no_doc = harness_line(1)
    del no_doc["doc_id"]
    path = write_jsonl(tmp_path / "m" / HARNESS_NAME.format(task="t"), [harness_line(0), no_doc])
    with pytest.raises(pk.PasskError, match=r"samples_t_.*\.jsonl line 2: missing key 'doc_id'"):
        pk.read_tallies([path], fmt="lm-eval")
    path = write_jsonl(tmp_path / "m" / "x.jsonl", [harness_line(0)])
    with pytest.raises(pk.PasskError, match=r"x.jsonl line 1: missing metric 'acc'"):
        pk.read_tallies([path], metric="acc")
    bare = {"doc_id": 0, "filtered_resps": ["x"], "resps": [["x"]]}
    path = write_jsonl(tmp_path / "m" / "bare.jsonl", [bare])
    with pytest.raises(pk.PasskError, match=r"bare.jsonl line 1: no metric found; name one with --metric"):
        pk.read_tallies([path])


def test_mixed_sample_counts_name_model_problem_and_counts(tmp_path):
    rows = records("base", {"p1": [True] * 4, "p2": [False] * 4, "p3": [True, False], "p4": [True] * 4})
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(pk.PasskError) as info:
        pk.group_counts(pk.read_tallies([path]))
    assert str(info.value) == (
        "model 'base': problem 'p3' has 2 samples but problem 'p1' has 4"
        " (every problem of a model needs the same number of samples)"
    )
    assert "\n" not in str(info.value)


def test_unknown_model_and_different_problem_sets(tmp_path):
    rows = records("base", {"p1": [True], "p2": [True], "p3": [False]}) + records("timber", {"p1": [True]})
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    tallies = pk.read_tallies([path])
    with pytest.raises(pk.PasskError, match=r"^unknown model 'tim' in --models; available: base, timber$"):
        pk.group_counts(tallies, ["base", "tim"])
    with pytest.raises(pk.PasskError, match=r"^model 'timber' has no samples for problem 'p2' \(and 1 more\)"):
        pk.group_counts(tallies)
    assert pk.group_counts(tallies, ["base"])[0].n == 1  # a single model is fine
    with pytest.raises(pk.PasskError, match="no records"):
        pk.group_counts([])


def test_different_n_between_models_is_allowed():
    tallies = [pk.Tally("a", "p", 8, 2), pk.Tally("b", "p", 4, 1)]
    a, b = pk.group_counts(tallies)
    assert (a.n, b.n) == (8, 4)


# --------------------------------------------------------------------------- answer checkers


def test_exact_checker_normalizes():
    assert normalize("  Paris.\n") == "paris"
    assert normalize("New   York  City!?") == "new york city"
    assert check_exact(" The  Answer is 42. ", "the answer is 42")
    assert not check_exact("42 apples", "42")


def test_boxed_checker():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{x^{2} + {1}}") == "x^{2} + {1}"
    assert extract_boxed(r"\boxed{12} then cut off \boxed{3") == "12"
    assert extract_boxed("no box") is None
    assert extract_last_number("it costs 1,234.5 dollars, not 7.") == "7"
    assert extract_last_number("between -3 and 1,000") == "1,000"
    assert to_number("1,000") == 1000 and to_number(r"\$5") == 5 and to_number(r"50\%") == 50
    assert to_number(r"\frac{3}{4}") == 0.75 and to_number("-3/4") == -0.75
    assert to_number("1_000") is None and to_number("abc") is None and to_number("inf") is None
    assert check_boxed(r"The answer is \boxed{1,000}.", "1000")
    assert check_boxed(r"\boxed{\dfrac{1}{2}}", "0.5")
    assert check_boxed("I think 12 then 18", "18.0")
    assert not check_boxed("I think 18 then 12", "18")
    assert check_boxed(r"\boxed{\text{B}}", r"\text{b}")
    assert not check_boxed("no answer", "3")


# --------------------------------------------------------------------------- command


RATES = {"base": 0.2, "instruct": 0.35, "timber": 0.5}


@pytest.fixture
def three_models(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    rows = []
    for model, rate in RATES.items():
        for p in range(12):
            q = float(np.clip(rng.normal(rate, 0.25), 0, 1))
            rows += records(model, {f"p{p}": (rng.random(16) < q).tolist()})
    return write_jsonl(tmp_path / "records.jsonl", rows)


def expected_point(path: Path, model: str, k: int) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    per = {}
    for r in rows:
        if r["model"] == model:
            per.setdefault(r["problem"], []).append(r["correct"])
    return float(np.mean([pk.pass_at_k(len(v), sum(v), k) for v in per.values()]))


def check_outputs(out_dir: Path, records_path: Path, models=("base", "instruct", "timber"), n=16):
    with open(out_dir / "passk.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(pk.CSV_COLUMNS)
    assert [r["model"] for r in rows] == [m for m in models for _ in range(n)]
    for r in rows:
        k = int(r["k"])
        assert float(r["pass_at_k"]) == pytest.approx(expected_point(records_path, r["model"], k), abs=1e-12)
        assert float(r["ci_low"]) - 1e-12 <= float(r["pass_at_k"]) <= float(r["ci_high"]) + 1e-12
        assert (r["n"], r["problems"]) == (str(n), "12")
    png = out_dir / "passk.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100
    return rows


def test_cli_three_models(tmp_path, three_models):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["passk", str(three_models), "-o", str(out), "--bootstrap", "300"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[1].split()
    assert header == ["k", "base", "instruct", "timber"]
    table_rows = {line.split()[0]: line for line in lines[2:] if line.strip() and line.split()[0].isdigit()}
    assert list(table_rows) == ["1", "2", "4", "8", "16"]
    first = f"{expected_point(three_models, 'timber', 1):.3f}"
    assert first in table_rows["1"]
    rows = check_outputs(out, three_models)

    # Same seed, same numbers; the model order follows --models.
    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["passk", str(three_models), "-o", str(again), "--bootstrap", "300",
                                       "--models", "timber,base", "--k", "1,4,32"])
    assert result.exit_code == 0, result.output
    assert "note: timber has n=16; k=32 left out" in result.stderr
    with open(again / "passk.csv", newline="") as f:
        picked = list(csv.DictReader(f))
    assert [(r["model"], r["k"]) for r in picked] == [("timber", "1"), ("timber", "4"), ("base", "1"), ("base", "4")]
    same = {(r["model"], r["k"]): r for r in rows}
    for r in picked:
        assert r == same[(r["model"], r["k"])]


def test_cli_without_bootstrap_leaves_ci_empty(tmp_path, three_models):
    result = CliRunner().invoke(main, ["passk", str(three_models), "-o", str(tmp_path), "--bootstrap", "0", "--k", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "passk.csv", newline="")))
    assert [(r["k"], r["ci_low"], r["ci_high"]) for r in rows] == [("2", "", "")] * 3
    assert (tmp_path / "passk.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--models", "base,nope"], "mergekit-timber: error: unknown model 'nope' in --models; available: base, instruct, timber"),
        (["--k", "1,two"], "mergekit-timber: error: k values must be positive integers, got 'two'"),
        (["--k", "64,128"], "mergekit-timber: error: every requested k exceeds n for every model"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, three_models, extra, message):
    result = CliRunner().invoke(main, ["passk", str(three_models), "-o", str(tmp_path / "o"), *extra])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "o" / "passk.csv").exists()


def test_cli_bad_record_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"model": "m", "problem": "p", "correct": 0}])
    result = CliRunner().invoke(main, ["passk", str(bad), "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"mergekit-timber: error: {bad} line 1: 'correct' must be true or false, got 0"


def test_cli_reads_harness_samples(tmp_path):
    files = []
    for model, flags in (("base", [1, 0, 0]), ("timber", [1, 1, 0])):
        lines = [harness_line(i, value=float(v)) for i, v in enumerate(flags)]
        files.append(str(write_jsonl(tmp_path / "lm" / model / HARNESS_NAME.format(task="gsm8k"), lines)))
    result = CliRunner().invoke(main, ["passk", *files, "-o", str(tmp_path / "o"), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "o" / "passk.csv", newline="")))
    assert [(r["model"], r["k"], r["n"], r["problems"]) for r in rows] == [("base", "1", "1", "3"), ("timber", "1", "1", "3")]
    assert float(rows[0]["pass_at_k"]) == pytest.approx(1 / 3)
    assert float(rows[1]["pass_at_k"]) == pytest.approx(2 / 3)


def test_console_script(tmp_path, three_models):
    out = tmp_path / "out"
    proc = subprocess.run(
        [cli("mergekit-timber"), "passk", str(three_models), "-o", str(out), "--bootstrap", "200"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split() == ["k", "base", "instruct", "timber"]
    check_outputs(out, three_models)
    proc = subprocess.run([cli("mergekit-timber"), "passk", str(three_models), "-o", str(out), "--models", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "mergekit-timber: error: unknown model 'x' in --models; available: base, instruct, timber"


# --------------------------------------------------------------------------- real lm-eval output
# Files written by lm-evaluation-harness itself (scripts/make_lmeval_fixtures.sh): two tiny
# random models, ten local problems, 8 repeats, one task per setup. Every expected n and c
# is counted here from the responses and targets stored in the record, not by the reader.

LMEVAL = Path(__file__).parent / "data" / "lm_eval-0.4.13"
MODEL_DIRS = {"base": "__tmp__lmeval-fixtures__base", "timber": "__tmp__lmeval-fixtures__timber"}
REPEATS = 8


def lmeval_file(model: str, task: str) -> Path:
    (path,) = (LMEVAL / MODEL_DIRS[model]).glob(f"samples_{task}_*.jsonl")
    return path


def lmeval_rows(path: Path, filter_name: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if filter_name is None or r["filter"] == filter_name]


def hand_count(row: dict) -> tuple[int, int]:
    """(n, c): the answers the filter kept and how many equal the target."""
    assert len(row["resps"]) == 1 and len(row["resps"][0]) == REPEATS  # 8 completions generated
    kept = row["filtered_resps"][0]
    answers = kept if isinstance(kept, list) else [kept]
    return len(answers), sum(answer == row["target"] for answer in answers)


def expected_tallies(model: str, task: str, filter_name: str | None = None) -> list[pk.Tally]:
    rows = lmeval_rows(lmeval_file(model, task), filter_name)
    assert [r["doc_id"] for r in rows] == list(range(10))
    return [pk.Tally(model, f"{task}/{r['doc_id']}", *hand_count(r)) for r in rows]


# The fixture tasks pass do_sample and temperature only, as most lm-eval tasks do: every
# read of two of their files carries this note (tested on its own below), besides any other.
UNPINNED = ("the files were not sampled alike (top_p, top_k, min_p not passed in every file, so each "
            "model's generation_config.json decided them)")


def read_both(task: str, **options) -> tuple[list[pk.Tally], list[str]]:
    notes: list[str] = []
    paths = [lmeval_file(m, task) for m in MODEL_DIRS]
    tallies = pk.read_tallies(paths, warn=notes.append, **options)
    sampling = [n for n in notes if n.startswith("the files were not sampled alike")]
    assert all(n.startswith(UNPINNED) for n in sampling), sampling
    return tallies, [n for n in notes if n not in sampling]


def test_lmeval_files_that_left_sampling_to_the_models_are_named():
    """Real lm-eval output of a task whose generation_kwargs give only do_sample and
    temperature: top_p/top_k/min_p came from each model's generation config."""
    notes: list[str] = []
    pk.read_tallies([lmeval_file(m, "tiny_repeat_list") for m in MODEL_DIRS], warn=notes.append)
    assert len(notes) == 1 and notes[0].startswith(UNPINNED), notes
    assert "\n" not in notes[0]


def test_records_sampled_differently_get_one_line_naming_the_difference(tmp_path):
    def records(name: str, sampling: dict | None) -> Path:
        path = tmp_path / name
        rows = [{"model": name, "problem": i, "correct": bool(i % 2), "completion": "x",
                 **({"sampling": sampling} if sampling is not None else {})} for i in range(4)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    pinned = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_new_tokens": 64}
    same, qwen = records("base.jsonl", pinned), records("instruct.jsonl", {**pinned, "top_k": 20, "top_p": 0.95})
    notes: list[str] = []
    pk.read_tallies([same, records("other.jsonl", pinned)], warn=notes.append)
    assert notes == []  # sampled alike: silent
    pk.read_tallies([same, qwen], warn=notes.append)
    assert notes == ["the files were not sampled alike (top_p: 1.0 in base.jsonl, 0.95 in instruct.jsonl; "
                     "top_k: 0 in base.jsonl, 20 in instruct.jsonl): Pass@k of models sampled differently is "
                     "not comparable; pin every knob (scripts/sample.py does; for lm-eval, the task's "
                     "generation_kwargs)"]
    notes.clear()
    pk.read_tallies([same, records("hand.jsonl", None)], warn=notes.append)
    assert len(notes) == 1 and "no settings recorded in hand.jsonl" in notes[0]
    notes.clear()
    pk.read_tallies([records("a.jsonl", None), records("b.jsonl", None)], warn=notes.append)
    assert notes == []  # nothing recorded anywhere (hand-written records): nothing to compare


def assert_counts_spread(tallies: list[pk.Tally]) -> None:
    """The fixture is worth testing: some problems with 0 < c < n, some with c = 0."""
    assert any(0 < t.c < t.n for t in tallies) and any(t.c == 0 for t in tallies)


def test_lmeval_per_repeat_list():
    tallies, notes = read_both("tiny_repeat_list")
    expected = expected_tallies("base", "tiny_repeat_list") + expected_tallies("timber", "tiny_repeat_list")
    assert tallies == expected and notes == []
    assert {t.n for t in tallies} == {REPEATS}
    assert_counts_spread(tallies)
    # The list is the task's own per-repeat score: it agrees with the hand count item by item.
    for row in lmeval_rows(lmeval_file("timber", "tiny_repeat_list")):
        assert row["acc"] == [int(a == row["target"]) for a in row["filtered_resps"][0]]


def test_lmeval_pass_at_1_gives_c():
    tallies, notes = read_both("tiny_pass1")  # metrics pass@1 and pass@8: pass@1 is read
    assert tallies == expected_tallies("base", "tiny_pass1") + expected_tallies("timber", "tiny_pass1")
    assert notes == [] and {t.n for t in tallies} == {REPEATS}
    assert_counts_spread(tallies)
    path = lmeval_file("base", "tiny_pass1")
    with pytest.raises(pk.PasskError) as info:
        pk.read_tallies([path], metric="pass@8")
    assert str(info.value) == (
        f"{path} line 1: metric 'pass@8' is one Pass@8 score for the problem's 8 completions,"
        " not per-sample correctness; use --metric pass@1 (see docs/passk.md, 'Pass@k from lm-evaluation-harness')"
    )


def test_lmeval_pass_at_k_is_refused():
    # humaneval_64 style: metrics pass@2 and pass@8 only; pass@8 of 8 is 0 or 1 ("any correct").
    path = lmeval_file("base", "tiny_passk")
    rows = lmeval_rows(path)
    assert rows[0]["metrics"] == ["pass@2", "pass@8"] and {r["pass@8"] for r in rows} == {0.0, 1.0}
    for metric in (None, "pass@8", "pass@2"):
        with pytest.raises(pk.PasskError) as info:
            pk.read_tallies([path], metric=metric)
        k = (metric or "pass@2").split("@")[1]
        assert str(info.value) == (
            f"{path} line 1: metric 'pass@{k}' is one Pass@{k} score for the problem's 8 completions,"
            " not per-sample correctness; score with pass@1 (k: [1]) or one 0/1 per completion"
            " (see docs/passk.md, 'Pass@k from lm-evaluation-harness')"
        )


def test_lmeval_exact_match_over_all_repeats_sampled():
    # Regex filter without take_first: lm-eval stores exact_match = c/8, often fractional.
    tallies, notes = read_both("tiny_em_all")
    assert tallies == expected_tallies("base", "tiny_em_all") + expected_tallies("timber", "tiny_em_all")
    assert notes == [] and {t.n for t in tallies} == {REPEATS}
    assert_counts_spread(tallies)
    values = [r["exact_match"] for m in MODEL_DIRS for r in lmeval_rows(lmeval_file(m, "tiny_em_all"))]
    assert any(0 < v < 1 for v in values)


def test_lmeval_exact_match_over_all_repeats_greedy_values_are_0_or_1():
    # Greedy: the 8 repeats agree, every stored value is 0.0 or 1.0, and still n = 8.
    for model in MODEL_DIRS:
        assert {r["exact_match"] for r in lmeval_rows(lmeval_file(model, "tiny_em_greedy"))} == {0.0, 1.0}
    tallies, notes = read_both("tiny_em_greedy")
    assert tallies == expected_tallies("base", "tiny_em_greedy") + expected_tallies("timber", "tiny_em_greedy")
    assert notes == [] and {t.n for t in tallies} == {REPEATS}
    assert {t.c for t in tallies} == {0, REPEATS}


def unscored_note(path: Path, filter_name: str) -> str:
    return (
        f"{path}: filter {filter_name!r} scored one answer per problem out of 8 completions"
        " (take_first keeps the first, majority_vote a vote), so n = 1 and 7 of every 8 went"
        " unscored; for Pass@k keep every completion (see docs/passk.md, 'Pass@k from lm-evaluation-harness')"
    )


def test_lmeval_take_first_warns_and_reads_one_sample():
    tallies, notes = read_both("tiny_take_first")  # no filter_list: lm-eval's 'none' = take_first
    expected = expected_tallies("base", "tiny_take_first") + expected_tallies("timber", "tiny_take_first")
    assert tallies == expected and {t.n for t in tallies} == {1}
    assert notes == [unscored_note(lmeval_file(m, "tiny_take_first"), "none") for m in MODEL_DIRS]
    with pytest.warns(pk.PasskWarning, match="take_first keeps the first"):
        pk.read_tallies([lmeval_file("base", "tiny_take_first")])


def test_lmeval_several_filters():
    path = lmeval_file("timber", "tiny_filters")
    with pytest.raises(pk.PasskError) as info:
        pk.read_tallies([path])
    assert str(info.value) == (
        f"{path}: several filters (first, all, vote); choose one with --filter ('all' keeps every completion)"
    )
    for filter_name, n in (("all", REPEATS), ("first", 1), ("vote", 1)):
        notes = []
        tallies = pk.read_tallies([path], filter_name=filter_name, warn=notes.append)
        assert tallies == expected_tallies("timber", "tiny_filters", filter_name)
        assert {t.n for t in tallies} == {n}
        assert notes == ([] if n == REPEATS else [unscored_note(path, filter_name)])
    all_kept = pk.read_tallies([path], filter_name="all")
    assert_counts_spread(all_kept)


def test_lmeval_one_value_over_all_completions_is_refused():
    # process_results returning one 0/1 for the 8 completions (solved by any of them).
    path = lmeval_file("base", "tiny_any")
    with pytest.raises(pk.PasskError) as info:
        pk.read_tallies([path])
    first = lmeval_rows(path)[0]["solved"]
    assert str(info.value) == (
        f"{path} line 1: metric 'solved' = {first} is one score for the problem's 8 completions,"
        " not per-sample correctness; use a per-repeat list, pass@1 or exact_match"
        " (see docs/passk.md, 'Pass@k from lm-evaluation-harness')"
    )


def test_lmeval_labels(tmp_path):
    both = [lmeval_file(m, "tiny_em_all") for m in MODEL_DIRS]
    assert pk.harness_labels(both) == dict(zip(both, ["base", "timber"]))
    assert pk.harness_labels(both[:1]) == {both[0]: "base"}
    # Same last part: the labels keep as many trailing parts as it takes to differ.
    other = tmp_path / "__runs__b__base" / both[0].name
    other.parent.mkdir()
    other.write_bytes(both[0].read_bytes())
    labels = pk.harness_labels([both[0], other])
    assert labels == {both[0]: "lmeval-fixtures/base", other: "b/base"}
    # Hub names: the sanitizer's "__" is the "/" of org/name.
    hub = tmp_path / "Qwen__Qwen3-0.6B" / both[0].name
    hub.parent.mkdir()
    hub.write_bytes(both[0].read_bytes())
    assert pk.harness_labels([hub]) == {hub: "Qwen3-0.6B"}
    # A renamed samples file: its own name; problems are bare doc ids, so renamed files line up.
    renamed = tmp_path / "timber-0.2.jsonl"
    renamed.write_bytes(both[1].read_bytes())
    tallies = pk.read_tallies([renamed])
    assert {t.model for t in tallies} == {"timber-0.2"} and tallies[3].problem == "3"
    # --label wins.
    assert {t.model for t in pk.read_tallies(both, label="mine")} == {"mine"}


def test_lmeval_results_file_gets_a_hint(tmp_path):
    (results,) = (LMEVAL / MODEL_DIRS["base"]).glob("results_*.json")
    hint = (
        "lm-eval's results file holds scores averaged over problems; pass the"
        " samples_<task>_*.jsonl files beside it instead (lm_eval --log_samples writes them)"
    )
    with pytest.raises(pk.PasskError) as info:
        pk.read_tallies([results])
    assert str(info.value) == f"{results}: {hint}"
    renamed = tmp_path / "scores.jsonl"
    renamed.write_bytes(results.read_bytes())
    with pytest.raises(pk.PasskError) as info:
        pk.read_tallies([renamed])
    assert str(info.value) == f"{renamed}: {hint}"
    result = CliRunner().invoke(main, ["passk", str(results), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.stderr.strip() == f"mergekit-timber: error: {results}: {hint}"


def test_cli_on_lmeval_samples(tmp_path):
    files = [str(lmeval_file(m, "tiny_em_all")) for m in MODEL_DIRS]
    out = tmp_path / "o"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "no artists with labels" for a "_" label
        result = CliRunner().invoke(main, ["passk", *files, "-o", str(out), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split() == ["k", "base", "timber"]
    rows = list(csv.DictReader(open(out / "passk.csv", newline="")))
    assert [(r["model"], r["k"], r["n"], r["problems"]) for r in rows] == [
        (m, str(k), "8", "10") for m in MODEL_DIRS for k in range(1, 9)]
    for r in rows:
        counts = [t.c for t in expected_tallies(r["model"], "tiny_em_all")]
        expected = np.mean([pk.pass_at_k(8, c, int(r["k"])) for c in counts])
        assert float(r["pass_at_k"]) == pytest.approx(expected, abs=1e-12)

    take_first = [str(lmeval_file(m, "tiny_take_first")) for m in MODEL_DIRS]
    result = CliRunner().invoke(main, ["passk", *take_first, "-o", str(tmp_path / "t"), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warned[0].startswith(f"warning: {UNPINNED}")  # the fixture tasks pin temperature only
    assert warned[1:] == [f"warning: {unscored_note(Path(f), 'none')}" for f in take_first]


def test_plot_shows_labels_starting_with_underscore(tmp_path):
    from mergekit_timber.cli.passk import plot_curves

    curve = pk.compute_curve(pk.ModelCounts("__tmp__m", 4, ("a", "b"), np.array([1, 3])), resamples=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves([curve], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_lmeval_results_file_on_one_line_gets_the_hint(tmp_path):
    (results,) = (LMEVAL / MODEL_DIRS["timber"]).glob("results_*.json")
    compact = tmp_path / "results.jsonl"
    compact.write_text(json.dumps(json.loads(results.read_text())) + "\n")
    with pytest.raises(pk.PasskError, match=r"results.jsonl: lm-eval's results file holds scores averaged"):
        pk.read_tallies([compact])
    # A native records file is not mistaken for one, whatever its name.
    named = write_jsonl(tmp_path / "results_timber.json", records("m", {"p": [True, False]}))
    assert pk.read_tallies([named]) == [pk.Tally("m", "p", 1, 1), pk.Tally("m", "p", 1, 0)]


def readme_section() -> str:
    text = (Path(__file__).parent.parent / "docs" / "passk.md").read_text()  # the page the README links to
    start = text.index("## Pass@k from lm-evaluation-harness")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_readme_task_keeps_every_completion_and_its_scorer_is_the_fixtures():
    import yaml

    section = readme_section()
    task = yaml.safe_load(section.split("```yaml\n")[1].split("```")[0])
    assert task["repeats"] == 8 and task["generation_kwargs"]["do_sample"] is True
    (pipeline,) = task["filter_list"]
    assert [step["function"] for step in pipeline["filter"]] == ["regex"]  # no take_first, no vote
    assert [m["metric"] for m in task["metric_list"]] == ["exact_match"]
    # The per-completion scorer shown is the one the tiny_repeat_list fixture was written with.
    scope: dict = {}
    exec(section.split("```python\n")[1].split("```")[0], scope)
    rows = lmeval_rows(lmeval_file("timber", "tiny_repeat_list"))
    for row in rows:
        assert scope["per_repeat"](row["doc"], row["filtered_resps"]) == {"acc": row["acc"]}
    assert scope["mean_of_lists"]([r["acc"] for r in rows]) == pytest.approx(
        sum(map(sum, (r["acc"] for r in rows))) / (8 * len(rows)))


def test_readme_task_run_by_lm_eval_gives_n_8():
    # scripts/make_lmeval_fixtures.py ran README's YAML verbatim: its regex never matches the
    # tiny models' letters (c = 0 throughout), but every completion is kept and counted.
    tallies, notes = read_both("my_task_pass8")
    assert notes == [] and {t.n for t in tallies} == {REPEATS}
    # Its generation_kwargs pin top_p/top_k/min_p: lm-eval recorded them, passk has nothing to say.
    raw: list[str] = []
    pk.read_tallies([lmeval_file(m, "my_task_pass8") for m in MODEL_DIRS], warn=raw.append)
    assert raw == []
    assert tallies == expected_tallies("base", "my_task_pass8") + expected_tallies("timber", "my_task_pass8")
    (results,) = (LMEVAL / MODEL_DIRS["base"]).glob("results_*.json")
    config = json.loads(results.read_text())["configs"]["my_task_pass8"]
    assert config["repeats"] == REPEATS and config["filter_list"][0]["name"] == "all"
