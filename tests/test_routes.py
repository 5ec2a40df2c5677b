"""Where each kernel step runs, and in how much memory: decided from what the device
offers (injected here, as a probe would report it) and from the memory budget."""

import logging

import pytest
import torch

from mergekit_timber.method import kernel
from mergekit_timber.method.kernel import DeviceCaps, choose_route, plan_batches, refine_stack
from oracle import timber_matrix

MPS_LIKE = DeviceCaps(float64=False, fast_float64=False)
CONSUMER = DeviceCaps(float64=True, fast_float64=False, float64_ratio=64.0)
DATA_CENTRE = DeviceCaps(float64=True, fast_float64=True, float64_ratio=1.0)


def test_route_follows_what_the_device_supports():
    assert choose_route(DATA_CENTRE) == "device"
    assert choose_route(CONSUMER) == "host-eigh"
    assert choose_route(MPS_LIKE) == "host"
    assert choose_route(CONSUMER, "device") == "device"  # the user's choice stands where it can run
    assert choose_route(DATA_CENTRE, "host") == "host"
    with pytest.raises(ValueError, match="no float64"):
        choose_route(MPS_LIKE, "device")
    with pytest.raises(ValueError, match="MERGEKIT_TIMBER_ROUTE"):
        choose_route(DATA_CENTRE, "gpu")


def test_route_for_reads_the_option_and_gives_one_notice(monkeypatch, caplog):
    monkeypatch.setattr(kernel, "_NOTICED", set())
    device = torch.device("meta")
    with caplog.at_level(logging.WARNING, logger="mergekit_timber.method.kernel"):
        assert kernel.route_for(device, MPS_LIKE) == "host"
        assert kernel.route_for(device, MPS_LIKE) == "host"
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "meta has no float64" in notices[0] and "on the host" in notices[0]
    monkeypatch.setenv("MERGEKIT_TIMBER_ROUTE", "host-eigh")
    assert kernel.route_for(device, DATA_CENTRE) == "host-eigh"
    monkeypatch.delenv("MERGEKIT_TIMBER_ROUTE")
    monkeypatch.setenv("MERGEKIT_TIMBER_EIGH_DEVICE", "cpu")  # the older switch still works
    assert kernel.route_for(device, DATA_CENTRE) == "host-eigh"
    assert kernel.route_for(torch.device("cpu"), MPS_LIKE) == "device"  # the host is the device


def test_probe_of_the_host():
    assert kernel.probe_caps(torch.device("cpu")) == DeviceCaps(True, True)


@pytest.mark.parametrize("route", ["host-eigh", "host"])
def test_every_route_gives_the_cpu_result(monkeypatch, route):
    """The host routes run the same float64 steps elsewhere: bit-identical results.

    On the CPU both ends are the host, so this drives the routes' own code (the copies,
    the batch loop); tests/test_cuda.py repeats it on a real device."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(5, 120, 40, generator=g).to(torch.bfloat16)
    instruct = (base.double() + 0.05 * torch.randn(5, 120, 40, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    want = refine_stack(base, instruct, [0.0, 0.2])
    monkeypatch.setattr(kernel, "route_for", lambda device, caps=None: route)
    got = refine_stack(base, instruct, [0.0, 0.2], budget=1)  # and one matrix at a time
    assert all(torch.equal(a, b) for a, b in zip(want.tensors, got.tensors))
    assert torch.equal(want.k, got.k)


def test_batches_give_the_same_result_as_one_batch():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(7, 90, 30, generator=g, dtype=torch.float64)
    instruct = base + 0.05 * torch.randn(7, 90, 30, generator=g, dtype=torch.float64)
    one_by_one = plan_batches(instruct.shape, 1)
    assert one_by_one.batch == 1 and one_by_one.batches == 7 and not one_by_one.fits
    three = plan_batches(instruct.shape, one_by_one.fixed + 3 * one_by_one.per_matrix)
    assert three.batch == 3 and three.batches == 3 and three.fits
    for budget in (1, three.budget, 1 << 40):
        got = refine_stack(base, instruct, 0.2, budget=budget)
        for e in range(7):
            want, _, k = timber_matrix(base[e], instruct[e], 0.2)
            assert int(got.k[e]) == k
            assert float((got.tensor[e] - want).norm()) <= 1e-9 * float((want - instruct[e]).norm())


def test_memory_budget_option(monkeypatch):
    assert kernel.parse_bytes("8G") == 8_000_000_000
    assert kernel.parse_bytes("8GiB") == 8 << 30
    assert kernel.parse_bytes("512M") == 512_000_000
    assert kernel.parse_bytes("1e9") == 1_000_000_000
    with pytest.raises(ValueError, match="MERGEKIT_TIMBER_MEMORY_BUDGET"):
        kernel.parse_bytes("lots")
    monkeypatch.setenv("MERGEKIT_TIMBER_MEMORY_BUDGET", "3GiB")
    assert kernel.memory_budget(torch.device("cpu")) == 3 << 30
    monkeypatch.delenv("MERGEKIT_TIMBER_MEMORY_BUDGET")
    assert 0 < kernel.memory_budget(torch.device("cpu"))
