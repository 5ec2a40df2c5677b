"""The toy task of scripts/toy_pair.py: sums of single digits, written out several ways.

A problem is a tuple of digits 1..9 (e.g. (3, 5, 2, 7)); its answer is their sum.
The Base corpus writes each problem as a plain-text document with one of several valid
solution paths (left to right, right to left, in pairs, straight to the answer), in
varied wording, always ending in ``\\boxed{sum}``. The Instruct data is a chat: the user
asks "What is 3+5+2+7?" and the assistant answers in ONE narrow style (running sum, one
step a line, then ``\\boxed{sum}``), as supervised fine-tuning narrows real models.

Held-out problems are drawn first from the seed and never appear in any training text.
Completions are scored with answer_check's ``boxed`` checker (last ``\\boxed{}``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

DIGITS = range(1, 10)


def answer(problem: tuple[int, ...]) -> int:
    return sum(problem)


def expression(problem: tuple[int, ...]) -> str:
    return "+".join(map(str, problem))


def base_prompt(problem: tuple[int, ...]) -> str:
    """What Base is prompted with (plain text, no chat template)."""
    return f"Q: {expression(problem)}\nA:"


def chat_prompt(problem: tuple[int, ...]) -> str:
    """The user message the Instruct model (and every Timber model) gets."""
    return f"What is {expression(problem)}?"


def _fold(values: list[int]) -> list[str]:
    """Running sum from the left: ["3+5=8", "8+2=10", ...]."""
    steps, total = [], values[0]
    for v in values[1:]:
        steps.append(f"{total}+{v}={total + v}")
        total += v
    return steps


def _left(p: tuple[int, ...], rng: random.Random) -> str:
    return ", ".join(_fold(list(p)))


def _right(p: tuple[int, ...], rng: random.Random) -> str:
    steps, total = [], p[-1]
    for v in reversed(p[:-1]):
        steps.append(f"{v}+{total}={v + total}")
        total += v
    return ", ".join(steps)


def _pairs(p: tuple[int, ...], rng: random.Random) -> str:
    level, steps = list(p), []
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            steps.append(f"{level[i]}+{level[i + 1]}={level[i] + level[i + 1]}")
            nxt.append(level[i] + level[i + 1])
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return ", ".join(steps)


def _direct(p: tuple[int, ...], rng: random.Random) -> str:
    return ""


# The Base corpus's solution paths: all valid, different intermediate steps.
BASE_STYLES: dict[str, Callable[[tuple[int, ...], random.Random], str]] = {
    "left": _left, "right": _right, "pairs": _pairs, "direct": _direct,
}
_ENDINGS = ("so the sum is \\boxed{{{s}}}.", "the answer is \\boxed{{{s}}}.", "total \\boxed{{{s}}}", "= \\boxed{{{s}}}")


def base_solution(problem: tuple[int, ...], rng: random.Random) -> str:
    """One solution of Base's corpus: a random path, a random wording."""
    steps = BASE_STYLES[rng.choice(sorted(BASE_STYLES))](problem, rng)
    ending = rng.choice(_ENDINGS).format(s=answer(problem))
    return f" {steps}, {ending}" if steps else f" {ending}"


def base_document(problem: tuple[int, ...], rng: random.Random) -> str:
    return base_prompt(problem) + base_solution(problem, rng)


def instruct_answer(problem: tuple[int, ...]) -> str:
    """The single style the Instruct model is fine-tuned on."""
    return "\n".join(_fold(list(problem)) + [f"\\boxed{{{answer(problem)}}}"])


def split_problems(
    seed: int, held_out: int, lengths: tuple[int, ...] = (3, 4, 5)
) -> tuple[list[tuple[int, ...]], Callable[[random.Random], tuple[int, ...]]]:
    """(held-out problems, a sampler of training problems that never returns one of them)."""
    rng = random.Random(seed)
    held: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(held) < held_out:
        p = tuple(rng.choice(DIGITS) for _ in range(rng.choice(lengths)))
        if p not in seen:
            seen.add(p)
            held.append(p)

    def train_problem(r: random.Random) -> tuple[int, ...]:
        while True:
            p = tuple(r.choice(DIGITS) for _ in range(r.choice(lengths)))
            if p not in seen:
                return p

    return held, train_problem

