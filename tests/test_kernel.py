"""The kernel against the float64-SVD oracle written from the paper (tests/oracle.py)."""

import pytest
import torch

from mergekit_timber.method.kernel import (
    HeadRule,
    effective_rank,
    head_size,
    refine_matrix,
    refine_stack,
    singular_values,
)
from oracle import erank, timber_matrix, timber_tensor, with_spectrum

LAMBDAS = [0.0, 0.2, 0.5, 1.0]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(kind, m, n, seed=0):
    g = _gen(seed)
    r = min(m, n)
    i = torch.arange(1, r + 1, dtype=torch.float64)
    if kind == "gauss":
        d = torch.randn(m, n, dtype=torch.float64, generator=g)
    elif kind == "1/i":
        d = with_spectrum(m, n, 1 / i, g)
    elif kind == "8-decades":
        d = with_spectrum(m, n, torch.logspace(0, -8, r, dtype=torch.float64), g)
    elif kind == "rank-1":
        d = torch.randn(m, 1, dtype=torch.float64, generator=g) @ torch.randn(1, n, dtype=torch.float64, generator=g)
    elif kind == "zero":
        d = torch.zeros(m, n, dtype=torch.float64)
    else:
        raise ValueError(kind)
    base = torch.randn(m, n, dtype=torch.float64, generator=g)
    return base, base + 0.05 * d


def deviation(got, want, base, instruct):
    """Deviation relative to the edit Timber makes, W_out - W_I.

    Where that edit is itself rounding noise (a rank-1 delta has no tail), the floor
    1e-8 * ||D|| keeps the ratio meaningful: 1e-6 of it is 1e-14 * ||D||, float64 noise.
    """
    edit = (want - instruct.double()).norm()
    scale = max(float(edit), 1e-8 * float((instruct.double() - base.double()).norm()), 1e-300)
    return float((got.double() - want).norm()) / scale


SHAPES = {"tall": (96, 40), "wide": (40, 96), "square": (64, 64), "1xN": (1, 70), "Nx1": (70, 1)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["gauss", "1/i", "8-decades", "rank-1", "zero"])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_matrix_matches_oracle(shape, kind, lam):
    m, n = SHAPES[shape]
    base, instruct = _case(kind, m, n)
    want, s, k = timber_matrix(base, instruct, lam)
    got = refine_stack(base[None], instruct[None], lam, out_dtype=torch.float64)
    assert got.tensor.shape == (1, m, n)
    assert deviation(got.tensor[0], want, base, instruct) < 1e-6
    if kind in ("gauss", "1/i", "8-decades") and min(m, n) > 1:
        assert int(got.k[0]) == k  # same head size as the SVD
        assert torch.allclose(got.singular_values[0][:k], s[:k], rtol=1e-9)


@pytest.mark.parametrize("lam", LAMBDAS)
def test_large_adversarial_spectra(lam):
    # The spectra that break a float32 Gram (see kernel.py), at a realistic aspect ratio.
    for kind in ("1/i", "8-decades"):
        base, instruct = _case(kind, 768, 256, seed=3)
        want, _, k = timber_matrix(base, instruct, lam)
        got = refine_stack(base[None], instruct[None], lam, out_dtype=torch.float64)
        assert int(got.k[0]) == k
        assert deviation(got.tensor[0], want, base, instruct) < 1e-6


def test_lambda_one_returns_instruct_and_zero_delta_is_identity():
    base, instruct = _case("gauss", 30, 20)
    out = refine_matrix(base, instruct, 1.0)
    assert torch.equal(out, instruct)
    out = refine_matrix(base, base.clone(), 0.0)
    assert torch.isfinite(out).all() and torch.equal(out, base)


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_expert_stack_is_one_decomposition_per_expert(lam):
    experts = []
    for e, kind in enumerate(["gauss", "1/i", "zero", "rank-1"]):
        experts.append(_case(kind, 48, 24, seed=e))
    base = torch.stack([b for b, _ in experts])
    instruct = torch.stack([i for _, i in experts])
    got = refine_stack(base, instruct, lam, out_dtype=torch.float64)
    for e in range(len(experts)):
        want, _, _ = timber_matrix(base[e], instruct[e], lam)
        assert deviation(got.tensor[e], want, base[e], instruct[e]) < 1e-6
    # Per-expert K really differs (a shared K would be wrong).
    assert len(set(got.k.tolist())) > 1


@pytest.mark.parametrize("rule,value", [("rank_ratio", 0.8), ("rank_ratio", 0.95), ("energy", 0.98), ("energy", 0.995)])
def test_ablation_cutoffs_match_oracle(rule, value):
    base, instruct = _case("1/i", 80, 50)
    want, _, k = timber_matrix(base, instruct, 0.0, rule, value)
    got = refine_stack(base[None], instruct[None], 0.0, HeadRule(rule, value), torch.float64)
    assert int(got.k[0]) == k
    assert deviation(got.tensor[0], want, base, instruct) < 1e-6


def test_bf16_in_bf16_out_matches_rounded_oracle():
    base, instruct = _case("1/i", 256, 128)
    base, instruct = base.to(torch.bfloat16), instruct.to(torch.bfloat16)
    out = refine_matrix(base, instruct, 0.2)
    assert out.dtype == torch.bfloat16
    want = timber_tensor("w", base, instruct, 0.2).to(torch.bfloat16)
    assert (out != want).float().mean() <= 1e-3


def test_effective_rank_and_singular_values():
    s = torch.tensor([3.0, 1.0, 0.0])
    assert float(effective_rank(s)) == pytest.approx(erank(s.double()))
    assert float(effective_rank(torch.zeros(4))) == 0.0
    assert head_size(torch.tensor([[1.0, 1.0, 1.0, 0.0]])).tolist() == [3]
    m = _case("1/i", 50, 30)[1]
    assert torch.allclose(singular_values(m), torch.linalg.svdvals(m), rtol=1e-8, atol=1e-12)
    assert torch.allclose(singular_values(m.T), torch.linalg.svdvals(m), rtol=1e-8, atol=1e-12)


def test_head_rule_validation():
    from mergekit_timber.errors import TimberConfigError

    with pytest.raises(TimberConfigError, match=r"^energy must lie in \(0, 1\]; got 1.5$"):
        HeadRule("energy", 1.5)
    with pytest.raises(ValueError):
        HeadRule("nope")


def test_meta_device_allocations_follow_the_input():
    # Every buffer is allocated on the input's device: shape-check on "meta" tensors
    # (no data) up to the eigen-decomposition, which meta cannot run.
    from mergekit_timber.method.kernel import delta64, row_chunks

    b = torch.empty(10, 4, device="meta", dtype=torch.bfloat16)
    assert delta64(b, b, row_chunks(b[None].shape)[0]).device.type == "meta"


def test_non_finite_input_is_detected_through_the_gram():
    from mergekit_timber.method.kernel import NonFiniteDelta

    base, instruct = _case("gauss", 300, 260)  # wide enough for the three-block Gram
    instruct[7, 3] = float("inf")
    with pytest.raises(NonFiniteDelta):
        refine_matrix(base, instruct, 0.2)


def test_symmetric_gram_matches_plain_gram():
    from mergekit_timber.method.kernel import delta_gram

    # 300 columns: two row panels, so the upper-triangle blocks are mirrored.
    d = torch.randn(2, 50, 300, dtype=torch.float64)
    gram, _ = delta_gram(None, d)
    assert torch.allclose(gram, d.transpose(-1, -2) @ d, rtol=1e-12, atol=1e-12)
