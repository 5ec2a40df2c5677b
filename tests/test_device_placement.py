"""Every tensor the method makes lives on the inputs' device: proven on the CPU.

The inputs are wrapped as tensors of another device (pairs.fake_device):
values stay real, and any host tensor the kernel or the adapter creates or mixes in on
the way fails the test, as it would crash (or silently run on the host) under --cuda.
Each result is also compared with the same merge on plain CPU tensors.
"""

import pytest
import torch

from helpers import load_dir
from mergekit_timber.integration import finite
from mergekit_timber.method import kernel
from pairs.fake_device import HostTensorOnDevicePath, fake_device, to_device, to_host
from pairs.synthetic import write_pair

RULES = [{}, {"rank_ratio": 0.3}, {"energy": 0.9}]


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    base_dir, instruct_dir = write_pair(
        tmp_path_factory.mktemp("pair"), arch="qwen3_moe", layers=1, moe_layout="stacked", seed=11
    )
    return base_dir, load_dir(base_dir), instruct_dir, load_dir(instruct_dir)


def _group(base_dir, instruct_dir, name, base, instruct):
    from mergekit.common import ModelReference
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    return TensorGroup(
        entries=(
            TensorEntry(id=ModelReference.model_validate(str(base_dir)), tensor=base, is_base=True),
            TensorEntry(id=ModelReference.model_validate(str(instruct_dir)), tensor=instruct, is_base=False),
        ),
        metadata=TensorMetadata(name=name),
    )


def _method(extra_lambdas=(), sink=None):
    import mergekit_timber
    from mergekit_timber.method.adapter import TimberMerge

    return TimberMerge("timber", tail_removed=False, version=mergekit_timber.__version__,
                       extra_lambdas=extra_lambdas, sink=sink)


def _parameters(rule: dict, lam=0.2) -> dict:
    # As mergekit binds NON_BASE parameters: per input model.
    values = {"lambda": lam, "refine_embeddings": True, "rank_ratio": None, "energy": None, **rule}
    return {key: {"instruct": value} for key, value in values.items()}


@pytest.mark.parametrize("rule", RULES, ids=["erank", "rank_ratio", "energy"])
def test_merge_group_on_a_device_creates_no_host_tensor(moe_pair, rule, monkeypatch):
    base_dir, base, instruct_dir, instruct = moe_pair
    # Several batches per expert stack: the batch loop runs on the device too.
    monkeypatch.setenv(kernel.BUDGET_ENV, "200K")
    names = [n for n in instruct if instruct[n].ndim >= 2 and instruct[n].is_floating_point()]
    assert any(instruct[n].ndim == 3 for n in names)  # stacked experts are among them
    for name in names:
        want = _method().merge_group(_group(base_dir, instruct_dir, name, base[name], instruct[name]), **_parameters(rule))
        group = _group(base_dir, instruct_dir, name, to_device(base[name]), to_device(instruct[name]))
        with fake_device():
            got = _method().merge_group(group, **_parameters(rule))
        assert got.device == to_device(base[name]).device, name
        assert torch.equal(to_host(got), want), name


def test_sweep_on_a_device_hands_host_tensors_to_the_writers(moe_pair, tmp_path):
    """Extra lambdas: each output leaves the device before mergekit's writer holds it."""
    from mergekit.io.tensor_writer import TensorWriter

    from mergekit_timber.tools.sweep import SweepSession

    base_dir, base, instruct_dir, instruct = moe_pair
    extra = (0.0, 0.5, 0.8)
    writers = [TensorWriter(str(tmp_path / f"out{i}")) for i in range(len(extra))]
    handed = []
    for writer in writers:
        save = writer.save_tensor
        writer.save_tensor = lambda name, tensor, clone=False, save=save: (handed.append(tensor), save(name, tensor, clone))
    session = SweepSession(writers=writers, lambdas=extra)
    name = next(n for n in instruct if instruct[n].ndim == 3)
    group = _group(base_dir, instruct_dir, name, to_device(base[name]), to_device(instruct[name]))
    with fake_device():
        first = _method(extra, session.save).merge_group(group, **_parameters({}))
    assert first.device == to_device(base[name]).device
    assert len(handed) == len(extra) and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in handed)
    alone = [_method().merge_group(_group(base_dir, instruct_dir, name, base[name], instruct[name]),
                                   **_parameters({}, lam)) for lam in extra]
    assert all(torch.equal(a, b) for a, b in zip(handed, alone))


def test_finite_check_on_a_device():
    t = torch.randn(3, 1000)
    t[2, 5] = float("nan")
    with fake_device():
        assert finite.count_nonfinite(to_device(t)) == 1
        with pytest.raises(Exception, match="1 NaN/Inf"):
            from mergekit_timber.integration.finite import check_finite

            check_finite("w", "base", to_device(t))


def test_the_check_catches_a_host_tensor():
    """The class of bug this file guards against: a factory without the inputs' device."""
    s = to_device(torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64))
    with fake_device(), pytest.raises(HostTensorOnDevicePath, match="host tensor"):
        torch.full(s.shape[:-1], 2.0, dtype=torch.float64).clamp(0, 3) + s[..., 0]


def test_fp8_and_mxfp4_dequantize_on_the_inputs_device():
    from mergekit_timber.integration.quantized import dequantize_block_fp8, dequantize_mxfp4

    g = torch.Generator().manual_seed(2)
    code = (torch.randn(300, 200, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=g) + 0.5
    want = dequantize_block_fp8(code, scale, (128, 128), torch.bfloat16)
    with fake_device():
        got = dequantize_block_fp8(to_device(code), to_device(scale), (128, 128), torch.bfloat16)
    assert torch.equal(to_host(got), want)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 135, (2, 6, 3), generator=g, dtype=torch.uint8)
    want = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    with fake_device():
        got = dequantize_mxfp4(to_device(blocks), to_device(scales), torch.bfloat16)
    assert torch.equal(to_host(got), want)


@pytest.mark.parametrize("caps,route", [
    (kernel.DeviceCaps(float64=False, fast_float64=False), "host"),  # Apple MPS
    (kernel.DeviceCaps(float64=True, fast_float64=False, float64_ratio=64.0), "host-eigh"),  # consumer GPU
])
def test_host_routes_from_a_device(monkeypatch, caps, route):
    """A device without (fast) float64: the steps moved to the host give the CPU result,
    and nothing of the host is left mixed into the device's tensors."""
    monkeypatch.setitem(kernel._CAPS, str(torch.device("meta")), caps)
    assert kernel.route_for(torch.device("meta")) == route
    g = torch.Generator().manual_seed(8)
    base = torch.randn(6, 80, 48, generator=g).to(torch.bfloat16)
    instruct = (base.double() + 0.05 * torch.randn(6, 80, 48, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    want = kernel.refine_stack(base, instruct, [0.0, 0.2], kernel.HeadRule("rank_ratio", 0.25))
    with fake_device():
        got = kernel.refine_stack(to_device(base), to_device(instruct), [0.0, 0.2], kernel.HeadRule("rank_ratio", 0.25),
                                  budget=1)  # one matrix per batch
    assert all(torch.equal(to_host(a), b) for a, b in zip(got.tensors, want.tensors))
    assert torch.equal(to_host(got.k), want.k)
