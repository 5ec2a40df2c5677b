"""scripts/sample.py end to end on a tiny random Llama built locally (no Hub)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_timber.tools import passk as pk
from mergekit_timber.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "sample.py"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
SENTENCES = [
    "what is two plus two ? the answer is 4",
    "what is three plus four ? the answer is 7",
    "name the capital of france . paris",
    "user assistant : boxed { 12 } 1 2 3 5 6 8 9 0",
]


def build_tiny_model(path: Path) -> Path:
    """A 2-layer Llama (hidden 32) and a WordLevel tokenizer trained here on a few sentences."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=raw.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def sampler():
    spec = importlib.util.spec_from_file_location("sample_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROBLEMS = [
    {"id": "add-1", "prompt": "what is two plus two ?", "answer": "4"},
    {"id": "add-2", "prompt": "what is three plus four ?", "answer": "7"},
    {"id": 3, "prompt": "name the capital of france .", "answer": "Paris"},
]


def write_prompts(path: Path, problems=PROBLEMS) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sampler_subprocess_end_to_end(tmp_path, tiny_model):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "records.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model), "--prompts", str(prompts), "-o", str(out),
         "--n", "3", "--max-new-tokens", "4", "--batch-size", "4", "--temperature", "0.9", "--top-p", "0.95",
         "--seed", "1", "--device", "cpu", "--checker", "exact"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 9 records" in proc.stderr
    rows = read_records(out)
    assert len(rows) == 3 * len(PROBLEMS)
    for row in rows:
        assert set(row) >= {"model", "problem", "correct", "completion", "sample"}
        assert isinstance(row["correct"], bool) and isinstance(row["completion"], str)
        assert row["model"] == "tiny-llama"  # the directory name
    assert [(r["problem"], r["sample"]) for r in rows] == [
        (p["id"], j) for p in PROBLEMS for j in range(3)]

    # The records are valid pass@k input.
    (counts,) = pk.group_counts(pk.read_tallies([out]))
    assert counts.n == 3 and counts.problems == ("3", "add-1", "add-2")
    result = CliRunner().invoke(main, ["passk", str(out), "-o", str(tmp_path / "passk"), "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "passk" / "passk.csv", newline="") as f:
        assert [r["k"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_sampler_is_seeded_and_checks_answers(tmp_path, tiny_model, sampler):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["--model", str(tiny_model), "--n", "2", "--max-new-tokens", "4", "--device", "cpu", "--chat"]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert sampler.main([*common, "--prompts", str(prompts), "-o", str(first), "--seed", "5", "--label", "m"]) == 0
    assert sampler.main([*common, "--prompts", str(prompts), "-o", str(second), "--seed", "5", "--label", "m"]) == 0
    assert read_records(first) == read_records(second)
    assert {r["model"] for r in read_records(first)} == {"m"}

    # Greedy output made the reference: every sample must be judged correct.
    greedy = tmp_path / "greedy.jsonl"
    sampler.main([*common, "--prompts", str(prompts), "-o", str(greedy), "--temperature", "0"])
    completions = {r["problem"]: r["completion"] for r in read_records(greedy)}
    assert all(completions.values()), "the tiny model should emit some tokens"
    echoed = write_prompts(tmp_path / "echo.jsonl",
                           [{**p, "answer": "  " + completions[p["id"]].upper() + " ."} for p in PROBLEMS])
    checked = tmp_path / "checked.jsonl"
    sampler.main([*common, "--prompts", str(echoed), "-o", str(checked), "--temperature", "0"])
    assert all(r["correct"] for r in read_records(checked))


def test_sampler_errors(tmp_path, tiny_model, sampler):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "what"}\n')
    base = ["--model", str(tiny_model), "-o", str(tmp_path / "o.jsonl"), "--n", "1", "--max-new-tokens", "1"]
    with pytest.raises(SystemExit, match=r"bad.jsonl line 1: missing key 'answer'"):
        sampler.main([*base, "--prompts", str(bad)])

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    with pytest.raises(SystemExit, match=r"not a model directory"):
        sampler.main([*base, "--prompts", str(prompts), "--model", str(tmp_path / "nope")])

    plain = tmp_path / "plain"
    build_tiny_model(plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(SystemExit, match=r"--chat given but the tokenizer has no chat template"):
        sampler.main([*base, "--prompts", str(prompts), "--model", str(plain), "--chat"])

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(SystemExit, match=r"--backend vllm needs vLLM \(pip install vllm\)"):
            sampler.main([*base, "--prompts", str(prompts), "--backend", "vllm"])
    assert not (tmp_path / "o.jsonl").exists(), "errors come before the output is opened"


def test_generation_config_does_not_change_the_samples(tmp_path, tiny_model, sampler):
    """A Qwen3-style generation_config.json (top_k 20, top_p 0.95; here top_k 1, which would
    make every sample the greedy one) must not reach the sampler: every knob is explicit."""
    import shutil

    with_config = tmp_path / "with-config"
    shutil.copytree(tiny_model, with_config)
    config_file = with_config / "generation_config.json"  # keeps its eos/pad/bos ids
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "do_sample": True, "top_k": 1,
                                       "top_p": 0.5, "min_p": 0.9, "temperature": 0.1}))
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["--n", "8", "--max-new-tokens", "6", "--device", "cpu", "--seed", "3", "--label", "m",
              "--prompts", str(prompts)]
    plain, configured = tmp_path / "plain.jsonl", tmp_path / "configured.jsonl"
    assert sampler.main([*common, "--model", str(tiny_model), "-o", str(plain)]) == 0
    assert sampler.main([*common, "--model", str(with_config), "-o", str(configured)]) == 0
    assert read_records(plain) == read_records(configured)
    assert len({r["completion"] for r in read_records(plain)}) > len(PROBLEMS)  # really sampled
    assert read_records(plain)[0]["sampling"] == {
        "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_new_tokens": 6}

    # The knobs do act when given: top_k 1 is greedy.
    greedy_k = tmp_path / "top1.jsonl"
    assert sampler.main([*common, "--model", str(tiny_model), "-o", str(greedy_k), "--top-k", "1"]) == 0
    by_problem = {}
    for r in read_records(greedy_k):
        by_problem.setdefault(r["problem"], set()).add(r["completion"])
    assert all(len(c) == 1 for c in by_problem.values())
