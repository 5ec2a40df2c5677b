"""cProfile of one `mergekit-yaml` merge, run by scripts/benchmark.py in a process of its own.

    python scripts/bench_profile.py CONFIG OUT

Prints, last on stdout, a JSON list of [label, cumulative s, calls]: run_merge, tensor
loading, output writing, torch.linalg.eigh, then the 14 slowest mergekit_timber
functions (a function's time includes the functions it calls, so rows overlap).
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys

WANT = {
    "run_merge (everything)": ("merge.py", "run_merge"),
    "tensor loading (LazyTensorLoader.get_tensor)": ("lazy_tensor_loader.py", "get_tensor"),
    "output writing (TensorWriter.finalize)": ("tensor_writer.py", "finalize"),
    "torch.linalg.eigh (builtin)": ("~", "<built-in method torch._C._linalg.linalg_eigh>"),
}


def main(config: str, out: str) -> None:
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    sys.argv = ["mergekit-yaml", config, out, "--quiet"]
    profile = cProfile.Profile()
    profile.enable()
    try:
        mergekit_yaml()
    except SystemExit:
        pass
    profile.disable()
    stats = pstats.Stats(profile).stats
    rows = []
    for label, (suffix, function) in WANT.items():
        hits = [(ct, nc) for (file, _, func), (_, nc, _, ct, _) in stats.items()
                if func == function and (suffix == "~" or file.endswith(suffix))]  # fmt: skip
        if hits:
            rows.append((label, sum(ct for ct, _ in hits), sum(nc for _, nc in hits)))
    # Every function of the plugin (names change as the kernel evolves), by cumulative time.
    mine = [
        (f"mergekit_timber/{file.split('/mergekit_timber/')[-1]}:{func}", ct, nc)
        for (file, _, func), (_, nc, _, ct, _) in stats.items()
        if "/mergekit_timber/" in file and ct > 0.01
    ]
    rows += sorted(mine, key=lambda r: -r[1])[:14]
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
