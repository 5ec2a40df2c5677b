"""The kernel's memory plan: batches within the budget at full model scale (arithmetic),
and the bound held by what torch really allocates at small scale."""

import math

import pytest
import torch

from alloc_tracker import LiveBytes
from mergekit_timber.method import kernel
from mergekit_timber.method.kernel import plan_batches

GIB = 1 << 30
# One stack of one projection of a MoE layer, as the kernel sees it: [E, m, n] tall.
FULL_SCALE = {
    "DeepSeek-V3": (256, 7168, 2048),
    "Kimi-K2": (384, 7168, 2048),
    "Qwen3-235B-A22B": (128, 4096, 1536),
}


@pytest.mark.parametrize("model", FULL_SCALE)
@pytest.mark.parametrize("budget", [8 * GIB, 31 * GIB, 2 * GIB])
def test_full_scale_plans_stay_within_the_budget(model, budget):
    experts, m, n = FULL_SCALE[model]
    plan = plan_batches((experts, m, n), budget)
    assert plan.fits and plan.peak <= budget
    assert plan.batches == math.ceil(experts / plan.batch)
    assert plan.batch == min(experts, (budget - plan.fixed) // plan.per_matrix)  # the largest that fits
    # Chunk height does not depend on the batch: each batch reads its Gram a handful of times
    # (before: rows shrank as the batch grew, and a 512-matrix stack read its Gram ~2400 times).
    assert plan.rows == plan_batches((1, m, n), budget).rows == min(m, kernel.chunk_rows(n))
    assert math.ceil(m / plan.rows) <= 5
    # Memory model of the docstring: Gram, eigenvectors, masked columns; 4 row chunks.
    assert plan.per_matrix == 8 * (3 * n * n + 4 * plan.rows * n + 2 * n) + n * n


def test_the_bound_holds_whatever_the_expert_count():
    budget = 8 * GIB
    peaks = {e: plan_batches((e, 7168, 2048), budget).peak for e in (8, 64, 256, 384, 4096)}
    assert max(peaks.values()) <= budget
    assert peaks[4096] == peaks[384] == peaks[256]  # beyond one budget's worth, only the batch count grows


def test_a_budget_below_one_matrix_still_runs_one_at_a_time():
    plan = plan_batches((256, 7168, 2048), 1)
    assert plan.batch == 1 and plan.batches == 256 and not plan.fits


@pytest.mark.parametrize("chunk_bytes", [None, 8 * 64 * 40])  # one chunk; 40-row chunks
@pytest.mark.parametrize("per_batch", [1, 3, 12])
def test_allocations_stay_within_the_plan(monkeypatch, chunk_bytes, per_batch):
    if chunk_bytes:
        monkeypatch.setattr(kernel, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    shape = (12, 300, 64)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    instruct = (base.double() + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    unit = plan_batches(shape, 1)
    budget = unit.fixed + per_batch * unit.per_matrix
    plan = plan_batches(shape, budget, chunk_cap=kernel.CHUNK_BYTES)  # as refine_stack plans on the host
    # One chunk: the budget sets the batch; 40-row chunks: the host's chunk cap (one matrix).
    assert plan.batch == (per_batch if chunk_bytes is None else 1)
    lams = [0.0, 0.2, 0.5]
    outs = [torch.empty_like(instruct) for _ in lams]  # the caller's (mergekit's) outputs
    with LiveBytes(outside=[base, instruct, *outs]) as live:
        kernel.refine_stack(base, instruct, lams, budget=plan.budget, outs=outs)
    # The solver's workspace (plan.fixed) is inside the op, unseen here: the rest is bounded.
    assert live.peak <= plan.peak - plan.fixed
    assert live.peak >= 0.3 * (plan.peak - plan.fixed)  # and the model is not a loose guess
    assert live.now == 0


def test_the_host_keeps_a_batch_chunk_within_chunk_bytes():
    """On the host a bigger batch is not faster, and buffers past CHUNK_BYTES are slower."""
    plan = plan_batches((64, 768, 256), 1 << 40, chunk_cap=kernel.CHUNK_BYTES)
    assert plan.batch == kernel.CHUNK_BYTES // (8 * 768 * 256) == 16
    assert plan_batches((64, 768, 256), 1 << 40).batch == 64  # a device: the budget alone
