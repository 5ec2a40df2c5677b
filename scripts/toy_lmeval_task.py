#!/usr/bin/env python
"""Write local lm-evaluation-harness tasks over a toy pair's held-out problems.

    python scripts/toy_lmeval_task.py PAIR TASKS_DIR [--repeats 16] [--limit N]

PAIR is a scripts/toy_pair.py output (heldout_chat.jsonl, heldout_base.jsonl). Writes into
TASKS_DIR (for `--include-path`):
- toy_sums.yaml: the user message "What is 3+5+2?" (chat models get it through their chat
  template, as scripts/sample.py sends it), stopping at the end of the turn;
- toy_sums_base.yaml: the same problems, in the same order, as the Base's plain prompt
  "Q: 3+5+2\\nA:" (for `--base-tasks`);
- toy_sums_utils.py: the score of each completion, one 0/1 per repeat (the answer in the
  last \\boxed{}, scripts/answer_check.py), which `mergekit-timber passk` and `search` read
  as per-sample correctness.
The data files are named by absolute path: Ray workers do not run in this folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent

COMMON = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
repeats: {repeats}
num_fewshot: 0
generation_kwargs:
  until: {until}
  do_sample: true
  temperature: 1.0
# Keep every repeat (lm-eval's default filter would keep the first only).
filter_list:
  - name: all
    filter:
      - function: remove_whitespace
process_results: !function toy_sums_utils.per_repeat
metric_list:
  - metric: acc
    aggregation: !function toy_sums_utils.mean_of_lists
    higher_is_better: true
metadata:
  version: 1.0
"""

UTILS = '''\
"""Scores of the toy sums tasks: one 0/1 per completion (the last \\\\boxed{{}} against the sum)."""

import sys

sys.path.insert(0, {scripts!r})
from answer_check import check_boxed  # noqa: E402


def per_repeat(doc, results):
    # results[0]: the doc's completions after the filter, one per repeat.
    return {{"acc": [int(check_boxed(r, doc["answer"])) for r in results[0]]}}


def mean_of_lists(items):
    flat = [x for item in items for x in item]
    return sum(flat) / len(flat)
'''


def write_tasks(pair: Path, out: Path, repeats: int, limit: int | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy_sums_utils.py").write_text(UTILS.format(scripts=str(SCRIPTS)), encoding="utf-8")
    written = []
    for name, source, until in (("toy_sums", "heldout_chat.jsonl", ["<|im_end|>", "<|endoftext|>"]),
                                ("toy_sums_base", "heldout_base.jsonl", ["<|endoftext|>", "\nQ:"])):
        rows = (pair / source).read_text(encoding="utf-8").splitlines()
        data = out / f"{name}.jsonl"
        data.write_text("".join(line + "\n" for line in rows[:limit]), encoding="utf-8")
        body = COMMON.format(data=json.dumps(str(data.resolve())), repeats=repeats, until=json.dumps(until))
        path = out / f"{name}.yaml"
        path.write_text(f"task: {name}\n{body}", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pair", type=Path, help="a scripts/toy_pair.py output")
    p.add_argument("out", type=Path, help="folder for the task files (lm-eval's --include-path)")
    p.add_argument("--repeats", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--limit", type=int, help="first N held-out problems only")
    args = p.parse_args(argv)
    for path in write_tasks(args.pair, args.out, args.repeats, args.limit):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
