#!/usr/bin/env python
"""Train a tiny Base/Instruct pair (Qwen3 architecture) on the CPU, deterministically.

    python scripts/toy_pair.py OUT [--preset NAME] [--seed 0]

Base: a small Qwen3ForCausalLM trained from scratch on plain-text sums of digits written
out along several valid solution paths (scripts/toy_task.py), documents separated by
``<|endoftext|>``, its end-of-sequence token. Instruct, by preset:
- default, fast, smallest: Base fine-tuned (SFT, loss on the assistant turn only) on chats
  in ONE teacher answer style;
- narrow*: Base after rounds of rejection-sampling fine-tuning on its OWN correct samples
  (no teacher; longer sums), the post-training that narrows (docs/toy_narrow_plan.md);
- narrow-pg*: Base after one such round (to learn the chat format), then on-policy policy
  gradient with a 0/1 verifiable reward (docs/toy_narrow_pg_plan.md).
Both get a Qwen-style chat template and ``<|im_end|>`` as end of turn. Both share one
character-level tokenizer (same ids, so same tensor shapes, as Timber needs); they differ
where real pairs differ: the Instruct has the chat template and eos ``<|im_end|>`` in its
tokenizer, config.json and generation_config.json, Base has eos ``<|endoftext|>`` and no
template.

Writes OUT/base/ and OUT/instruct/ (safetensors, config.json, generation_config.json,
tokenizer files), OUT/heldout_base.jsonl (plain prompts for Base) and
OUT/heldout_chat.jsonl (user messages for chat models), both in scripts/sample.py's
{"id", "prompt", "answer"} format, and OUT/pair.json (the settings and the losses).
Progress: a bar per stage on a terminal, a line every few seconds in a log.

Same seed, same preset and same torch thread count give the same weights, on any x86-64
CPU: the math code paths are pinned (scripts/pinned_math.py, imported before torch).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # toy_task, pinned_math beside this script
import pinned_math  # noqa: E402,I001 - before torch

import argparse
import dataclasses
import json
import math
import random
import string
import time

import toy_task  # noqa: E402
from answer_check import check_boxed  # noqa: E402
from sample import progress  # noqa: E402

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END]
ALPHABET = sorted(set(string.ascii_letters + string.digits + " \n+-=*,.:?!\\{}()"))
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    base_steps: int
    sft_steps: int
    batch: int  # sequences per step
    block: int  # tokens per packed Base sequence
    base_lr: float
    sft_lr: float
    held_out: int
    lengths: tuple[int, ...] = (3, 4, 5)  # digits per problem
    # "sft": fine-tune on the one teacher style (toy_task.instruct_answer). "rft": rejection-
    # sampling fine-tuning on the model's OWN correct samples, round after round (the first
    # round samples Base on plain prompts, later rounds the chat model itself): no teacher.
    post: str = "sft"
    rft_rounds: int = 0
    rft_problems: int = 0  # training problems sampled per round
    rft_samples: int = 0  # samples per problem per round
    rft_temperature: float = 1.0
    rft_max_new_tokens: int = 96
    # "rft+pg": after the rft rounds, pg_steps steps of on-policy policy gradient: each step
    # samples pg_samples completions at pg_temperature for each of pg_problems fresh training
    # problems, rewards a correct final answer with 1, and raises the log-probability of each
    # completion by its reward minus its group's mean (no KL term, no clipping of ratios).
    pg_steps: int = 0
    pg_problems: int = 0
    pg_samples: int = 0
    pg_lr: float = 0.0
    pg_temperature: float = 1.0


NARROW = Preset(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=256, base_steps=500, sft_steps=150,
                batch=16, block=128, base_lr=3e-3, sft_lr=1e-3, held_out=100, lengths=(5, 6, 7), post="rft",
                rft_rounds=3, rft_problems=256, rft_samples=8, rft_temperature=0.5)
NARROW_SMALLEST = Preset(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, base_steps=40, sft_steps=10,
                         batch=8, block=64, base_lr=3e-3, sft_lr=1e-3, held_out=8, lengths=(2, 3), post="rft",
                         rft_rounds=2, rft_problems=16, rft_samples=4, rft_temperature=0.5, rft_max_new_tokens=48)
PRESETS = {
    # 7 to 14 minutes of one core (pinned math; seeds 0-4 of the toy study, load 2-4).
    "default": Preset(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=256, base_steps=800,
                      sft_steps=200, batch=16, block=128, base_lr=3e-3, sft_lr=5e-4, held_out=100),
    # For tests and quick looks: well under a minute on one core.
    "fast": Preset(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=192, base_steps=300,
                   sft_steps=100, batch=16, block=128, base_lr=3e-3, sft_lr=1e-3, held_out=40),
    "smallest": Preset(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, base_steps=40,
                       sft_steps=30, batch=8, block=64, base_lr=3e-3, sft_lr=1e-3, held_out=8),
    # The narrowing setting (docs/toy_narrow_plan.md): longer sums than Base masters, and an
    # Instruct post-trained on nothing but its own correct samples. sft_steps/sft_lr are the
    # fine-tuning steps and learning rate of each round.
    "narrow": NARROW,
    # Shorter sums, so that its barely trained Base gets a few right and the rounds fine-tune.
    "narrow-smallest": NARROW_SMALLEST,
    # The policy-gradient narrowing setting (docs/toy_narrow_pg_plan.md): the narrow preset's
    # Base and task (the same fields); one wider rejection-sampling round teaches the chat
    # format, then 150 steps of policy gradient on 16 problems x 8 samples.
    "narrow-pg": dataclasses.replace(NARROW, post="rft+pg", rft_rounds=1, rft_problems=1024, pg_steps=150,
                                     pg_problems=16, pg_samples=8, pg_lr=1e-4),
    "narrow-pg-smallest": dataclasses.replace(NARROW_SMALLEST, post="rft+pg", rft_rounds=1, pg_steps=6,
                                              pg_problems=4, pg_samples=4, pg_lr=1e-4),
}


def build_tokenizer():
    """Character-level BPE (no merges) with Qwen's special tokens, via `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {token: i for i, token in enumerate(SPECIALS + ALPHABET)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.add_special_tokens(SPECIALS)
    raw.decoder = decoders.Fuse()  # characters join back without separators
    return raw


def wrap_tokenizer(raw, instruct: bool):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=IM_END if instruct else ENDOFTEXT, pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END] if instruct else None,
    )
    if instruct:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(preset: Preset, vocab_size: int, ids: dict[str, int]):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads, head_dim=preset.hidden // preset.heads,
        max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[ENDOFTEXT], pad_token_id=ids[ENDOFTEXT],
        torch_dtype="float32",
    )


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def _schedule(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(model, batches, steps: int, lr: float, label: str) -> float:
    """AdamW with warmup and cosine decay; returns the mean loss of the last tenth of steps."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    tail = []
    for step in progress(range(steps), steps, f"{label} training steps"):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, steps, lr)
        input_ids, attention_mask, labels = batches(step)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    model.eval()
    return sum(tail) / len(tail)


def base_batches(raw, preset: Preset, train_problem, rng: random.Random):
    """Packed blocks of documents, each followed by <|endoftext|>, as pretraining does."""
    import torch

    eot = raw.token_to_id(ENDOFTEXT)
    need = preset.base_steps * preset.batch * preset.block + preset.block
    stream: list[int] = []
    while len(stream) < need:
        stream += raw.encode(toy_task.base_document(train_problem(rng), rng)).ids + [eot]
    data = torch.tensor(stream[:need], dtype=torch.long)

    def batch(step: int):
        first = step * preset.batch * preset.block
        x = data[first : first + preset.batch * preset.block].view(preset.batch, preset.block)
        return x, None, x

    return batch


def chat_text(problem: tuple[int, ...], with_answer: bool) -> tuple[str, str]:
    prompt = (f"{IM_START}user\n{toy_task.chat_prompt(problem)}{IM_END}\n{IM_START}assistant\n")
    return prompt, (toy_task.instruct_answer(problem) + IM_END + "\n") if with_answer else ""


def sft_batches(raw, preset: Preset, train_problem, rng: random.Random):
    """Chats in the teacher's one style (toy_task.instruct_answer)."""
    def example():
        problem = train_problem(rng)
        return problem, toy_task.instruct_answer(problem)

    return chat_batches(raw, preset.batch, example)


def right_padded(rows: list[list], fill, dtype=None):
    """ROWS as one tensor, each row filled up to the longest with FILL (default dtype long)."""
    import torch

    out = torch.full((len(rows), max(map(len, rows))), fill, dtype=dtype or torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=out.dtype)
    return out


def chat_batches(raw, batch_size: int, example):
    """Right-padded chats from EXAMPLE() -> (problem, reply); the loss covers the assistant
    turn only (its <|im_end|> included)."""
    pad = raw.token_to_id(ENDOFTEXT)

    def batch(step: int):
        inputs, labels = [], []
        for _ in range(batch_size):
            problem, reply = example()
            prompt, _ = chat_text(problem, with_answer=False)
            p, r = raw.encode(prompt).ids, raw.encode(reply + IM_END + "\n").ids
            inputs.append(p + r)
            labels.append([-100] * len(p) + r)
        return right_padded(inputs, pad), right_padded([[1] * len(x) for x in inputs], 0), right_padded(labels, -100)

    return batch


def sample_replies(model, raw, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                   stops: list[int], label: str, batch_size: int = 256, quiet: bool = False) -> list[list[str]]:
    """N sampled completions per prompt (text up to the first stop token), left-padded batches.
    QUIET: no progress lines (a policy-gradient step samples once; its loop reports)."""
    import torch

    pad = raw.token_to_id(ENDOFTEXT)
    jobs = [i for i in range(len(prompts)) for _ in range(n)]
    encoded = [raw.encode(p).ids for p in prompts]
    replies: list[list[str]] = [[] for _ in prompts]
    starts = range(0, len(jobs), batch_size)
    for first in starts if quiet else progress(starts, len(starts), f"{label} sampling batches of {batch_size}"):
        chunk = jobs[first : first + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=1.0, top_k=None, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=pad)
        for i, new in zip(chunk, out[:, width:].tolist()):
            end = next((j for j, t in enumerate(new) if t in stops), len(new))
            replies[i].append(raw.decode(new[:end]))
    return replies


def rejection_sampling_rounds(model, raw, preset: Preset, train_problem, rng: random.Random,
                              ids: dict[str, int]) -> list[dict]:
    """Post-training without a teacher: each round samples the model on fresh training
    problems, keeps every correct completion (duplicates too: a completion the model draws
    often weighs more, as in a policy-gradient step with a 0/1 reward) and fine-tunes on
    those chats. Round 1 samples Base on its plain prompts; later rounds the chat model."""
    rounds = []
    for r in range(1, preset.rft_rounds + 1):
        problems = [train_problem(rng) for _ in range(preset.rft_problems)]
        if r == 1:
            prompts = [toy_task.base_prompt(p) for p in problems]
            stops = [ids[ENDOFTEXT]]
        else:
            prompts = [chat_text(p, with_answer=False)[0] for p in problems]
            stops = [ids[IM_END], ids[ENDOFTEXT]]
        replies = sample_replies(model, raw, prompts, preset.rft_samples, preset.rft_temperature,
                                 preset.rft_max_new_tokens, stops, f"rft round {r}")
        correct = [[check_boxed(reply, str(toy_task.answer(p))) for reply in group]
                   for p, group in zip(problems, replies)]
        kept = [(p, reply.strip()) for p, group, marks in zip(problems, replies, correct)
                for reply, ok in zip(group, marks) if ok]
        loss = math.nan
        if kept:  # else (a barely trained smoke-run Base) the round leaves the model as it is
            loss = _train(model, chat_batches(raw, preset.batch, lambda: kept[rng.randrange(len(kept))]),
                          preset.sft_steps, preset.sft_lr, f"rft round {r}")
        solved = sum(map(any, correct))
        rounds.append({"round": r, "samples": len(problems) * preset.rft_samples, "correct": len(kept),
                       "problems_solved": solved, "final_loss": None if math.isnan(loss) else round(loss, 4)})
        trained = f"loss {loss:.3f}" if kept else "no fine-tuning (nothing correct)"
        print(f"rft round {r}: {len(kept)} correct of {len(problems) * preset.rft_samples} samples, "
              f"{solved}/{len(problems)} problems, {trained}", file=sys.stderr, flush=True)
    return rounds


# A fixed normaliser of the policy-gradient loss (samples per step x this many tokens), as
# Dr. GRPO does, so a long wrong completion does not weigh less per token than a short one.
PG_TOKENS_PER_SAMPLE = 40


def policy_gradient_loss(model, rows: list[tuple[list[int], int, float]], pad: int, normaliser: float):
    """-(sum over ROWS of advantage x log-probability of the completion) / NORMALISER.
    A row is (prompt + completion token ids, prompt length, advantage)."""
    import torch

    inputs = right_padded([x for x, _, _ in rows], pad)
    attention = right_padded([[1] * len(x) for x, _, _ in rows], 0)
    completion = right_padded([[0] * n + [1] * (len(x) - n) for x, n, _ in rows], 0, torch.float32)
    advantage = torch.tensor([a for _, _, a in rows])
    logits = model(input_ids=inputs, attention_mask=attention).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, inputs[:, 1:, None])[..., 0]
    return -((logp * completion[:, 1:]).sum(1) * advantage).sum() / normaliser


def policy_gradient(model, raw, preset: Preset, train_problem, rng: random.Random, ids: dict[str, int]) -> dict:
    """On-policy policy gradient with a verifiable 0/1 reward (a correct last \\boxed{}) and
    the group's mean reward as baseline (GRPO without its std scaling, no KL term): each step
    samples the chat model on fresh training problems and takes one AdamW step (constant
    learning rate). A group whose samples all score the same teaches nothing and is left out."""
    import torch

    stops = [ids[IM_END], ids[ENDOFTEXT]]
    group_size = preset.pg_problems * preset.pg_samples
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.pg_lr, weight_decay=0.0, betas=(0.9, 0.98))
    rewards, updates = [], 0
    start = time.time()
    for step in range(preset.pg_steps):
        problems = [train_problem(rng) for _ in range(preset.pg_problems)]
        prompts = [chat_text(p, with_answer=False)[0] for p in problems]
        model.eval()
        replies = sample_replies(model, raw, prompts, preset.pg_samples, preset.pg_temperature,
                                 preset.rft_max_new_tokens, stops, "pg", batch_size=group_size, quiet=True)
        rows, correct = [], 0
        for problem, prompt, group in zip(problems, prompts, replies):
            scores = [1.0 if check_boxed(x, str(toy_task.answer(problem))) else 0.0 for x in group]
            correct += sum(scores)
            mean = sum(scores) / len(scores)
            prompt_ids = raw.encode(prompt).ids
            for reply, score in zip(group, scores):
                if score != mean:
                    rows.append((prompt_ids + raw.encode(reply).ids + [ids[IM_END]], len(prompt_ids), score - mean))
        rewards.append(correct / group_size)
        if step % 10 == 0 or step == preset.pg_steps - 1:
            recent = rewards[-10:]
            print(f"pg step {step + 1}/{preset.pg_steps}: mean reward of the last {len(recent)} steps "
                  f"{sum(recent) / len(recent):.3f} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        if not rows:
            continue
        model.train()
        loss = policy_gradient_loss(model, rows, ids[ENDOFTEXT], group_size * PG_TOKENS_PER_SAMPLE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        updates += 1
    model.eval()
    return {"steps": preset.pg_steps, "updates": updates, "samples": preset.pg_steps * group_size,
            "reward_per_10_steps": [round(sum(rewards[i : i + 10]) / len(rewards[i : i + 10]), 4)
                                    for i in range(0, len(rewards), 10)]}


def save_model(model, tokenizer, path: Path, instruct: bool, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    eos = ids[IM_END] if instruct else ids[ENDOFTEXT]
    model.config.eos_token_id = eos
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Like Qwen3: the Instruct stops on end of turn (and end of text), Base on end of text.
    generation = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT], pad_token_id=ids[ENDOFTEXT],
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]] if instruct else ids[ENDOFTEXT],
        do_sample=instruct, temperature=0.7 if instruct else None,
    )
    generation.save_pretrained(path)


def write_heldout(out: Path, held: list[tuple[int, ...]]) -> None:
    for name, prompt in (("heldout_base.jsonl", toy_task.base_prompt), ("heldout_chat.jsonl", toy_task.chat_prompt)):
        with open(out / name, "w", encoding="utf-8") as f:
            for i, problem in enumerate(held):
                row = {"id": f"sum-{i}", "prompt": prompt(problem), "answer": str(toy_task.answer(problem))}
                f.write(json.dumps(row) + "\n")


def build_pair(out: Path, preset_name: str = "default", seed: int = 0, threads: int | None = None) -> dict:
    """Train and write the pair under OUT; returns what OUT/pair.json records."""
    import torch
    from transformers import Qwen3ForCausalLM

    pinned_math.pin_torch(threads or 1)
    preset = PRESETS[preset_name]
    seed_everything(seed)
    out.mkdir(parents=True, exist_ok=True)
    raw = build_tokenizer()
    ids = {t: raw.token_to_id(t) for t in SPECIALS}
    held, train_problem = toy_task.split_problems(seed, preset.held_out, preset.lengths)
    write_heldout(out, held)

    start = time.time()
    model = Qwen3ForCausalLM(model_config(preset, raw.get_vocab_size(), ids))
    base_loss = _train(model, base_batches(raw, preset, train_problem, random.Random(seed + 1)),
                       preset.base_steps, preset.base_lr, "base")
    save_model(model, wrap_tokenizer(raw, instruct=False), out / "base", instruct=False, ids=ids)
    record = {"preset": preset_name, "seed": seed, "threads": torch.get_num_threads(),
              "settings": dataclasses.asdict(preset), "base_final_loss": round(base_loss, 4)}
    if preset.post == "sft":
        sft_loss = _train(model, sft_batches(raw, preset, train_problem, random.Random(seed + 2)),
                          preset.sft_steps, preset.sft_lr, "sft")
        record["sft_final_loss"] = round(sft_loss, 4)
    else:
        post_rng = random.Random(seed + 2)
        record["rft_rounds"] = rejection_sampling_rounds(model, raw, preset, train_problem, post_rng, ids)
        if preset.post == "rft+pg":
            record["pg"] = policy_gradient(model, raw, preset, train_problem, post_rng, ids)
    save_model(model, wrap_tokenizer(raw, instruct=True), out / "instruct", instruct=True, ids=ids)

    record.update(train_seconds=round(time.time() - start, 1),
                  parameters=sum(p.numel() for p in model.parameters()))
    (out / "pair.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"pair written to {out} in {record['train_seconds']:.0f} s", file=sys.stderr, flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="directory for base/, instruct/ and the held-out problems")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the results depend on it, and on a busy machine more threads are slower)")
    args = p.parse_args(argv)
    record = build_pair(args.out, args.preset, args.seed, args.threads)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
