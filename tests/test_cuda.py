"""The kernel and merges on a CUDA device, each compared with the CPU result; skipped
where torch sees no CUDA device (the summary says so: run with -rs). This is the first
half of scripts/device_check.sh.

Written against `DEVICE` only, so the same checks run on any device torch offers.
"""

import os
import signal
import subprocess
import time

import pytest
import torch

from helpers import base_config, cli, load_dir, run_cli, write_yaml
from mergekit_timber.method import kernel
from mergekit_timber.method.kernel import HeadRule, refine_stack
from pairs.synthetic import write_pair
from oracle import timber_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the device tests need a GPU")
DEVICE = torch.device("cuda")
two_devices = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--multi-gpu needs 2 CUDA devices")


def bf16_pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    delta = 0.002 * torch.randn(shape, generator=g) + 0.01 * torch.randn(shape[:-1] + (4,), generator=g) @ torch.randn(
        shape[:-2] + (4, shape[-1]), generator=g) / 4
    return base, (base.float() + delta).to(torch.bfloat16)


def assert_like_cpu(on_device, on_cpu, label=""):
    """bf16 outputs may differ by a rounding step where two float64 results straddle it."""
    for a, b in zip(on_device, on_cpu):
        differ = int((a.cpu() != b).sum())
        assert differ <= max(1, b.numel() // 100_000), (label, differ, b.numel())


def test_kernel_on_the_device_matches_the_oracle():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 300, 96, generator=g, dtype=torch.float64)
    instruct = base + 0.05 * torch.randn(2, 300, 96, generator=g, dtype=torch.float64)
    for rule in (HeadRule(), HeadRule("energy", 0.9), HeadRule("rank_ratio", 0.3)):
        got = refine_stack(base.to(DEVICE), instruct.to(DEVICE), [0.0, 0.2], rule)
        assert all(t.device.type == DEVICE.type for t in got.tensors)
        for out, lam in zip(got.tensors, (0.0, 0.2)):
            for e in range(2):
                kind, value = ("erank", None) if rule.kind == "erank" else (rule.kind, rule.value)
                want, _, k = timber_matrix(base[e], instruct[e], lam, kind, value)
                assert int(got.k[e]) == k
                edit = float((want - instruct[e]).norm())
                assert float((out[e].cpu() - want).norm()) <= 1e-9 * edit


@pytest.mark.parametrize("rule", [HeadRule(), HeadRule("rank_ratio", 0.25), HeadRule("energy", 0.9)], ids=str)
def test_bf16_at_real_widths(rule):
    """n >= 768: cuSOLVER's syevd path, which real models take (not the batched Jacobi one)."""
    base, instruct = bf16_pair((2, 2048, 1024), seed=5)
    on_cpu = refine_stack(base, instruct, [0.0, 0.2], rule)
    on_device = refine_stack(base.to(DEVICE), instruct.to(DEVICE), [0.0, 0.2], rule)
    assert torch.equal(on_device.k.cpu(), on_cpu.k)
    assert_like_cpu(on_device.tensors, on_cpu.tensors)


def test_moe_stack_above_the_budget_runs_in_batches_within_it():
    base, instruct = bf16_pair((24, 1536, 768), seed=6)
    unit = kernel.plan_batches((24, 1536, 768), 1)
    budget = unit.fixed + 5 * unit.per_matrix  # five matrices per batch: five batches
    on_cpu = refine_stack(base, instruct, 0.2)
    b, i = base.to(DEVICE), instruct.to(DEVICE)
    out = [torch.empty_like(i)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    on_device = refine_stack(b, i, 0.2, budget=budget, outs=out)
    torch.cuda.synchronize()
    assert kernel.plan_batches((24, 1536, 768), budget).batches == 5
    assert torch.cuda.max_memory_allocated() - held <= budget
    assert_like_cpu(on_device.tensors, on_cpu.tensors)


@pytest.mark.parametrize("route", ["host-eigh", "host"])
def test_host_routes_on_the_device(monkeypatch, route):
    monkeypatch.setenv("MERGEKIT_TIMBER_ROUTE", route)
    base, instruct = bf16_pair((3, 1024, 768), seed=7)
    on_device = refine_stack(base.to(DEVICE), instruct.to(DEVICE), [0.0, 0.2])
    monkeypatch.delenv("MERGEKIT_TIMBER_ROUTE")
    on_cpu = refine_stack(base, instruct, [0.0, 0.2])
    assert all(t.device.type == DEVICE.type for t in on_device.tensors)
    if route == "host":  # the CPU's own computation, copied: bit for bit
        assert all(torch.equal(a.cpu(), b) for a, b in zip(on_device.tensors, on_cpu.tensors))
    else:
        assert_like_cpu(on_device.tensors, on_cpu.tensors)


def test_the_probe_of_this_device():
    caps = kernel.probe_caps(DEVICE)
    assert caps.float64 and caps.float64_ratio is not None
    print(f"{torch.cuda.get_device_name()}: float64 GEMM {caps.float64_ratio:.1f}x float32 -> "
          f"route {kernel.choose_route(caps)}")


def _merges_alike(tmp_path, config, *flags, env=None):
    run_cli("mergekit-yaml", config, tmp_path / "device", *flags, env=env)
    run_cli("mergekit-yaml", config, tmp_path / "cpu")
    on_device, on_cpu = load_dir(tmp_path / "device"), load_dir(tmp_path / "cpu")
    assert set(on_device) == set(on_cpu)
    for name, t in on_cpu.items():
        differ = int((on_device[name] != t).sum())
        assert differ <= max(1, t.numel() // 100_000), (name, differ)


@pytest.mark.parametrize("flags", [("--cuda",), ("--cuda", "--read-to-gpu", "--low-cpu-memory")], ids=" ".join)
def test_mergekit_yaml_on_the_device_equals_the_cpu_merge(tmp_path, flags):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=1, seed=4)
    config = write_yaml(tmp_path / "timber.yml", base_config(base, instruct, **{"lambda": 0.2, "rank_ratio": 0.5}))
    _merges_alike(tmp_path, config, *flags)


def test_moe_merge_in_several_batches_on_the_device(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=1, seed=4, experts=16,
                                hidden=256, moe_intermediate=128)  # fmt: skip
    config = write_yaml(tmp_path / "timber.yml", base_config(base, instruct, **{"lambda": 0.2}))
    _merges_alike(tmp_path, config, "--cuda", env={"MERGEKIT_TIMBER_MEMORY_BUDGET": "4M"})


def test_fp8_inputs_on_the_device(tmp_path):
    from pairs.quantized_pairs import write_block_fp8

    base, instruct = write_pair(tmp_path / "pair", hidden=256, intermediate=512, layers=1, seed=9)
    fp8 = [write_block_fp8(m, tmp_path / "fp8" / m.name) for m in (base, instruct)]
    config = write_yaml(tmp_path / "timber.yml", base_config(*fp8, **{"lambda": 0.2}))
    _merges_alike(tmp_path, config, "--cuda")


def test_sweep_on_the_device_equals_the_cpu_sweep(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=1, seed=4)
    config = write_yaml(tmp_path / "timber.yml", base_config(base, instruct, **{"lambda": 0.2}))
    run_cli("mergekit-timber", "sweep", config, tmp_path / "device", "--lambdas", "0,0.2,0.7", "--cuda")
    run_cli("mergekit-timber", "sweep", config, tmp_path / "cpu", "--lambdas", "0,0.2,0.7")
    for lam in ("lambda-0", "lambda-0.2", "lambda-0.7"):
        on_device, on_cpu = load_dir(tmp_path / "device" / lam), load_dir(tmp_path / "cpu" / lam)
        for name, t in on_cpu.items():
            assert int((on_device[name] != t).sum()) <= max(1, t.numel() // 100_000), (lam, name)


@two_devices
def test_multi_gpu_merge_equals_the_cpu_merge(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=2, seed=4)
    config = write_yaml(tmp_path / "timber.yml", base_config(base, instruct, **{"lambda": 0.2}))
    _merges_alike(tmp_path, config, "--multi-gpu")


@two_devices
def test_sigterm_ends_a_multi_gpu_merge_without_staging_left(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=8, seed=4, experts=64,
                                hidden=512, moe_intermediate=512)  # fmt: skip
    config = write_yaml(tmp_path / "timber.yml", base_config(base, instruct, **{"lambda": 0.2}))
    out = tmp_path / "out"
    proc = subprocess.Popen([cli("mergekit-yaml"), str(config), str(out), "--multi-gpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(out.glob(".timber-staging-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # into the tensors
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGTERM
    assert not list(out.glob(".timber-staging-*"))
