"""Quantized inputs: block-FP8 pairs merge as Timber on the exactly (float32) dequantized pair, every other
format stops with one line and no output, `mergekit-timber dequantize` matches transformers."""

import json
import shutil

import pytest
import torch

from helpers import base_config, config_of, load_dir, run_cli, write_yaml
from mergekit_timber.integration.quantized import dequantize_block_fp8, dequantize_mxfp4
from pairs.synthetic import write_pair
from pairs.quantized_pairs import (
    quantize_block_fp8,
    quantize_mxfp4,
    reference_fp8,
    write_block_fp8,
    write_gptq,
    write_mxfp4,
)
from test_e2e import assert_matches, expected

# Every linear has partial edge blocks: 192 = 128 + 64, 320 = 2 x 128 + 64, 96 < 128.
SHAPES = dict(arch="qwen3", layers=1, hidden=192, intermediate=320, heads=4, kv_heads=2, head_dim=48)


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    base, instruct = write_pair(root / "bf16", seed=5, distinct_files=True, **SHAPES)
    return write_block_fp8(base, root / "base"), write_block_fp8(instruct, root / "instruct")


@pytest.fixture(scope="module")
def dequantized_pair(fp8_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("deq")
    from mergekit_timber.integration.quantized import dequantize_checkpoint

    for model in fp8_pair:  # the CLI runs in test_dequantize_fp8_round_trips_against_transformers
        dequantize_checkpoint(model, root / model.name)
    return root / "base", root / "instruct"


@pytest.fixture(scope="module")
def exact_pair(fp8_pair, tmp_path_factory):
    """The FP8 pair dequantized exactly: code x block scale in float32."""
    root = tmp_path_factory.mktemp("exact")
    from mergekit_timber.integration.quantized import dequantize_checkpoint

    for model in fp8_pair:
        dequantize_checkpoint(model, root / model.name, "float32")
    return root / "base", root / "instruct"


def merge(tmp_path, base, instruct, name="out", check=True, **extra):
    """The real mergekit-yaml CLI."""
    cfg = write_yaml(tmp_path / f"{name}.yml", {**base_config(base, instruct), **extra})
    out = tmp_path / name
    return out, run_cli("mergekit-yaml", cfg, out, check=check)


def merge_here(tmp_path, base, instruct, name="out", **extra):
    """mergekit's run_merge from Python (the same seam, no interpreter start-up)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out = tmp_path / name
    config = MergeConfiguration.model_validate({**base_config(base, instruct), **extra})
    run_merge(config, str(out), options=MergeOptions(quiet=True))
    return out


def refused_here(tmp_path, base, instruct) -> str:
    """The one-line error of a merge refused before any output (run from Python)."""
    from mergekit_timber.errors import TimberInputError

    with pytest.raises(TimberInputError) as caught:
        merge_here(tmp_path, base, instruct)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    line = str(caught.value)
    assert "\n" not in line
    return line


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mergekit-timber: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


# ----------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("shape", [(192, 320), (96, 192), (256, 384), (3, 130, 257)])
def test_block_fp8_rule_is_deepseek_and_transformers(shape):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g)
    pieces = [quantize_block_fp8(w) for w in weight.reshape(-1, *shape[-2:])]
    code = torch.stack([c for c, _ in pieces]).reshape(shape)
    scale = torch.stack([s for _, s in pieces]).reshape(*shape[:-2], *pieces[0][1].shape)
    want = torch.stack([reference_fp8(c, s) for c, s in pieces]).reshape(shape)
    got32 = dequantize_block_fp8(code, scale, (128, 128), torch.float32)
    assert torch.equal(got32, want)  # DeepSeek-V3's weight_dequant: code x block scale in float32
    # transformers' rule with explicit block sizes (partial edge blocks handled)
    assert torch.equal(got32, _dequantize_fp8_weight(code, scale, [128, 128], torch.float32))
    # rounded once to bf16, as DeepSeek stores it
    assert torch.equal(dequantize_block_fp8(code, scale, (128, 128), torch.bfloat16), want.to(torch.bfloat16))
    if all(n % 128 == 0 for n in shape[-2:]):  # transformers' loader derives blocks from the grid
        assert torch.equal(
            dequantize_block_fp8(code, scale, (128, 128), torch.bfloat16),
            Fp8Dequantize(None)._dequantize_one(code, scale, output_dtype=torch.bfloat16),
        )


def test_mxfp4_rule_is_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    blocks, scales = quantize_mxfp4(torch.randn(3, 40, 96, generator=g))
    for dtype in (torch.bfloat16, torch.float32):
        got = dequantize_mxfp4(blocks, scales, dtype)
        assert got.shape == (3, 96, 40)
        assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=dtype))


# ----------------------------------------------------------------------------- block-FP8 merged


def test_fp8_pair_merges_as_timber_on_the_exactly_dequantized_pair(fp8_pair, exact_pair, dequantized_pair, tmp_path):
    out, _ = merge(tmp_path, *fp8_pair)
    written = load_dir(out)
    assert not [n for n in written if "scale" in n]
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    config = config_of(out)
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    # The paper's Timber (float64 SVD oracle) on the float32 dequantized pair, rounded once.
    exact_base, exact_instruct = load_dir(exact_pair[0]), load_dir(exact_pair[1])
    want = expected(exact_base, exact_instruct, lambda name: 0.2)
    assert_matches(out, want)
    # Each exact tensor is DeepSeek's rule on the FP8 checkpoint's code and scales, unrounded.
    fp8 = load_dir(fp8_pair[1])
    for name, tensor in exact_instruct.items():
        if name + "_scale_inv" in fp8:
            assert torch.equal(tensor, reference_fp8(fp8[name], fp8[name + "_scale_inv"])), name
        else:
            assert torch.equal(tensor, fp8[name].to(torch.float32)), name
    # Rounding each weight to bf16 first (the merge of the bf16 dequantized pair) is not that.
    rounded_first = load_dir(merge_here(tmp_path, *dequantized_pair, name="bf16-first"))
    matrices = [n for n in want if want[n].ndim == 2]
    differ = sum(int((rounded_first[n] != want[n].to(torch.bfloat16)).sum()) for n in matrices)
    exact = sum(int((written[n] != want[n].to(torch.bfloat16)).sum()) for n in matrices)
    total = sum(want[n].numel() for n in matrices)
    assert exact <= 1e-5 * total < differ, (exact, differ, total)
    # A drop-in bf16 model for transformers.
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.bfloat16 and getattr(model.config, "quantization_config", None) is None
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_fp8_base_with_bf16_instruct_and_dtype(fp8_pair, dequantized_pair, tmp_path):
    """One quantized side is enough; `dtype:`/`out_dtype:` as for any merge."""
    base, _ = fp8_pair
    out = merge_here(tmp_path, base, dequantized_pair[1], dtype="float32", out_dtype="bfloat16")
    reference = merge_here(tmp_path, dequantized_pair[0], dequantized_pair[1], name="reference",
                           dtype="float32", out_dtype="bfloat16")  # fmt: skip
    got, want = load_dir(out), load_dir(reference)
    assert sorted(got) == sorted(want)
    # FP8 read in float32 is the exact product, rounded once by out_dtype; the reference
    # read bf16-rounded values: the two agree wherever Timber keeps the input.
    names = [n for n in want if not torch.equal(got[n], want[n])]
    assert all(".layers." in n and n.endswith("proj.weight") for n in names), names
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert "quantization_config" not in config_of(out)


def test_fp8_inconsistent_scales_stop_in_one_line(fp8_pair, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fp8_pair[1], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refused_here(tmp_path, fp8_pair[0], broken)
    assert "model.layers.0.mlp.down_proj.weight" in line and "weight_scale_inv" in line and str(broken) in line


# ----------------------------------------------------------------------------- refused


def _pairs(tmp_path, kind):
    if kind == "mxfp4":
        return write_mxfp4(tmp_path / "b", seed=0), write_mxfp4(tmp_path / "i", seed=1)
    if kind == "mxfp4-no-config":
        return write_mxfp4(tmp_path / "b", seed=0, config=False), write_mxfp4(tmp_path / "i", seed=1, config=False)
    if kind == "gptq":
        return write_gptq(tmp_path / "b", seed=0), write_gptq(tmp_path / "i", seed=1)
    return write_gptq(tmp_path / "b", seed=0, config=False), write_gptq(tmp_path / "i", seed=1, config=False)


@pytest.mark.parametrize(
    "kind,words",
    [
        ("mxfp4", ["MXFP4", "quant_method: mxfp4", "mergekit-timber dequantize"]),
        ("mxfp4-no-config", ["MXFP4", "_blocks", "mergekit-timber dequantize"]),
        ("gptq", ["GPTQ (4-bit)", "quant_method: gptq", "cannot dequantize", "unquantized model"]),
        ("gptq-no-config", ["GPTQ/AWQ", "qweight", "cannot dequantize"]),
    ],
)
def test_other_formats_stop_in_one_line_with_no_output(tmp_path, kind, words):
    base, instruct = _pairs(tmp_path, kind)
    if kind != "mxfp4":
        line = refused_here(tmp_path, base, instruct)
    else:  # as a user sees it (one start of mergekit-yaml: ~10 s)
        out, proc = merge(tmp_path, base, instruct, check=False)
        line = one_line_error(proc)
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert f"base model ({base})" in line, line
    for word in words:
        assert word in line, (word, line)


def test_float8_without_config_stops(fp8_pair, tmp_path):
    stripped = tmp_path / "stripped"
    shutil.copytree(fp8_pair[1], stripped)
    config = config_of(stripped)
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    line = refused_here(tmp_path, fp8_pair[0], stripped)
    assert "FP8 (no quantization_config)" in line and str(stripped) in line and "F8_E4M3" in line


# ----------------------------------------------------------------------------- dequantize


def test_dequantize_fp8_round_trips_against_transformers(tmp_path):
    """Full 128x128 blocks: transformers loads the FP8 checkpoint itself (CPU: dequantized)."""
    from transformers import AutoModelForCausalLM

    base, _ = write_pair(tmp_path / "bf16", arch="qwen3", layers=1, hidden=256, intermediate=384,
                         heads=2, kv_heads=1, head_dim=128, seed=2)  # fmt: skip
    fp8 = write_block_fp8(base, tmp_path / "fp8")
    out = tmp_path / "deq"
    proc = run_cli("mergekit-timber", "dequantize", fp8, out)
    assert proc.stdout.strip() == f"block-FP8 -> bfloat16\t{out}"
    theirs = AutoModelForCausalLM.from_pretrained(fp8).state_dict()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(load_dir(out)) and not [n for n in index["weight_map"] if "scale" in n]
    assert "quantization_config" not in config_of(out) and config_of(out)["dtype"] == "bfloat16"


def test_dequantize_mxfp4_round_trips_against_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    source, out = write_mxfp4(tmp_path / "mx", seed=3), tmp_path / "deq"
    run_cli("mergekit-timber", "dequantize", source, out)
    theirs = AutoModelForCausalLM.from_pretrained(source).state_dict()
    mine = load_dir(out)
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert "quantization_config" not in config_of(out)


@pytest.mark.parametrize("kind", ["gptq", "plain"])
def test_dequantize_refuses_in_one_line(tmp_path, kind):
    from mergekit_timber.errors import TimberInputError
    from mergekit_timber.integration.quantized import dequantize_checkpoint

    source = write_gptq(tmp_path / "q", seed=0) if kind == "gptq" else write_pair(tmp_path / "p", layers=1)[0]
    out = tmp_path / "out"
    if kind == "gptq":
        line = one_line_error(run_cli("mergekit-timber", "dequantize", source, out, check=False))
    else:
        with pytest.raises(TimberInputError) as caught:
            dequantize_checkpoint(source, out)
        line = str(caught.value)
    assert str(source) in line
    assert ("GPTQ (4-bit)" in line) if kind == "gptq" else ("not quantized" in line)
    assert not out.exists()


def test_sweep_of_an_fp8_pair(fp8_pair, tmp_path):
    from mergekit.options import MergeOptions

    from mergekit_timber.tools.sweep import run_sweep

    cfg = write_yaml(tmp_path / "sweep.yml", base_config(*fp8_pair))
    outs = run_sweep(cfg, tmp_path / "sweep", [0.2, 0.5], MergeOptions(quiet=True))
    for lam, out in zip((0.2, 0.5), outs):  # each the single merge of that lambda
        want = load_dir(merge_here(tmp_path, *fp8_pair, name=f"ref-{lam}", parameters={"lambda": lam}))
        got = load_dir(out)
        assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want), lam
        assert "quantization_config" not in config_of(out)


def test_dequantizing_loaders_live_only_for_their_merge(fp8_pair, tmp_path):
    """The seam's loaders leave mergekit's loader cache with the merge that put them there."""
    from mergekit.io.tasks import LoaderCache

    merge_here(tmp_path, *fp8_pair)
    assert not [m for m, loader in LoaderCache().loaders.items() if type(loader).__name__ == "DequantizingLoader"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fp8_pair_on_the_device(fp8_pair, exact_pair, tmp_path):
    """--cuda: the FP8 pair is dequantized on the host as it is read, refined on the device."""
    cfg = write_yaml(tmp_path / "cuda.yml", base_config(*fp8_pair))
    run_cli("mergekit-yaml", cfg, tmp_path / "device", "--cuda")
    deq_base, deq_instruct = load_dir(exact_pair[0]), load_dir(exact_pair[1])
    assert_matches(tmp_path / "device", expected(deq_base, deq_instruct, lambda name: 0.2))
    assert "quantization_config" not in config_of(tmp_path / "device")


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float8_e8m0fnu])
def test_block_fp8_rule_with_other_scale_dtypes(scale_dtype):
    """bf16 scales, and the power-of-two (UE8M0) scales of DeepSeek-V3.1-style checkpoints."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    code, scale = quantize_block_fp8(torch.randn(200, 300, generator=torch.Generator().manual_seed(4)))
    scale = scale.to(scale_dtype)
    want = reference_fp8(code, scale.to(torch.float32))
    assert torch.equal(dequantize_block_fp8(code, scale, (128, 128), torch.float32), want)
    assert torch.equal(_dequantize_fp8_weight(code, scale, [128, 128], torch.float32), want)
