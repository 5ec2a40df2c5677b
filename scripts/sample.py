#!/usr/bin/env python
"""Draw n samples per problem from a local model and write pass@k correctness records.

    python scripts/sample.py --model DIR --prompts problems.jsonl -o records.jsonl \\
        --n 32 --temperature 0.8 --checker boxed --chat

PROMPTS is JSON Lines, one problem a line: {"id": ..., "prompt": ..., "answer": ...}.
Each completion is checked against "answer" (--checker exact: whole completion after
normalisation; boxed: last \\boxed{...} or last number, compared numerically) and written
as {"model", "problem", "sample", "correct", "completion", "sampling"}, the input of
`mergekit-timber passk`.

Sampling is the same for every model: temperature, top_p, top_k and min_p are passed
explicitly (defaults: 1, 1, off, off), so none comes from a model's generation_config.json
(a Qwen3 Instruct's top_k 20 and top_p 0.95 would otherwise apply to it and not to its
Base). "sampling" records them with the token budget; `passk` warns when the files it
compares were sampled differently.

The default backend is transformers (CPU or GPU, --device): fine for small models and a
few hundred samples. For bigger runs (n in the hundreds, 7B+ models) use vLLM with
`--backend vllm` after `pip install vllm`; it takes the same options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # answer_check.py beside this script
from answer_check import CHECKERS  # noqa: E402
from mergekit_timber.tools.passk import PasskError, read_jsonl


class progress:
    """Progress of a long loop: a tqdm bar on a terminal; in a log (stderr not a terminal, or
    TOY_PROGRESS=lines: parallel runs), a line when it starts, one at most every HEARTBEAT
    seconds, and one when it ends."""

    HEARTBEAT = 10.0

    def __init__(self, iterable, total: int, desc: str):
        self.iterable, self.total, self.desc = iterable, total, desc

    def __iter__(self):
        if sys.stderr.isatty() and os.environ.get("TOY_PROGRESS") != "lines":
            from tqdm import tqdm

            yield from tqdm(self.iterable, total=self.total, desc=self.desc)
            return
        start = last = time.time()
        print(f"{self.desc}: 0/{self.total}", file=sys.stderr, flush=True)
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            if time.time() - last >= self.HEARTBEAT and done < self.total:
                last = time.time()
                print(f"{self.desc}: {done}/{self.total} ({last - start:.0f} s)", file=sys.stderr, flush=True)
        print(f"{self.desc}: {done}/{self.total} done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="local model directory (config, weights, tokenizer)")
    p.add_argument("--prompts", required=True, type=Path, help='JSONL of {"id", "prompt", "answer"}')
    p.add_argument("-o", "--output", required=True, type=Path, help="correctness records JSONL to write")
    p.add_argument("--n", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 (default) is off")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 (default) is off")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling; 0 (default) is off")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per generate() call (transformers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", help="model label in the records (default: the model directory name)")
    p.add_argument("--checker", choices=sorted(CHECKERS), default="exact")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (transformers)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, the checkpoint's dtype on GPU")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    args = p.parse_args(argv)
    for name in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.top_k < 0 or not 0 <= args.min_p < 1:
        p.error("--top-k must be >= 0 and --min-p in [0, 1)")
    return args


def sampling_settings(args: argparse.Namespace) -> dict:
    """What decides the samples besides the model and the seed; written in every record.
    Greedy decoding (temperature 0) has no sampling knobs."""
    if args.temperature == 0:
        return {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "min_p": args.min_p, "max_new_tokens": args.max_new_tokens}


def load_problems(path: Path) -> list[dict]:
    try:
        rows = read_jsonl(path)
    except PasskError as error:
        raise SystemExit(f"error: {error}") from None
    problems = []
    for lineno, obj in rows:
        missing = [k for k in ("id", "prompt", "answer") if k not in obj]
        if missing:
            raise SystemExit(f"error: {path} line {lineno}: missing key {', '.join(map(repr, missing))}")
        problems.append({"id": obj["id"], "prompt": str(obj["prompt"]), "answer": str(obj["answer"])})
    if not problems:
        raise SystemExit(f"error: {path}: no problems")
    return problems


def prompt_ids(tokenizer, problems: list[dict], chat: bool) -> list[list[int]]:
    """Token ids per problem; the chat template already carries BOS, so none is added."""
    if not chat:
        return [tokenizer(p["prompt"])["input_ids"] for p in problems]
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("error: --chat given but the tokenizer has no chat template")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                      add_generation_prompt=True)
        for p in problems
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sample_transformers(args: argparse.Namespace, settings: dict, tokenizer,
                        ids: list[list[int]]) -> Iterator[tuple[int, str]]:
    """(problem index, completion) n times per problem, problems in order, batch by batch."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "auto"  # half precision on CPU is slow
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    model.to(device).eval()
    set_seed(args.seed)

    tokenizer.padding_side = "left"  # generation continues from the right end
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise SystemExit("error: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    # Every knob explicit: generate() takes what it is not given from the model's
    # generation_config.json (and transformers' defaults, top_k 50), model by model.
    # None disables a knob (top_k 0 and min_p 0 mean off here).
    sampling = (
        {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p,
         "top_k": args.top_k or None, "min_p": args.min_p or None}
        if settings["do_sample"]
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
    )
    jobs = [i for i in range(len(ids)) for _ in range(args.n)]

    def generate() -> Iterator[tuple[int, str]]:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(device)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            yield from zip(batch, texts)

    # Set up now (errors before the output file is touched), generate lazily.
    return generate()


def sample_vllm(args: argparse.Namespace, ids: list[list[int]]) -> list[tuple[int, str]]:
    """(problem index, completion) n times per problem; vLLM batches everything itself."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise SystemExit("error: --backend vllm needs vLLM (pip install vllm); or use --backend transformers") from None
    llm = LLM(model=str(args.model), seed=args.seed, dtype=args.dtype)
    # vLLM: top_k -1 and min_p 0 are off; every knob given, none from the generation config.
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k or -1, min_p=args.min_p,
                            max_tokens=args.max_new_tokens, seed=args.seed)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params)
    return [(i, c.text) for i, out in enumerate(outputs) for c in out.outputs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    problems = load_problems(args.prompts)
    if not args.model.is_dir():
        raise SystemExit(f"error: {args.model}: not a model directory")
    label = args.label or args.model.resolve().name
    check = CHECKERS[args.checker]
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    ids = prompt_ids(tokenizer, problems, args.chat)
    settings = sampling_settings(args)
    if args.backend == "vllm":
        samples = sample_vllm(args, ids)
    else:
        samples = sample_transformers(args, settings, tokenizer, ids)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    drawn = [0] * len(problems)
    correct = 0
    with open(args.output, "w", encoding="utf-8") as f:
        # Written as they come, so a long run shows progress and keeps what it drew.
        for i, text in progress(samples, len(problems) * args.n, f"sampling {label}"):
            problem = problems[i]
            record = {"model": label, "problem": problem["id"], "sample": drawn[i],
                      "correct": check(text, problem["answer"]), "completion": text, "sampling": settings}
            drawn[i] += 1
            correct += record["correct"]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    print(f"wrote {sum(drawn)} records ({correct} correct) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
