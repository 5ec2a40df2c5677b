"""scripts/device_check.sh end to end in its smallest form (--device cpu --reduced), so that
its first run on a GPU cannot fail for a reason a CPU would have shown."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "device_check.md"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/device_check.sh"), "--device", "cpu", "--reduced",
         "--workdir", str(tmp_path / "work"), "-o", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout  # the skips say why, in the summary
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4, rows  # the pair, the Llama layer, the two MoE layers
    assert "28 layers" not in rows[0] and "2 layers" in rows[0]
    moe = rows[3].split(" | ")
    assert moe[8].split(" x ")[0] != "1"  # the DeepSeek-shaped layer ran in several batches
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert float(cells[-1]) <= 1e-3  # device (here the CPU again) and CPU agree
