"""End to end through the unmodified mergekit CLIs on tiny local models.

Each merge output is compared tensor by tensor with the float64-SVD oracle
(tests/oracle.py) applied to the checkpoint tensors, one matrix per expert and per
projection, as the authors' script does.
"""

import math
import re

import pytest
import torch

from helpers import base_config, config_of, load_dir, run_cli, write_yaml
from pairs.synthetic import write_pair
from oracle import timber_matrix

ARCHES = ["llama", "qwen3", "qwen3_moe"]
# Elements of a merged tensor that may differ from the oracle rounded to the output dtype
# (a float64 result within ~1e-11 of a rounding boundary): measured, 0 of 1.16 million
# bf16 elements over timber 0.2/0.5 and timber_l on the three tiny pairs. A tensor
# under 100,000 elements may hold one such element.
MISMATCH_FRACTION = 1e-5


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {arch: write_pair(root / arch, arch=arch, layers=2, seed=1) for arch in ARCHES}


def per_matrix(tensors: dict) -> dict:
    """Checkpoint tensors as 2-D matrices: stacked experts split per expert/projection."""
    out = {}
    for name, t in tensors.items():
        stacked = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if stacked and t.ndim == 3:
            prefix, kind = stacked.groups()
            for e in range(t.shape[0]):
                if kind == "gate_up_proj":
                    half = t.shape[1] // 2
                    out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :half]
                    out[f"{prefix}.{e}.up_proj.weight"] = t[e, half:]
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def expected(base: dict, instruct: dict, lam_for) -> dict:
    """Oracle output per matrix; lam_for(name) gives lambda, or None for 'instruct as is'."""
    want = {}
    for name, wi in instruct.items():
        lam = lam_for(name)
        if wi.ndim < 2 or lam is None:
            want[name] = wi
        else:
            want[name] = timber_matrix(base[name], wi, lam)[0]
    return want


def assert_matches(out_dir, want: dict, dtype=torch.bfloat16):
    got = per_matrix(load_dir(out_dir))
    assert set(want) <= set(got), f"missing tensors: {sorted(set(want) - set(got))[:5]}"
    for name, w in want.items():
        g = got[name]
        assert g.dtype == dtype, (name, g.dtype)
        assert_close_to_oracle(name, g, w)


def assert_close_to_oracle(name, got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` is the float64 oracle `want` rounded to got's dtype, up to MISMATCH_FRACTION
    of its elements, and no further from `want` in float64 norm than that rounding is."""
    assert got.shape == want.shape, name
    rounded = want.to(got.dtype)
    differ = int((got != rounded).sum())
    assert differ <= math.ceil(MISMATCH_FRACTION * got.numel()), f"{name}: {differ} of {got.numel()} elements differ"
    want64 = want.to(torch.float64)
    deviation = float((got.to(torch.float64) - want64).norm())
    rounding = float((rounded.to(torch.float64) - want64).norm())
    assert deviation <= 1.01 * rounding + 1e-12 * float(want64.norm()), (name, deviation, rounding)


def merge(tmp_path, config, *extra, check=True, tool="mergekit-yaml"):
    cfg = write_yaml(tmp_path / "timber.yml", config)
    out = tmp_path / "out"
    proc = run_cli(tool, cfg, out, *extra, check=check)
    return out, proc


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("method,lam", [("timber", 0.2), ("timber_l", 0.0)])
def test_cli_matches_oracle(pairs, tmp_path, arch, method, lam):
    base_dir, instruct_dir = pairs[arch]
    config = base_config(base_dir, instruct_dir, method, **({"lambda": lam} if method == "timber" else {}))
    out, _ = merge(tmp_path, config)
    base, instruct = per_matrix(load_dir(base_dir)), per_matrix(load_dir(instruct_dir))
    assert_matches(out, expected(base, instruct, lambda name: lam))
    if arch == "qwen3":
        assert "lm_head.weight" not in load_dir(out)  # tied embeddings stay tied
        assert config_of(out)["tie_word_embeddings"] is True
    card = (out / "README.md").read_text()
    assert "mergekit plugin mergekit-timber" in card and "pip install mergekit-timber" not in card
    assert "https://arxiv.org/abs/2509.23595" in card
    assert f"merge_method: {method}" in card


def test_per_module_lambda_filters_change_only_intended_tensors(pairs, tmp_path):
    base_dir, instruct_dir = pairs["llama"]
    # self_attn at 0.5, everything else untouched (lambda = 1 returns the instruct tensor).
    config = base_config(
        base_dir, instruct_dir, **{"lambda": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]}
    )
    out, _ = merge(tmp_path, config)
    base, instruct = load_dir(base_dir), load_dir(instruct_dir)
    want = expected(base, instruct, lambda n: 0.5 if "self_attn" in n else None)
    assert_matches(out, want)
    got = load_dir(out)
    for name in instruct:
        if "self_attn" not in name:
            assert torch.equal(got[name], instruct[name]), name
        elif instruct[name].ndim == 2:
            assert not torch.equal(got[name], instruct[name]), name


def test_lambda_on_the_instruct_entry_and_gradient(pairs, tmp_path):
    base_dir, instruct_dir = pairs["qwen3"]
    # A gradient over the 2 layers: layer 0 gets 0.0, layer 1 gets 1.0 (= instruct).
    config = {
        "merge_method": "timber",
        "base_model": str(base_dir),
        "models": [{"model": str(instruct_dir), "parameters": {"lambda": [0.0, 1.0]}}],
    }
    out, _ = merge(tmp_path, config)
    base, instruct = load_dir(base_dir), load_dir(instruct_dir)

    def lam(name):
        # Layer 1 is at the gradient's end (instruct); layer 0 and the embeddings,
        # planned at t = 0, get 0.0.
        return None if name.startswith("model.layers.1.") else 0.0

    assert_matches(out, expected(base, instruct, lam))


def test_refine_embeddings_false_keeps_vocab_tensors(pairs, tmp_path):
    base_dir, instruct_dir = pairs["llama"]
    config = base_config(base_dir, instruct_dir, **{"lambda": 0.0, "refine_embeddings": False})
    out, _ = merge(tmp_path, config)
    base, instruct = load_dir(base_dir), load_dir(instruct_dir)
    vocab = ("model.embed_tokens.weight", "lm_head.weight")
    assert_matches(out, expected(base, instruct, lambda n: None if n in vocab else 0.0))
    got = load_dir(out)
    for name in vocab:
        assert torch.equal(got[name], instruct[name])


def test_out_dtype_and_float32_compute(pairs, tmp_path):
    base_dir, instruct_dir = pairs["qwen3"]
    base, instruct = load_dir(base_dir), load_dir(instruct_dir)
    want = expected(base, instruct, lambda n: 0.5)
    # out_dtype alone: computed from the bf16 checkpoint, rounded to it, written as float32.
    config = base_config(base_dir, instruct_dir, **{"lambda": 0.5})
    config["out_dtype"] = "float32"
    out, _ = merge(tmp_path, config)
    got = load_dir(out)
    for name, w in want.items():
        assert got[name].dtype == torch.float32
        assert_close_to_oracle(name, got[name].to(torch.bfloat16), w)
    # dtype: float32 keeps the whole edit at float32 precision.
    config["dtype"] = "float32"
    out2 = tmp_path / "out32"
    run_cli("mergekit-yaml", write_yaml(tmp_path / "f32.yml", config), out2)
    assert_matches(out2, want, dtype=torch.float32)


def test_mergekit_multi_timber_then_ties(pairs, tmp_path):
    base_dir, instruct_dir = pairs["llama"]
    # A "domain" model: another fine-tune of the same base.
    domain_dir = write_pair(tmp_path / "domain", arch="llama", layers=2, seed=1)[0]
    domain = write_pair(tmp_path / "domain2", arch="llama", layers=2, seed=9)[1]
    del domain_dir
    multi = f"""
name: refined
merge_method: timber
base_model: {base_dir}
models:
  - model: {instruct_dir}
parameters:
  lambda: 0.2
dtype: bfloat16
---
merge_method: ties
base_model: {base_dir}
models:
  - model: refined
    parameters: {{weight: 0.6, density: 0.8}}
  - model: {domain}
    parameters: {{weight: 0.4, density: 0.8}}
dtype: bfloat16
"""
    cfg = write_yaml(tmp_path / "multi.yml", multi)
    inter = tmp_path / "intermediate"
    out = tmp_path / "final"
    run_cli("mergekit-multi", cfg, "--intermediate-dir", inter, "--out-path", out)
    base, instruct = load_dir(base_dir), load_dir(instruct_dir)
    assert_matches(inter / "refined", expected(base, instruct, lambda n: 0.2))
    final = load_dir(out)
    assert set(final) == set(instruct)
    assert not torch.equal(final["model.layers.0.mlp.down_proj.weight"], load_dir(inter / "refined")["model.layers.0.mlp.down_proj.weight"])


def test_python_api_run_merge(pairs, tmp_path):
    base_dir, instruct_dir = pairs["qwen3_moe"]
    import mergekit_timber  # noqa: F401 - registers for the Python API
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(base_config(base_dir, instruct_dir, **{"lambda": 0.5}))
    out = tmp_path / "api"
    run_merge(config, str(out), options=MergeOptions(quiet=True))
    base, instruct = per_matrix(load_dir(base_dir)), per_matrix(load_dir(instruct_dir))
    assert_matches(out, expected(base, instruct, lambda n: 0.5))
