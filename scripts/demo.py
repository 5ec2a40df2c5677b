"""The built-in default job: Timber on a small local Base/Instruct pair.

No Hub access is needed: the pair is synthetic (a 4-layer Qwen3-architecture model
with tied embeddings, bf16, whose Instruct differs from its Base by a delta with a
decaying spectrum; as in real pairs only the Instruct has a chat template and ends a
turn with <|im_end|>). `mergekit-timber analyze` first reports what Timber will do to
each matrix; the merge then runs through the unmodified `mergekit-yaml` CLI with
`merge_method: timber`, and the output is checked against the Base and Instruct.

    python scripts/demo.py [--workdir demo] [--lambda 0.2]
"""

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from mergekit_timber.checkpoint import Checkpoint
from mergekit_timber.method.kernel import refine_matrix
from pairs.synthetic import write_pair, write_timber_yaml

BIN = Path(sys.executable).parent


def tensors(model_dir: Path) -> dict:
    with Checkpoint(model_dir, "model") as checkpoint:
        return {name: checkpoint.tensor(name) for name in checkpoint.names()}


def run_with_heartbeat(cmd: list, what: str, every: float = 10.0) -> None:
    """Run cmd; while it runs, print a line every `every` seconds, so a step that takes a
    minute on a busy machine (imports, float64 decompositions, plots) is not silent."""
    started = time.perf_counter()
    with subprocess.Popen(cmd) as proc:
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                print(f"    ... {what}: {time.perf_counter() - started:.0f} s so far", flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    print(f"    {what}: done in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo", type=Path)
    parser.add_argument("--lambda", dest="lam", default=0.2, type=float)
    args = parser.parse_args()

    work = args.workdir.resolve()
    print(f"1/4 building a small Qwen3-style Base/Instruct pair in {work}/pair ...", flush=True)
    base_dir, instruct_dir = write_pair(
        work / "pair", arch="qwen3", layers=4, hidden=256, intermediate=768,
        heads=8, kv_heads=4, head_dim=32, vocab=4096, seed=0,
    )  # fmt: skip
    analysis = work / "analysis"
    print(f"2/4 mergekit-timber analyze {base_dir} {instruct_dir} -o {analysis}", flush=True)
    matrices = sum(1 for t in tensors(base_dir).values() if t.ndim >= 2)
    run_with_heartbeat(
        [str(BIN / "mergekit-timber"), "analyze", str(base_dir), str(instruct_dir), "-o", str(analysis),
         "--lambda", str(args.lam)],
        f"analyze: eRank of Base, Instruct and delta for {matrices} matrices in float64, then the plots",
    )  # fmt: skip
    config = write_timber_yaml(work / "timber.yml", base_dir, instruct_dir, lambda_=args.lam)
    out = work / "out"
    # A rerun replaces the previous demo output, as mergekit does.
    print(f"3/4 mergekit-yaml {config} {out}", flush=True)
    print("    " + config.read_text().replace("\n", "\n    ").rstrip(), flush=True)
    subprocess.run([str(BIN / "mergekit-yaml"), str(config), str(out)], check=True)

    print("4/4 checking the output")
    base, instruct, merged = tensors(base_dir), tensors(instruct_dir), tensors(out)
    refined = kept = 0
    for name, wi in instruct.items():
        if wi.ndim < 2:
            kept += int(torch.equal(merged[name], wi))
            continue
        want = refine_matrix(base[name], wi, args.lam)
        assert torch.equal(merged[name], want), name
        refined += 1
    name = "model.layers.0.mlp.down_proj.weight"
    d = instruct[name].double() - base[name].double()
    moved = (merged[name].double() - instruct[name].double()).norm() / d.norm()
    print(f"    {refined} matrices refined (each equals the kernel's result), {kept} 1-D tensors kept from Instruct")
    print(f"    {name}: Timber moved it by {moved:.1%} of ||W_I - W_B|| back toward Base")
    from transformers import AutoTokenizer

    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompt = AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    print(f"    the output chats like the Instruct (its tokenizer and template; the Base has none): {prompt!r}")
    print(f"    model card: {out / 'README.md'}; analysis: {analysis}/erank.csv and plots")
    print(f"done: the Timber model is in {out}")
    venv = Path(sys.prefix)
    if venv != Path(sys.base_prefix):  # run from a venv: the commands of the README need it
        print(f"next, in your shell: source {venv}/bin/activate   (then the README's 'Build a local pair to try it')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
