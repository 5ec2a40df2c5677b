#!/usr/bin/env python
"""Publishing a Timber merge costs no copy of the weights: bytes written vs output size.

    python scripts/bench_publish.py [--workdir DIR | --keep] [--layers 28] [-o FILE.md]

Builds the benchmark's synthetic Qwen3-0.6B-shaped pair (scripts/benchmark.py:
WORKDIR/pairs; about 3.4 GB with the outputs, in a temporary folder removed at the end
unless --keep; a --workdir is kept, and its pair reused on the next run), runs `mergekit-yaml` with `timber` into a fresh folder, then again into
the same folder (a re-run replaces the model), and reports for each run the files
published, the size of the output and the bytes the merge process wrote (`wchar` of
/proc/self/io at its exit): the table (also written to -o) holds these, which do not
depend on the machine's load. Staging inside the output and publishing by rename writes
each byte once: written/output is about 1; a copy of the staged weights would make it 2
or more. The wall time and the time publication took (the renames:
mergekit_timber.integration.output_dir's log line) are printed below the table, for information.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

# Runs mergekit-yaml in this interpreter and, at exit, writes its /proc/self/io counters.
RUNNER = """
import atexit, os, sys
def dump():
    with open("/proc/self/io") as src, open(os.environ["BENCH_IO"], "w") as dst:
        dst.write(src.read())
atexit.register(dump)
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
main()
"""


def run(config: Path, out: Path, io_file: Path) -> dict:
    env = dict(os.environ, BENCH_IO=str(io_file), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(config), str(out), "-v", "--quiet"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"mergekit-yaml failed:\n{proc.stderr[-4000:]}")
    published = re.search(r"published (\d+) files in .* by rename in ([\d.]+) ms", proc.stderr)
    counters = dict(line.split(": ") for line in io_file.read_text().splitlines())
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"wall": wall, "publish_ms": float(published.group(2)), "files": int(published.group(1)),
            "size": size, "written": int(counters["wchar"])}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="work in (and keep) this folder; default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("-o", "--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()

    from benchmark import scratch_workdir

    with scratch_workdir(args.workdir, args.keep, "bench-publish-") as workdir:
        return measure_publication(args, workdir)


def measure_publication(args, workdir: Path) -> int:
    from benchmark import ensure_pair, write_yaml

    base, instruct = ensure_pair(workdir, args.layers)
    config = write_yaml(workdir / f"publish-L{args.layers}.yml", base, instruct)
    out = workdir / "publish-out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    rows, timings = [], []
    for label in ("into a new folder", "re-run into the same folder"):
        result = run(config, out, workdir / "publish-io.txt")
        rows.append(
            f"| {label} | {result['files']} | {result['size'] / 1e9:.2f} GB | {result['written'] / 1e9:.2f} GB | "
            f"{result['written'] / result['size']:.2f} |"
        )
        timings.append(f"{label}: merge {result['wall']:.0f} s wall, publication {result['publish_ms']:.1f} ms")
    table = "\n".join(
        [f"Qwen3-0.6B-shaped synthetic pair, {args.layers} layers, `mergekit-yaml` with `timber` (lambda 0.2):", "",
         "| run | files published | output | written by the merge process | written / output |",
         "|---|---|---|---|---|", *rows]
    )  # fmt: skip
    print(table + "\n\n" + "\n".join(timings))
    if args.output:
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
