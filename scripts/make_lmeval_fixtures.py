"""Write the lm-evaluation-harness fixtures of tests/test_passk.py with the real harness.

Run by scripts/make_lmeval_fixtures.sh with a Python that has lm-eval installed (not the
project's venv: the project's tests read the committed files and never need lm-eval).

It builds, under WORK (default /tmp/lmeval-fixtures, a fixed path so that lm-eval's
sanitized model directory names, which embed it, are the same on every run):
- two tiny Llama models with random weights (seeds 1 and 2) and a local word-level
  tokenizer (transformers config + save_pretrained, nothing from the Hub); the answer
  alphabet is three letters and each completion is one token, so a random model gets
  some of its eight samples right and the counts c spread over 0..8;
- a local data set of ten problems (WORK/data/problems.jsonl) and one lm-eval task per
  setup that `mergekit-timber passk` must read or refuse (WORK/tasks/*.yaml, utils.py),
  plus the minimal task of docs/passk.md's "Pass@k from lm-evaluation-harness", copied
  verbatim from that page (its completions never match its regex here: it shows n, not c);
then runs `lm_eval run --log_samples` once per model over all tasks and copies every
samples_<task>_<date>.jsonl (and the results_<date>.json) to
tests/data/lm_eval-<version>/<model_name_sanitized>/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LETTERS = ["a", "b", "c"]
PROBLEMS = 10
REPEATS = 8

# Ten problems: a question of three letters, the answer one letter (the model is random,
# so what matters is only that each problem has one right answer).
QUESTIONS = ["a b c", "b b a", "c a c", "a a a", "b c b", "c c a", "a c b", "b a a", "c b c", "a b b"]
ANSWERS = ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a"]

# Task files. Every task samples REPEATS completions of one token per problem.
SAMPLE = """\
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 1
  do_sample: true
  temperature: 1.0
"""
COMMON = f"""\
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/problems.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_target: "{{{{answer}}}}"
repeats: {REPEATS}
num_fewshot: 0
metadata:
  version: 1.0
"""
KEEP_ALL = """\
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
"""
# A regex filter with no take_first keeps every repeat; exact_match then stores c/n.
ALL_REPEATS_EXACT_MATCH = """\
filter_list:
  - name: all
    filter:
      - function: regex
        regex_pattern: "([abc])"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASKS = {
    # process_results returns one 0/1 per completion: the per-repeat list.
    "tiny_repeat_list": SAMPLE + KEEP_ALL + """\
process_results: !function utils.per_repeat
metric_list:
  - metric: acc
    aggregation: !function utils.mean_of_lists
    higher_is_better: true
""",
    # humaneval-style pass@k metric over the completions, with k = 1 (and 8 beside it).
    "tiny_pass1": SAMPLE + KEEP_ALL + """\
metric_list:
  - metric: !function utils.pass_at_k
    aggregation: mean
    higher_is_better: true
    k: [1, 8]
""",
    # humaneval_64-style: only pass@k with k >= 2 (pass@8 = any correct of the 8).
    "tiny_passk": SAMPLE + KEEP_ALL + """\
metric_list:
  - metric: !function utils.pass_at_k
    aggregation: mean
    higher_is_better: true
    k: [2, 8]
""",
    # exact_match over all repeats (regex filter without take_first): lm-eval stores c/n.
    "tiny_em_all": SAMPLE + ALL_REPEATS_EXACT_MATCH,
    # The same with greedy decoding: the 8 repeats agree, so every value is 0.0 or 1.0.
    "tiny_em_greedy": """\
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 1
  do_sample: false
""" + ALL_REPEATS_EXACT_MATCH,
    # No filter_list: lm-eval's default 'none' filter is take_first (1 of 8 scored).
    "tiny_take_first": SAMPLE + """\
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    # Several filters over the same completions (gsm8k / self-consistency style).
    "tiny_filters": SAMPLE + """\
filter_list:
  - name: first
    filter:
      - function: regex
        regex_pattern: "([abc])"
      - function: take_first
  - name: all
    filter:
      - function: regex
        regex_pattern: "([abc])"
  - name: vote
    filter:
      - function: regex
        regex_pattern: "([abc])"
      - function: majority_vote
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    # One 0/1 for all 8 completions (solved by any of them): no per-sample correctness.
    "tiny_any": SAMPLE + KEEP_ALL + """\
process_results: !function utils.any_correct
metric_list:
  - metric: solved
    aggregation: mean
    higher_is_better: true
""",
}

UTILS = '''\
"""Metrics of the tiny fixture tasks (exact match stands in for running code)."""

from math import comb


def per_repeat(doc, results):
    # results[0]: the doc's completions after the filter, one per repeat.
    return {"acc": [int(r == doc["answer"]) for r in results[0]]}


def mean_of_lists(items):
    flat = [x for item in items for x in item]
    return sum(flat) / len(flat)


def any_correct(doc, results):
    return {"solved": int(any(r == doc["answer"] for r in results[0]))}


def pass_at_k(references, predictions, k=None):
    # Same interface and result keys as lm-eval's humaneval utils.pass_at_k (code_eval).
    ks = [k] if isinstance(k, int) else k
    out = {}
    for kk in ks:
        scores = []
        for ref, preds in zip(references, predictions):
            n, c = len(preds), sum(p == ref for p in preds)
            scores.append(1.0 if n - c < kk else 1.0 - comb(n - c, kk) / comb(n, kk))
        out[f"pass@{kk}"] = sum(scores) / len(scores)
    return out
'''


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<eos>", "Q:", "A:", *LETTERS])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def build_model(path: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,  # docs/passk.md task: 256 new
        # Large random weights: each prompt gets its own peaked answer distribution,
        # so the number of right samples per problem spreads from 0 to 8.
        initializer_range=1.0, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False  # lm-eval's task generation_kwargs decide
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def readme_task() -> tuple[str, str]:
    """(task name, YAML) of the minimal task in docs/passk.md's lm-eval section, as written there."""
    text = (REPO / "docs" / "passk.md").read_text(encoding="utf-8")
    section = text[text.index("## Pass@k from lm-evaluation-harness") :]
    body = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    name = body.splitlines()[0].removeprefix("task:").strip()
    return name, body


def write_tasks(work: Path) -> list[str]:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]
    assert len(rows) == PROBLEMS
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (data / "problems.jsonl").write_text(lines)
    (work / "problems.jsonl").write_text(lines)  # README's task names it so
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "utils.py").write_text(UTILS)
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(f"task: {name}\n{COMMON}{body}")
    name, body = readme_task()
    (tasks / f"{name}.yaml").write_text(body)
    return [*TASKS, name]


def run_lm_eval(work: Path, model: Path, tasks: list[str]) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(work / "hf"), "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={model},dtype=float32",
        "--tasks", ",".join(tasks), "--include_path", str(work / "tasks"),
        "--device", "cpu", "--batch_size", "16", "--log_samples", "--output_path", str(work / "out"),
    ]
    print("+", " ".join(cmd), flush=True)
    # cwd = WORK: the tasks name their data file relative to it.
    subprocess.run(cmd, cwd=work, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmeval-fixtures"))
    args = parser.parse_args()
    from importlib.metadata import version

    lm_eval_version = version("lm_eval")
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)  # our own scratch directory, rebuilt from nothing
    tasks = write_tasks(work)
    for name, seed in (("base", 1), ("timber", 2)):
        build_model(work / name, seed)
        run_lm_eval(work, work / name, tasks)

    dest = REPO / "tests" / "data" / f"lm_eval-{lm_eval_version}"
    if dest.exists():
        shutil.rmtree(dest)  # only the generated fixtures of this lm-eval version
    for model_dir in sorted(p for p in (work / "out").iterdir() if p.is_dir()):
        for f in sorted(model_dir.glob("*.json*")):
            target = dest / model_dir.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            print(f"wrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
