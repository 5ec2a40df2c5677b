"""`mergekit-timber search` end to end: real Ray (embedded), real lm-eval, a trained toy pair.

One sweep, one lm-eval evaluation per model as Ray tasks, Pass@k per lambda; a re-run
evaluates nothing; a failing evaluation is reported by model and retried once; bad input
stops before any work with one line.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
from helpers import run_cli, shared_toy_pair, write_yaml

from mergekit_timber.tools import passk as pk

import toy_lmeval_task

LAMBDAS = "0,0.5"
MODELS = ("base", "lambda-0", "lambda-0.5", "instruct")
PROBLEMS, REPEATS = 6, 4

# A chat task whose scoring kills its worker process the first time it runs (whichever
# model that is), and a Base task whose scoring always raises.
CRASH_ONCE = '''
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # lm-eval loads this file by path
from toy_sums_utils import per_repeat as _score  # noqa: E402


def per_repeat(doc, results):
    try:
        os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return _score(doc, results)
    os._exit(3)  # the first caller dies, as a worker killed mid-evaluation


def always_fails(doc, results):
    raise ValueError("scoring failed on purpose")
'''


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """The 'fast' pair, trained once per test session (shared by the xdist workers)."""
    return shared_toy_pair(tmp_path_factory)


@pytest.fixture
def work(pair, tmp_path) -> Path:
    """A recipe for the pair and local lm-eval tasks over its first held-out problems."""
    tasks = tmp_path / "tasks"
    toy_lmeval_task.write_tasks(pair, tasks, repeats=REPEATS, limit=PROBLEMS)
    (tasks / "crash_utils.py").write_text(CRASH_ONCE.format(marker=str(tmp_path / "crashed-once")))
    for name, source, function in (("toy_sums_crash", "toy_sums", "per_repeat"),
                                   ("toy_sums_base_broken", "toy_sums_base", "always_fails")):
        text = (tasks / f"{source}.yaml").read_text().replace(f"task: {source}\n", f"task: {name}\n")
        text = text.replace("!function toy_sums_utils.per_repeat", f"!function crash_utils.{function}")
        (tasks / f"{name}.yaml").write_text(text)
    write_yaml(tmp_path / "timber.yml", {"merge_method": "timber", "base_model": str(pair / "base"),
                                         "models": [{"model": str(pair / "instruct")}]})
    return tmp_path


def search(work: Path, *args, check=True):
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    return run_cli("mergekit-timber", "search", work / "timber.yml", "-o", work / "out", "--lambdas", LAMBDAS,
                   "--include-path", work / "tasks", "--max-gen-toks", 40, "--bootstrap", 50, "--workers", 2,
                   "--k", "1,2,4", *args, check=check, env=env, timeout=900)


def evaluated(stderr: str) -> list[str]:
    return re.findall(r"^evaluation of (\S+): done", stderr, re.M)


def test_search_runs_resumes_and_retries_a_failed_evaluation(work):
    first = search(work, "--tasks", "toy_sums", "--base-tasks", "toy_sums_base")
    assert sorted(evaluated(first.stderr)) == sorted(MODELS)
    out = work / "out"
    for model in MODELS:
        record = json.loads((out / "evals" / model / "record.json").read_text())
        settings = record["settings"]
        # Pinned sampling, the same for every model (the Instruct's generation_config says 0.7).
        assert settings["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                        "do_sample": True, "max_gen_toks": 40, "seed": 1234}
        assert settings["chat"] is (model != "base")
        samples = [json.loads(line) for line in (out / "evals" / model / record["samples"][settings["tasks"][0]])
                   .read_text().splitlines()]
        assert len(samples) == PROBLEMS and all(len(s["resps"][0]) == REPEATS for s in samples)
        kwargs = samples[0]["arguments"]["gen_args_0"]["arg_1"]
        assert {k: kwargs[k] for k in ("temperature", "top_p", "top_k", "min_p", "do_sample")} == {
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "do_sample": True}

    # passk reads lm-eval's record of those settings: the models' files agree, no note.
    notes: list[str] = []
    pk.read_tallies([out / "evals" / m / json.loads((out / "evals" / m / "record.json").read_text())["samples"]["toy_sums"]
                     for m in MODELS if m != "base"], fmt="lm-eval", warn=notes.append)
    assert notes == []

    rows = list(csv.DictReader(open(out / "passk.csv")))
    assert {(r["model"], int(r["k"])) for r in rows} == {(m, k) for m in MODELS for k in (1, 2, 4)}
    assert all(int(r["n"]) == REPEATS and int(r["problems"]) == PROBLEMS for r in rows)
    best = list(csv.DictReader(open(out / "best_lambda.csv")))
    assert [int(b["k"]) for b in best] == [1, 2, 4]
    assert all(b["best_lambda"] in ("0.0", "0.5") for b in best)
    summary = (out / "summary.md").read_text()
    assert first.stdout == summary and "| lambda-0.5 | 0.5 |" in summary and "Best lambda at each k" in summary
    assert (out / "passk_vs_lambda.png").stat().st_size > 0

    # Re-run: nothing merged, nothing evaluated, the same result.
    again = search(work, "--tasks", "toy_sums", "--base-tasks", "toy_sums_base")
    assert evaluated(again.stderr) == []
    assert "evaluating" not in again.stderr and "sweep: every lambda's output already" in again.stderr
    assert again.stdout == summary

    # Other tasks: every model is evaluated anew; the first worker to score dies (retried
    # once and then fine); the Base's scoring always raises (reported, retried, reported).
    failing = search(work, "--tasks", "toy_sums_crash", "--base-tasks", "toy_sums_base_broken", check=False)
    assert failing.returncode == 1, failing.stderr
    retried = re.findall(r"^evaluation of (\S+) failed: (.*); retrying once$", failing.stderr, re.M)
    assert ("base", "ValueError: scoring failed on purpose") in retried
    died = [model for model, reason in retried if reason == "its Ray worker died"]
    assert len(died) == 1 and died[0] in MODELS, failing.stderr
    assert re.search(r"^evaluation of base failed again: ValueError: scoring failed on purpose$", failing.stderr, re.M)
    assert sorted(evaluated(failing.stderr)) == sorted(m for m in MODELS if m != "base")
    last = failing.stderr.strip().splitlines()[-1]
    assert last.startswith("mergekit-timber: error: 1 evaluation(s) failed twice (base: ValueError"), last
    assert "| instruct |" in failing.stdout and "| base |" not in failing.stdout
    assert not (out / "evals" / "base" / "record.json").read_text().count("toy_sums_base_broken")


@pytest.mark.parametrize("args, message", [
    (["--lambdas", "0,1.5"], "--lambdas: lambda must lie in [0, 1]; got 1.5"),
    (["--tasks", "toy_sumz"], "--tasks: unknown lm-eval task 'toy_sumz'"),
    (["--no-base-in-recipe"], "search needs the Base model as base_model:"),
])
def test_search_bad_input_stops_with_one_line_before_any_work(work, args, message):
    recipe = work / "timber.yml"
    if args == ["--no-base-in-recipe"]:
        recipe = write_yaml(work / "nobase.yml", {"merge_method": "timber",
                                                  "models": [{"model": str(work / "instruct")}]})
        args = []
    tasks = [] if "--tasks" in args else ["--tasks", "toy_sums"]
    proc = run_cli("mergekit-timber", "search", recipe, "-o", work / "out", "--include-path", work / "tasks",
                   *tasks, *args, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergekit-timber: error: ") and message in lines[0], proc.stderr
    assert not (work / "out").exists()


def test_missing_extra_names_it(monkeypatch):
    from mergekit_timber.errors import TimberError
    from mergekit_timber.tools.search import require_extra

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it fails
    with pytest.raises(TimberError, match=r"needs ray: pip install 'mergekit-timber\[search\]'"):
        require_extra()


def test_the_merge_method_imports_neither_search_nor_ray_nor_lm_eval():
    code = ("import sys, mergekit.merge, mergekit_timber.method.adapter, mergekit_timber.tools.sweep, mergekit_timber.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'lm_eval') or m.startswith('mergekit_timber.tools.search')))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_report_scores_real_lm_eval_samples_with_passk_and_a_paired_band(tmp_path):
    """search_report on lm-eval's own output (tests/data): the same numbers as passk, the Base's
    variant task scored under the task's name, the best lambda and its paired difference."""
    import numpy as np

    from mergekit_timber.tools import passk as pk
    from mergekit_timber.tools.search_eval import EvalJob, Sampling
    from mergekit_timber.tools.search_report import report

    data = Path(__file__).parent / "data" / "lm_eval-0.4.13"
    files = {m: next((data / f"__tmp__lmeval-fixtures__{m}").glob(f"samples_{t}_*.jsonl"))
             for m, t in (("base", "tiny_repeat_list"), ("timber", "tiny_repeat_list"))}
    files["variant"] = next((data / "__tmp__lmeval-fixtures__base").glob("samples_tiny_em_all_*.jsonl"))
    jobs = []
    for label, key, task in (("base", "variant", "tiny_em_all"), ("lambda-0.5", "timber", "tiny_repeat_list"),
                             ("instruct", "base", "tiny_repeat_list")):
        out = tmp_path / "evals" / label
        out.mkdir(parents=True)
        (out / "samples.jsonl").write_bytes(files[key].read_bytes())
        (out / "record.json").write_text(json.dumps({"samples": {task: "samples.jsonl"}}))
        jobs.append(EvalJob(label, "m", (task,), ("tiny_repeat_list",), None, False, False, Sampling(), None, None,
                            None, 16, "hf", "cpu", "auto", 1, str(out), "f"))
    text = report(jobs, {"lambda-0.5": 0.5}, (1, 4), 200, 0.95, 0, tmp_path, say=lambda m: None)

    rows = {(r["model"], int(r["k"])): r for r in csv.DictReader(open(tmp_path / "passk.csv"))}
    for label, key in (("lambda-0.5", "timber"), ("instruct", "base")):
        (counts,) = pk.group_counts(pk.read_tallies([files[key]], label=label))
        curve = pk.compute_curve(counts, (1, 4), 200, 0.95, 0)
        assert [float(rows[(label, k)]["pass_at_k"]) for k in (1, 4)] == pytest.approx(curve.pass_at_k.tolist())
        assert [float(rows[(label, k)]["ci_low"]) for k in (1, 4)] == pytest.approx(curve.ci_low.tolist())
    assert rows[("base", 1)]["problems"] == "10"  # tiny_em_all/<doc> read as tiny_repeat_list/<doc>
    best = {int(b["k"]): b for b in csv.DictReader(open(tmp_path / "best_lambda.csv"))}
    for k in (1, 4):
        diff = float(rows[("lambda-0.5", k)]["pass_at_k"]) - float(rows[("instruct", k)]["pass_at_k"])
        assert best[k]["best_lambda"] == "0.5" and float(best[k]["diff_vs_instruct"]) == pytest.approx(diff)
        assert float(best[k]["diff_low"]) <= diff <= float(best[k]["diff_high"])
        assert not np.isnan(float(best[k]["diff_low"]))
    assert "| lambda-0.5 | 0.5 |" in text and (tmp_path / "passk_vs_lambda.png").exists()
