"""The kernel and a small merge on a CUDA device; skipped where torch sees none.

Written against `DEVICE` only, so the same checks run on any device torch offers.
"""

import pytest
import torch

from helpers import base_config, load_dir, run_cli, write_yaml
from mergekit_timber.kernel import HeadRule, refine_stack
from mergekit_timber.testing.synthetic import write_pair
from oracle import timber_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICE = torch.device("cuda")


def test_kernel_on_the_device_matches_the_oracle():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 300, 96, generator=g, dtype=torch.float64)
    instruct = base + 0.05 * torch.randn(2, 300, 96, generator=g, dtype=torch.float64)
    for rule in (HeadRule(), HeadRule("energy", 0.9)):
        got = refine_stack(base.to(DEVICE), instruct.to(DEVICE), [0.0, 0.2], rule)
        assert all(t.device.type == DEVICE.type for t in got.tensors)
        for out, lam in zip(got.tensors, (0.0, 0.2)):
            for e in range(2):
                kind, value = ("erank", None) if rule.kind == "erank" else (rule.kind, rule.value)
                want, _, k = timber_matrix(base[e], instruct[e], lam, kind, value)
                assert int(got.k[e]) == k
                edit = float((want - instruct[e]).norm())
                assert float((out[e].cpu() - want).norm()) <= 1e-9 * edit


def test_mergekit_yaml_on_the_device_equals_the_cpu_merge(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=1, seed=4)
    config = write_yaml(tmp_path / "timber.yml", base_config(base, instruct, **{"lambda": 0.2}))
    run_cli("mergekit-yaml", config, tmp_path / "device", "--cuda")
    run_cli("mergekit-yaml", config, tmp_path / "cpu")
    on_device, on_cpu = load_dir(tmp_path / "device"), load_dir(tmp_path / "cpu")
    assert set(on_device) == set(on_cpu)
    for name, t in on_cpu.items():
        # Same maths in float64 on both; bf16 outputs may differ by a rounding step
        # where the two float64 results straddle a rounding boundary.
        differ = int((on_device[name] != t).sum())
        assert differ <= max(1, t.numel() // 100_000), (name, differ)
