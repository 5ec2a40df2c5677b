"""A trained toy pair (scripts/toy_pair.py), merged, chatted with and scored; the study script.

Needs the drop-in output (the Timber output carries the Instruct's config.json,
generation_config.json, tokenizer and chat template): the recipes here are plain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli, shared_toy_pair, write_yaml

import sample
import toy_pair
from mergekit_timber.tools import passk as pk

REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 64
# Timber at lambda 0.95 keeps the head of every delta and 95% of its tail, so greedy
# decoding changes on few problems: its Pass@1 on the 40 held-out problems must stay
# within 0.10 (4 problems) of the Instruct's.
NEAR_ONE_LAMBDA, PASS1_MARGIN = 0.95, 0.10


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """The 'fast' pair, trained once per test session (shared by the xdist workers)."""
    return shared_toy_pair(tmp_path_factory)


@pytest.fixture(scope="module")
def timber_near_one(pair, tmp_path_factory) -> Path:
    """`mergekit-yaml` with a plain timber recipe at lambda 0.95."""
    work = tmp_path_factory.mktemp("timber")
    recipe = write_yaml(work / "timber.yml", {
        "merge_method": "timber", "base_model": str(pair / "base"),
        "models": [{"model": str(pair / "instruct")}], "parameters": {"lambda": NEAR_ONE_LAMBDA},
    })
    run_cli("mergekit-yaml", recipe, work / "out")
    return work / "out"


def greedy_chat(model_dir: Path, prompts: list[str]) -> tuple[list[list[int]], object]:
    """Greedy replies (new token ids) with the directory's own tokenizer, template and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=None, top_p=None)
    stops = set(_stop_ids(model))
    replies = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        # generate pads a sequence that stopped early; keep it up to its first stop id.
        first_stop = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
        replies.append(row[: first_stop + 1])
    return replies, tokenizer


def _stop_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def held_out_prompts(pair: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in (pair / "heldout_chat.jsonl").read_text().splitlines()]


def end_of_turn_id(pair: Path) -> int:
    return json.loads((pair / "instruct" / "config.json").read_text())["eos_token_id"]


def assert_stops_on_end_of_turn(model_dir: Path, pair: Path) -> None:
    stop = end_of_turn_id(pair)
    replies, tokenizer = greedy_chat(model_dir, held_out_prompts(pair))
    for reply in replies:
        text = tokenizer.decode(reply)
        assert reply[-1] == stop, f"{model_dir.name}: no <|im_end|> within {MAX_NEW_TOKENS} tokens: {text!r}"
        assert "\\boxed{" in text, text


def greedy_pass1(model_dir: Path, pair: Path, work: Path) -> float:
    records = work / f"{model_dir.name}.jsonl"
    sample.main(["--model", str(model_dir), "--prompts", str(pair / "heldout_chat.jsonl"), "-o", str(records),
                 "--n", "1", "--temperature", "0", "--chat", "--checker", "boxed",
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "64", "--device", "cpu"])
    (counts,) = pk.group_counts(pk.read_tallies([records]))
    return float(counts.correct.mean())


def test_pair_differs_like_real_pairs(pair):
    base, instruct = (json.loads((pair / m / "config.json").read_text()) for m in ("base", "instruct"))
    assert base["vocab_size"] == instruct["vocab_size"] and base["eos_token_id"] != instruct["eos_token_id"]
    assert (pair / "base" / "tokenizer.json").read_bytes() == (pair / "instruct" / "tokenizer.json").read_bytes()
    assert not (pair / "base" / "chat_template.jinja").exists()
    assert (pair / "instruct" / "chat_template.jinja").exists()


def test_instruct_answers_and_stops_on_end_of_turn(pair):
    assert_stops_on_end_of_turn(pair / "instruct", pair)


def test_timber_output_is_a_drop_in_instruct(pair, timber_near_one, tmp_path):
    """Depends on the drop-in output: template, eos and generation config of the Instruct."""
    assert_stops_on_end_of_turn(timber_near_one, pair)
    instruct = greedy_pass1(pair / "instruct", pair, tmp_path)
    timber = greedy_pass1(timber_near_one, pair, tmp_path)
    assert abs(timber - instruct) <= PASS1_MARGIN, (timber, instruct)


def run_study(out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "toy_study.py"), "-o", str(out), *options],
                          capture_output=True, text=True, timeout=900)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_seed_folder(folder: Path, labels: list[str], problems: int, n: int) -> None:
    with open(folder / "passk" / "passk.csv") as f:
        assert {line.split(",")[0] for line in f.readlines()[1:]} == set(labels)
    for png in ("passk/passk.png", "analyze/erank_base_vs_instruct.png", "analyze/erank_ratio_hist.png"):
        assert (folder / png).stat().st_size > 0
    for label in labels:  # every model sampled n times on every held-out problem
        assert len(records(folder / "samples" / f"{label}.jsonl")) == problems * n


@pytest.fixture(scope="module")
def smallest_runs(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The narrow setting end to end and the default one's pair check, at their smallest
    size, one after the other into the same -o (each writes its own folder)."""
    out = tmp_path_factory.mktemp("toy_study")
    narrow = run_study(out, "--setting", "narrow", "--smallest")
    assert narrow.returncode == 0, narrow.stdout[-2000:] + narrow.stderr[-4000:]
    default = run_study(out, "--smallest", "--precondition-only")
    assert default.returncode == 0, default.stdout[-2000:] + default.stderr[-4000:]
    return out, default, narrow


def test_narrow_pg_setting_runs_end_to_end_smallest(tmp_path):
    """The policy-gradient setting at its smallest: one rejection round, then policy-gradient
    steps that update the model, merged, sampled, scored per seed and pooled."""
    run = run_study(tmp_path, "--setting", "narrow-pg", "--smallest")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    root = tmp_path / "narrow-pg-smallest"
    labels = ["base", "instruct", "timber_l", "timber-0.5"]
    pairs = []
    for seed in (0, 1):
        check_seed_folder(root / f"seed-{seed}", labels, problems=8, n=4)
        pairs.append(json.loads((root / f"seed-{seed}" / "pair" / "pair.json").read_text()))
    for pair in pairs:
        assert pair["settings"]["post"] == "rft+pg" and [r["round"] for r in pair["rft_rounds"]] == [1]
        assert pair["pg"]["steps"] == 6 and pair["pg"]["samples"] == 6 * 4 * 4
        assert len(pair["pg"]["reward_per_10_steps"]) == 1
    # A step with no mixed group takes no update; at least one step of the two seeds did.
    assert sum(pair["pg"]["updates"] for pair in pairs) > 0, pairs
    summary = (root / "summary.md").read_text()
    assert summary == run.stdout
    assert "then 6 steps of policy gradient with a 0/1 reward" in summary
    assert all(f"| {label} |" in summary for label in labels)
    for stage in ("rft round 1: ", "pg step 1/6: mean reward", "pg step 6/6: ", "sampling timber-0.5: 32/32 done"):
        assert stage in run.stderr, run.stderr[-3000:]


def test_policy_gradient_loss_weighs_completion_log_probs_by_advantage():
    """The loss against log-probabilities summed by hand over each row's completion tokens
    (one row at a time, no padding); one step raises the rewarded completion's probability
    and lowers the other's."""
    raw = toy_pair.build_tokenizer()
    ids = {t: raw.token_to_id(t) for t in toy_pair.SPECIALS}
    toy_pair.seed_everything(0)
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(toy_pair.model_config(toy_pair.PRESETS["smallest"], raw.get_vocab_size(), ids)).eval()
    prompt = raw.encode(toy_pair.chat_text((3, 4), with_answer=False)[0]).ids
    good, bad = raw.encode("3+4=7\\boxed{7}").ids, raw.encode("\\boxed{9}").ids
    rows = [(prompt + good + [ids[toy_pair.IM_END]], len(prompt), 0.5),
            (prompt + bad + [ids[toy_pair.IM_END]], len(prompt), -0.5)]

    def completion_log_prob(row) -> float:
        tokens, start, _ = row
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        return sum(float(logp[i - 1, tokens[i]]) for i in range(start, len(tokens)))

    before = [completion_log_prob(r) for r in rows]
    loss = toy_pair.policy_gradient_loss(model, rows, ids[toy_pair.ENDOFTEXT], normaliser=10.0)
    expected = -(0.5 * before[0] - 0.5 * before[1]) / 10.0
    assert abs(loss.item() - expected) < 1e-4, (loss.item(), expected)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss.backward()
    optimizer.step()
    after = [completion_log_prob(r) for r in rows]
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_narrow_setting_runs_end_to_end_smallest(smallest_runs):
    """Rejection-sampling Instruct on two seeds, merged, sampled, scored per seed and pooled."""
    out, _, narrow = smallest_runs
    root = out / "narrow-smallest"
    labels = ["base", "instruct", "timber_l", "timber-0.5"]
    for seed in (0, 1):
        check_seed_folder(root / f"seed-{seed}", labels, problems=8, n=4)
        pair = json.loads((root / f"seed-{seed}" / "pair" / "pair.json").read_text())
        assert [r["round"] for r in pair["rft_rounds"]] == [1, 2] and "sft_final_loss" not in pair
        assert pair["settings"]["post"] == "rft"
    trained = [r for seed in (0, 1) for r in json.loads(
        (root / f"seed-{seed}" / "pair" / "pair.json").read_text())["rft_rounds"] if r["correct"]]
    assert trained and all(r["final_loss"] > 0 for r in trained), "no round had a correct sample to train on"
    pooled = records(root / "pooled" / "samples" / "instruct.jsonl")
    assert {r["problem"].split("/")[0] for r in pooled} == {"seed-0", "seed-1"} and len(pooled) == 2 * 8 * 4
    assert (root / "pooled" / "passk" / "passk.png").stat().st_size > 0
    summary = (root / "summary.md").read_text()
    assert summary == narrow.stdout, "the printed tables are the file's"
    assert "rejection-sampling fine-tuning" in summary and "Measured with torch " in summary
    assert all(f"| {label} |" in summary for label in labels) and "Pass@4 over seeds" in summary
    assert "\n| pooled | " in summary and "Met on " in summary and "bands above / below" in summary
    assert "top_k 50, min_p 0 (every model alike)" in summary and "CPU math pinned: MKL_CBWR=COMPATIBLE" in summary
    assert summary.splitlines()[-1].startswith("Machine: ")
    assert {r["sampling"]["top_k"] for r in pooled} == {50}  # stated, not inherited
    assert summary.count("\n| 0 | ") == 2 and summary.count("\n| 1 | ") == 2  # precondition, analyze
    # Nothing long is silent in a log: training and sampling report as they go.
    for stage in ("base training steps: 0/40", "rft round 2: ", "sampling timber-0.5: 32/32 done"):
        assert stage in narrow.stderr, narrow.stderr[-3000:]


def test_another_instruction_set_gives_the_same_bits(smallest_runs, tmp_path):
    """The narrow setting again, in an environment asking MKL and torch for AVX2 code paths
    (what another CPU would pick by itself): scripts/pinned_math.py overrides both, so the
    trained pairs, the merged models, the samples and the summary are byte for byte those of
    the first run (which took this CPU's own widest paths)."""
    out, _, narrow = smallest_runs
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "toy_study.py"), "-o", str(tmp_path),
                            "--setting", "narrow", "--smallest"], capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == narrow.stdout
    first, second = out / "narrow-smallest", tmp_path / "narrow-smallest"
    compared = 0
    for path in sorted(first.rglob("*")):
        if path.suffix in (".safetensors", ".jsonl", ".csv") and "analyze" not in path.parts:
            assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path
            compared += path.suffix == ".safetensors"
    assert compared >= 2 * (2 + 2)  # per seed: base, instruct, timber_l, timber-0.5


def test_default_setting_pair_and_scores_smallest(smallest_runs):
    out, default, _ = smallest_runs
    root = out / "default-smallest-precondition"
    assert "sft_final_loss" in json.loads((root / "seed-0" / "pair" / "pair.json").read_text())
    assert len(records(root / "seed-0" / "samples" / "instruct.jsonl")) == 8 * 4
    summary = (root / "summary.md").read_text()
    assert "SFT on one teacher answer style" in summary and "| seed | base Pass@1 |" in summary
    assert "| timber" not in summary and not (root / "seed-0" / "models").exists()  # no merge
    for stage in ("sft training steps: 30/30 done", "sampling base: 0/32"):
        assert stage in default.stderr, default.stderr[-3000:]


def test_second_run_of_a_setting_refuses_and_keeps_the_first(smallest_runs):
    out, _, _ = smallest_runs
    weights = out / "narrow-smallest" / "seed-0" / "pair" / "instruct" / "model.safetensors"
    before = weights.read_bytes()
    again = run_study(out, "--setting", "narrow", "--smallest")
    assert again.returncode != 0
    assert "already holds a run of setting narrow-smallest" in again.stderr, again.stderr[-2000:]
    assert weights.read_bytes() == before


def test_precondition_needs_both_bands_apart():
    import toy_study

    scores = {("base", 1): (5.0, 4.0, 6.0), ("instruct", 1): (9.0, 6.5, 11.0),
              ("base", 32): (75.0, 66.0, 83.0), ("instruct", 32): (60.0, 50.0, 65.0)}
    assert toy_study.precondition(scores, 32) == (True, True)
    scores[("instruct", 32)] = (60.0, 50.0, 66.0)  # bands touch: not apart
    assert toy_study.precondition(scores, 32) == (True, False)
