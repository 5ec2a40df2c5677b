"""A Timber output's files around the weights are the Instruct's own, whichever transformers
wrote them (issue 27), and a merge whose files or tensor names are not is refused before
anything is published: the safety net for a mergekit that calls the seam's patches another way."""

import json
import shutil

import pytest

from helpers import run_cli, write_yaml
from mergekit_timber.integration import guard
from pairs.synthetic import write_pair

FORMATS = ("transformers4", "transformers5")
ARCHES = ("qwen3", "llama", "qwen3_moe")
# rope theta each test pair is written with (Llama-3.1's with its llama3 scaling, transformers 4 only)
ROPE_THETA = {("llama", "transformers4"): 500000.0, ("llama", "transformers5"): 10000.0}
FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {
        (arch, fmt): write_pair(root / f"{arch}-{fmt}", arch=arch, layers=1, seed=7, config_format=fmt)
        for arch in ARCHES for fmt in FORMATS
    }  # fmt: skip


def timber(base, instruct, **extra):
    return {"merge_method": "timber", "base_model": str(base), "models": [{"model": str(instruct)}], **extra}


def merge_here(config, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(quiet=True))


def assert_instruct_files(out, instruct, dtype):
    """config.json key for key the Instruct's, only the dtype value (in its own key) changed;
    generation config, tokenizer and chat template byte for byte."""
    got, want = (json.loads((d / "config.json").read_text()) for d in (out, instruct))
    key = "torch_dtype" if "torch_dtype" in want else "dtype"
    assert list(got) == list(want)  # the same keys, in the Instruct's order
    assert got.pop(key) == dtype and want.pop(key) == "bfloat16"
    assert got == want
    for name in FILES:
        if (instruct / name).exists() or (out / name).exists():
            assert (out / name).read_bytes() == (instruct / name).read_bytes(), name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHES)
def test_output_config_is_the_instructs_whichever_transformers_wrote_it(pairs, tmp_path, arch, fmt):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base, instruct = pairs[arch, fmt]
    merge_here(timber(base, instruct, out_dtype="float32"), tmp_path / "out")
    assert_instruct_files(tmp_path / "out", instruct, "float32")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    if fmt == "transformers4":  # what a transformers-4 reader needs is there as it was
        assert "rope_parameters" not in raw and "layer_types" not in raw and raw["rope_theta"] > 10000
        assert ("num_experts" in raw) == (arch == "qwen3_moe") and "num_local_experts" not in raw
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.rope_parameters["rope_theta"] == ROPE_THETA.get((arch, fmt), 1000000.0)
    if (arch, fmt) == ("llama", "transformers4"):
        assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template


def test_every_entry_point_writes_the_instructs_files(pairs, tmp_path):
    """mergekit-yaml, a mergekit-multi step and every sweep output, transformers-4 pair."""
    base, instruct = pairs["llama", "transformers4"]
    run_cli("mergekit-yaml", write_yaml(tmp_path / "t.yml", timber(base, instruct, dtype="float16")), tmp_path / "yaml")
    assert_instruct_files(tmp_path / "yaml", instruct, "float16")
    multi = dict(name="step", **timber(base, instruct))
    run_cli("mergekit-multi", write_yaml(tmp_path / "m.yml", multi), "--intermediate-dir", tmp_path / "work")
    assert_instruct_files(tmp_path / "work" / "step", instruct, "bfloat16")
    run_cli("mergekit-timber", "sweep", write_yaml(tmp_path / "s.yml", timber(base, instruct)), tmp_path / "sweep",
            "--lambdas", "0,0.5")
    for lam in ("0", "0.5"):
        assert_instruct_files(tmp_path / "sweep" / f"lambda-{lam}", instruct, "bfloat16")


def test_dequantize_keeps_the_config_key_for_key(pairs, tmp_path):
    from mergekit_timber.integration.quantized import dequantize_checkpoint
    from pairs.quantized_pairs import write_block_fp8

    _, instruct = pairs["qwen3", "transformers4"]
    fp8 = write_block_fp8(instruct, tmp_path / "fp8")
    dequantize_checkpoint(fp8, tmp_path / "plain", "float32")
    got, want = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "plain", instruct))
    assert got.pop("torch_dtype") == "float32" and want.pop("torch_dtype") == "bfloat16" and got == want


# ----------------------------------------------------------------- the check before publishing

PATCHES = ("run_merge", "_model_out_config", "_get_donor_model", "TensorWriter.save_tensor")


@pytest.mark.parametrize("patch", PATCHES)
def test_a_merge_without_one_patch_stops_and_publishes_nothing(pairs, tmp_path, monkeypatch, patch):
    """As if a mergekit release called the patched function another way: the seam's
    wrapper is not reached. The merge must stop with one line, before any Base file lands."""
    import mergekit.merge
    from mergekit.io.tensor_writer import TensorWriter

    from mergekit_timber.integration import hub_layout
    from mergekit_timber.errors import TimberError

    base, instruct = pairs["qwen3_moe", "transformers4"]  # per-expert on disk: names are converted
    if patch == "TensorWriter.save_tensor":
        hub_layout.install()
        monkeypatch.setattr(TensorWriter, "save_tensor", TensorWriter.save_tensor.__wrapped__)
    else:
        monkeypatch.setattr(mergekit.merge, patch, guard.lookup(f"mergekit.merge.{patch}"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TimberError) as caught:
        merge_here(timber(base, instruct), out)
    line = str(caught.value)
    assert "\n" not in line
    expected = {
        "run_merge": "run_merge was called without mergekit-timber's seam",
        "_model_out_config": "config.json: mergekit wrote",
        "_get_donor_model": "tokenizer_config.json: is not a copy of the Instruct model's",
        "TensorWriter.save_tensor": "mlp.experts.down_proj: in the merged model but not stored by the Instruct",
    }[patch]
    assert expected in line, line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing published, no staging left


def test_each_staged_file_is_checked(pairs, tmp_path):
    """dropin.verify on a staged output altered one file at a time."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions

    from mergekit_timber.integration import dropin
    from mergekit_timber.errors import TimberOutputError

    base, instruct = pairs["qwen3", "transformers4"]
    merge_here(timber(base, instruct), tmp_path / "good")
    config, options = MergeConfiguration.model_validate(timber(base, instruct)), MergeOptions()
    shapes = dropin.written_shapes(tmp_path / "good")
    dropin.verify(tmp_path / "good", instruct, config, options, shapes)  # the real output passes

    def altered(name, change):
        stage = tmp_path / name.replace("/", "_")
        shutil.copytree(tmp_path / "good", stage)
        change(stage)
        with pytest.raises(TimberOutputError) as caught:
            dropin.verify(stage, instruct, config, options, dropin.written_shapes(stage))
        return str(caught.value)

    def rope(stage):
        data = json.loads((stage / "config.json").read_text())
        data["rope_theta"] = 10000.0
        (stage / "config.json").write_text(json.dumps(data))

    assert "config.json: key rope_theta is 10000.0, not 1000000.0" in altered("rope", rope)
    assert "generation_config.json: is not a copy" in altered(
        "gen", lambda s: shutil.copyfile(base / "generation_config.json", s / "generation_config.json"))
    assert "tokenizer_config.json: is not a copy" in altered(
        "tok", lambda s: shutil.copyfile(base / "tokenizer_config.json", s / "tokenizer_config.json"))
    shapes_missing = dict(shapes)
    del shapes_missing["model.norm.weight"]
    with pytest.raises(TimberOutputError, match="model.norm.weight: missing from the merged model"):
        dropin.verify(tmp_path / "good", instruct, config, options, shapes_missing)
    wrong = dict(shapes, **{"model.norm.weight": (3,)})
    with pytest.raises(TimberOutputError, match=r"model.norm.weight: shape \[3\] where \[64\] is stored"):
        dropin.verify(tmp_path / "good", instruct, config, options, wrong)
