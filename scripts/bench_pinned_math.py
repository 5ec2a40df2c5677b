#!/usr/bin/env python
"""What pinning the CPU math costs the toy studies (scripts/pinned_math.py), side by side.

    python scripts/bench_pinned_math.py [--preset default] [--steps 20] [--rounds 2] [-o FILE]

In fresh processes, alternately with this CPU's own code paths and with the pinned ones
(MKL's COMPATIBLE branch, torch's baseline kernels, one thread): training steps of the
preset's model (its batch and block) and one sampling call (64 sequences, 64 new tokens,
as the studies sample). Prints the time of each and the ratios pinned / unpinned; a study
spends nearly all of its time in these two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent

# Runs in a child: pinned when pinned_math is imported before torch, else this CPU's paths.
CHILD = r"""
import json, sys, time
sys.path.insert(0, {scripts!r})
if {pinned}:
    import pinned_math
import torch
import toy_pair
if {pinned}:
    pinned_math.pin_torch(1)
else:
    torch.set_num_threads(1)
from transformers import Qwen3ForCausalLM
preset = toy_pair.PRESETS[{preset!r}]
raw = toy_pair.build_tokenizer()
ids = {{t: raw.token_to_id(t) for t in toy_pair.SPECIALS}}
torch.manual_seed(0)
model = Qwen3ForCausalLM(toy_pair.model_config(preset, raw.get_vocab_size(), ids))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, raw.get_vocab_size(), (preset.batch, preset.block))
for step in range({steps} + 2):  # two warm-up steps
    if step == 2:
        start = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
train = (time.perf_counter() - start) / {steps}
model.eval()
prompt = torch.randint(0, raw.get_vocab_size(), (64, 24))
start = time.perf_counter()
with torch.inference_mode():
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                   top_k=50, max_new_tokens=64, min_new_tokens=64, pad_token_id=0)
sample = time.perf_counter() - start
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), "train": train, "sample": sample}}))
"""


def measure(pinned: bool, preset: str, steps: int) -> dict:
    code = CHILD.format(scripts=str(SCRIPTS), pinned=pinned, preset=preset, steps=steps)
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="toy_pair preset whose model is timed (default: default)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per process (default 20)")
    p.add_argument("--rounds", type=int, default=2, help="unpinned/pinned pairs of processes (default 2)")
    p.add_argument("-o", "--output", type=Path, help="also write the table to this file (a docs figure block)")
    args = p.parse_args(argv)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.rounds):
        for pinned in (False, True):  # alternated: a load change hits both alike
            runs[pinned].append(measure(pinned, args.preset, args.steps))
    load = os.getloadavg()[0]
    rows = []
    for what, unit in (("train", "training step"), ("sample", "sampling call (64 x 64 tokens)")):
        fast = statistics.median(r[what] for r in runs[False])
        slow = statistics.median(r[what] for r in runs[True])
        rows.append(f"| {unit} | {fast * 1e3:.0f} ms ({runs[False][0]['capability']}) | "
                    f"{slow * 1e3:.0f} ms ({runs[True][0]['capability']}, MKL COMPATIBLE) | {slow / fast:.2f}x |")
    text = (f"Preset `{args.preset}`, one thread, median of {args.rounds} processes each, "
            f"load average {load:.1f} at the end:\n\n"
            "| what | this CPU's paths | pinned | pinned / unpinned |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text, end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
