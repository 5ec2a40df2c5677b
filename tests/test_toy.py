"""A trained toy pair (scripts/toy_pair.py), merged, chatted with and scored; the study script.

Needs the drop-in output (the Timber output carries the Instruct's config.json,
generation_config.json, tokenizer and chat template): the recipes here are plain.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from helpers import run_cli, write_yaml

import sample
import toy_pair
from mergekit_timber import passk as pk

REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 64
# Timber at lambda 0.95 keeps the head of every delta and 95% of its tail, so greedy
# decoding changes on few problems: its Pass@1 on the 40 held-out problems must stay
# within 0.10 (4 problems) of the Instruct's.
NEAR_ONE_LAMBDA, PASS1_MARGIN = 0.95, 0.10


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """The 'fast' pair, trained once per test session (shared by the xdist workers)."""
    root = tmp_path_factory.getbasetemp().parent  # common to every worker of the run
    out = root / "toy_pair_fast"
    with FileLock(str(root / "toy_pair_fast.lock")):
        if not (out / "pair.json").exists():
            toy_pair.build_pair(out, "fast", seed=0, threads=1, log_every=0)
    return out


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


def test_study_runs_end_to_end_smallest(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "toy_study.py"), "--smallest", "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    labels = ["base", "instruct", "timber_l", "timber-0.5"]
    with open(out / "passk" / "passk.csv") as f:
        assert {line.split(",")[0] for line in f.readlines()[1:]} == set(labels)
    summary = (out / "summary.md").read_text()
    assert all(f"| {label} |" in summary for label in labels), summary
    for png in ("passk/passk.png", "analyze/erank_base_vs_instruct.png", "analyze/erank_ratio_hist.png"):
        assert (out / png).stat().st_size > 0
    for label in labels[1:]:  # every chat model answered through its chat template
        records = [json.loads(line) for line in (out / "samples" / f"{label}.jsonl").read_text().splitlines()]
        assert len(records) == 8 * 4
