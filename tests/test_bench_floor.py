"""scripts/bench_floor.py (the benchmark's floor table) runs against the package as it is:
the benchmark reports a failed section instead of stopping, so an API it relies on that
moves away would otherwise only show as a missing table."""

import json
import subprocess
import sys
from pathlib import Path

from mergekit_timber.testing.synthetic import write_pair

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_floor.py"


def test_floor_rows_for_a_layer_matrix_and_the_embedding(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3", layers=1, seed=3)
    names = ["model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(base), str(instruct), "0.2", *(f"{n}:1" for n in names)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in rows] == names
    for row in rows:
        assert 1 <= row["k"] <= min(row["shape"]) and 0 < row["width"] <= min(row["shape"])
        assert all(row[key] > 0 for key in ("kernel", "gram", "eigh", "rebuild"))
