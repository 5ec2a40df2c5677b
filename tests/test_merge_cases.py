"""Merge paths beyond the default: ablation rules, identical tensors, many row chunks,
tensors of more than two dimensions. Outputs are checked against the float64-SVD oracle."""

import pytest
import torch
from safetensors.torch import save_file

from helpers import base_config, load_dir
from oracle import timber_matrix, timber_tensor
from test_e2e import assert_close_to_oracle, assert_matches, merge, pairs, per_matrix  # noqa: F401 - pairs is a fixture


def direct_call(name: str, base: torch.Tensor, instruct: torch.Tensor, **parameters) -> torch.Tensor:
    """`timber` through mergekit's direct call (`method(groups)`), on one Base/Instruct pair."""
    import mergekit_timber.method.adapter  # noqa: F401 - registers timber
    from mergekit import merge_methods
    from mergekit.common import ModelReference
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    group = TensorGroup(
        entries=(
            TensorEntry(id=ModelReference.model_validate("base"), tensor=base, is_base=True),
            TensorEntry(id=ModelReference.model_validate("instruct"), tensor=instruct, is_base=False),
        ),
        metadata=TensorMetadata(name=name),
    )
    (merged,) = merge_methods.get("timber")((group,), parameters=parameters)
    return merged


def oracle_outputs(base: dict, instruct: dict, lam: float, rule: str = "erank", value=None) -> dict:
    return {
        name: wi if wi.ndim < 2 else timber_matrix(base[name], wi, lam, rule, value)[0]
        for name, wi in instruct.items()
    }


@pytest.mark.parametrize("rule,value", [("rank_ratio", 0.3), ("energy", 0.9)])
def test_ablation_rules_through_mergekit_yaml(pairs, tmp_path, rule, value):
    base_dir, instruct_dir = pairs["qwen3_moe"]  # experts too: the rule applies per expert matrix
    out, _ = merge(tmp_path, base_config(base_dir, instruct_dir, **{"lambda": 0.2, rule: value}))
    base, instruct = per_matrix(load_dir(base_dir)), per_matrix(load_dir(instruct_dir))
    assert_matches(out, oracle_outputs(base, instruct, 0.2, rule, value))
    # The rule changes the result: the default eRank head gives other tensors.
    erank = oracle_outputs(base, instruct, 0.2)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(erank[name].to(torch.bfloat16), load_dir(out)[name])


def test_identical_tensor_is_kept_with_a_warning(pairs, tmp_path):
    base_dir, instruct_dir = pairs["llama"]
    same = "model.layers.1.mlp.up_proj.weight"
    base, instruct = load_dir(base_dir), load_dir(instruct_dir)
    copy = tmp_path / "instruct"
    copy.mkdir()
    for item in instruct_dir.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    save_file(dict(instruct, **{same: base[same]}), str(copy / "model.safetensors"), metadata={"format": "pt"})
    out, proc = merge(tmp_path, base_config(base_dir, copy, **{"lambda": 0.2}))
    assert f"{same}: base and instruct are identical; kept the instruct tensor" in proc.stderr
    got = load_dir(out)
    assert torch.equal(got[same], base[same])
    others = {n: w for n, w in instruct.items() if n != same}
    assert_matches(out, oracle_outputs(base, others, 0.2))


def test_many_row_chunks_in_a_real_merge(pairs, tmp_path, monkeypatch):
    """Chunks of a few rows: the Gram, the rebuild and the page release run chunk by chunk."""
    import mergekit_timber.method.adapter  # noqa: F401 - registers timber
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from mergekit_timber.method import kernel

    base_dir, instruct_dir = pairs["qwen3_moe"]
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 8 * 64 * 7)  # 7 rows of 64 float64 columns
    assert len(kernel.row_chunks(torch.Size([512, 64]))) == 74
    config = MergeConfiguration.model_validate(base_config(base_dir, instruct_dir, **{"lambda": 0.5}))
    out = tmp_path / "chunked"
    run_merge(config, str(out), options=MergeOptions(quiet=True))
    base, instruct = per_matrix(load_dir(base_dir)), per_matrix(load_dir(instruct_dir))
    assert_matches(out, oracle_outputs(base, instruct, 0.5))


def test_tensor_of_more_than_two_dims_is_one_matrix_out_by_rest(tmp_path):
    """A non-expert 3-D tensor (e.g. a convolution) is refined as [out, -1], as the authors do."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(24, 6, 4, generator=g)
    instruct = base + 0.1 * torch.randn(24, 6, 4, generator=g)
    name = "model.layers.0.conv1d.weight"
    got = direct_call(name, base, instruct, **{"lambda": 0.3})
    want = timber_tensor(name, base, instruct, 0.3)
    assert got.dtype == torch.float32
    assert_close_to_oracle(name, got, want)
    # Not split along the middle axis: a per-[6, 4]-slice decomposition gives another result.
    per_slice = torch.stack([timber_matrix(base[i], instruct[i], 0.3)[0] for i in range(24)])
    assert float((got.double() - per_slice).norm()) > 1e-3 * float((want - instruct.double()).norm())


def test_direct_call_passes_integer_buffers_through():
    """mergekit's direct call hands integer tensors to the method: it returns the instruct one."""
    base, instruct = torch.arange(12).reshape(4, 3), torch.arange(12).reshape(4, 3) * 2
    assert torch.equal(direct_call("position_ids", base, instruct), instruct)
