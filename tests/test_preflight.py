"""Preflight: every bad input to a Timber merge stops before the first tensor with one line.

Each case runs the real `mergekit-yaml` and asserts a non-zero exit, a last stderr
line that names the culprit (no traceback), and an output directory that holds no
model. One process per case costs a few seconds of imports, so only the cases that
differ in how they reach preflight run through the CLI; the value checks of filters
and gradients are also exercised in-process through `preflight.check_document`.
"""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import run_cli, write_yaml
from pairs.synthetic import write_pair

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pre") / "llama", arch="llama", layers=1, seed=4)


def copy_model(src, dst, edit=None, config=None):
    """A copy of model directory `src`; `edit(weights)` changes its tensors in place."""
    shutil.copytree(src, dst)
    if edit is not None:
        weights = load_file(str(dst / "model.safetensors"))
        edit(weights)
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(dict(cfg, **config)))
    return dst


def cfg(base, instruct, **params):
    c = {"merge_method": "timber", "base_model": str(base), "models": [{"model": str(instruct)}]}
    if params:
        c["parameters"] = params
    return c


def fail(tmp_path, config, *culprits, cwd=None):
    """Run mergekit-yaml on `config`; return the single error line, checked.

    A failed Timber merge leaves no output directory at all, whether it stopped in
    preflight or mid-merge (the staged directory is discarded).
    """
    path = write_yaml(tmp_path / "bad.yml", config)
    out = tmp_path / "out"
    proc = run_cli("mergekit-yaml", path, out, check=False, cwd=cwd)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mergekit-timber: error: "), proc.stderr[-4000:]
    for culprit in culprits:
        assert culprit in last, last
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not [p.name for p in tmp_path.iterdir() if "timber-staging" in p.name], "staging left behind"
    return last


def refuse(config, *culprits, source=True):
    """preflight.check in-process (cheap): the one-line error it raises, checked."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_timber.integration import preflight
    from mergekit_timber.errors import TimberError

    text = yaml.safe_dump(config) if source else None
    with pytest.raises(TimberError) as caught:
        preflight.check(MergeConfiguration.model_validate(config), MergeOptions(), source=text)
    line = str(caught.value)
    assert "\n" not in line
    for culprit in culprits:
        assert culprit in line, line
    return line


# --------------------------------------------------------------------------- parameters


def with_param(pair, where, key, value):
    base, instruct = pair
    c = cfg(base, instruct)
    if where == "global":
        c["parameters"] = {key: value}
    elif where == "instruct":
        c["models"][0]["parameters"] = {key: value}
    elif where == "base":
        c["models"].insert(0, {"model": str(base), "parameters": {key: value}})
    elif where == "top":
        c[key] = value
    elif where == "filter":
        c["parameters"] = {"lambda": [{"filter": "mlp", "value": 0.3, key: value}, {"value": 0.2}]}
    return c


@pytest.mark.parametrize(
    "where,key,value,culprits",
    [
        ("global", "lamda", 0.5, ["unknown parameter 'lamda' in parameters", "did you mean 'lambda'?"]),
        ("instruct", "lamdba", 0.5, ["unknown parameter 'lamdba' in models[0]", "did you mean 'lambda'?"]),
        ("global", "refine_embedding", False, ["'refine_embedding'", "did you mean 'refine_embeddings'?"]),
        ("top", "paramaters", {"lambda": 0.5}, ["unknown key 'paramaters' at the top level", "did you mean 'parameters'?"]),
        ("base", "lambda", 0.5, ["parameter lambda under the base model's entry", "is never read"]),
        ("global", "lambda", True, ["parameter lambda must be a number; got True"]),
        ("global", "lambda", "abc", ["parameter lambda must be a number; got 'abc'"]),
        ("global", "lambda", None, ["parameter lambda has no value (null) in parameters"]),
    ],
)
def test_bad_parameter_stops_the_merge(pair, tmp_path, where, key, value, culprits):
    fail(tmp_path, with_param(pair, where, key, value), *culprits)


@pytest.mark.parametrize(
    "where,key,value,culprits",
    [
        ("instruct", "refine_embeddings", 1, ["parameter refine_embeddings must be true or false; got 1"]),
        ("filter", "vaule", 0.3, ["unknown key 'vaule' in the lambda filter entry", "did you mean 'value'?"]),
        ("top", "paramaters", {"lambda": 0.5}, ["unknown key 'paramaters' at the top level"]),
    ],
)
def test_bad_parameter_in_process(pair, where, key, value, culprits):
    refuse(with_param(pair, where, key, value), *culprits)


def test_python_api_path_is_checked_too(pair, tmp_path):
    """run_merge(config) without the YAML text: keys that survive in the model are checked."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_timber.errors import TimberConfigError

    config = MergeConfiguration.model_validate(with_param(pair, "instruct", "lamda", 0.5))
    with pytest.raises(TimberConfigError, match="unknown parameter 'lamda'.*did you mean 'lambda'"):
        run_merge(config, str(tmp_path / "out"), options=MergeOptions())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setting,message",
    [
        ([{"filter": "mlp", "value": True}, {"value": 0.2}], "parameter lambda must be a number; got True"),
        ([0.1, "x"], "parameter lambda must be a number; got 'x'"),
        ([{"filter": "mlp"}], "a filter entry in parameters has no value"),
        ([0.1, [0.2]], "[0.1, [0.2]] is not a setting mergekit reads"),
        ([{"filter": 3, "value": 0.2}], "is not a setting mergekit reads"),
        ([{"filter": "mlp", "value": None}], "parameter lambda has no value (null) in a filter entry"),
        (1.5, "lambda must lie in [0, 1]; got 1.5"),
    ],
)
def test_values_in_filters_and_gradients(pair, setting, message):
    from mergekit_timber.errors import TimberConfigError
    from mergekit_timber.integration.preflight import check_document

    with pytest.raises(TimberConfigError) as caught:
        check_document(cfg(*pair, **{"lambda": setting}))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_valid_settings_pass(pair):
    from mergekit_timber.integration.preflight import check_document

    check_document(cfg(*pair, **{"lambda": [{"filter": "mlp", "value": [0.1, "1e-1"]}, {"value": 0}]}))
    check_document(cfg(*pair, refine_embeddings=[True, False], rank_ratio=0.5))
    check_document(dict(cfg(*pair), merge_method="timber_l"))
    check_document(dict(cfg(*pair), name="step1"))  # a mergekit-multi document
    check_document(dict(cfg(*pair, **{"lamda": 1}), merge_method="linear"))  # not ours


@pytest.mark.parametrize("place", ["both global", "both on the instruct", "split", "catch-all filter"])
def test_rank_ratio_with_energy_stops_in_preflight(pair, place):
    """The cutoff rule the method applies per tensor (parameters.check_cutoffs), asked
    before the merge whenever both reach every tensor."""
    from mergekit_timber.errors import TimberConfigError
    from mergekit_timber.integration.preflight import check_document

    if place == "both global":
        doc = cfg(*pair, rank_ratio=0.9, energy=0.98)
    elif place == "both on the instruct":
        doc = cfg(*pair)
        doc["models"][0]["parameters"] = {"rank_ratio": 0.9, "energy": 0.98}
    elif place == "split":
        doc = cfg(*pair, rank_ratio=0.9)
        doc["models"][0]["parameters"] = {"energy": 0.98}
    else:
        doc = cfg(*pair, rank_ratio=0.9, energy=[{"filter": "mlp", "value": 0.5}, {"value": 0.98}])
    with pytest.raises(TimberConfigError, match=r"^timber: .*rank_ratio=0.9 and energy=.* are both set; choose one cutoff rule"):
        check_document(doc)


def test_rank_ratio_and_energy_on_different_tensors_pass(pair):
    from mergekit_timber.integration.preflight import check_document

    check_document(cfg(*pair, rank_ratio=[{"filter": "mlp", "value": 0.5}], energy=[{"filter": "self_attn", "value": 0.9}]))


def test_timber_l_names_lambda_even_when_it_is_not_a_number(pair):
    refuse(dict(cfg(*pair, **{"lambda": "abc"}), merge_method="timber_l"), "timber_l: parameter lambda is not accepted")


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("ref", ["/nonexistent/instruct", "./sub/nope"])
def test_missing_local_path_is_named_as_a_path(pair, tmp_path, ref):
    (tmp_path / "sub").mkdir()
    line = fail(tmp_path, cfg(pair[0], ref), f"instruct model {ref!r}: no such directory", cwd=tmp_path)
    assert "Hub" not in line and "repo" not in line


def test_missing_dot_path_in_process(pair):
    refuse(cfg(pair[0], "./nope"), "instruct model './nope': no such directory")


def test_hub_id_offline_is_one_line(pair, tmp_path):
    fail(tmp_path, cfg(pair[0], "someorg/no-such-model"), "'someorg/no-such-model' is not a local directory", "Hub")


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_unreadable_safetensors_names_file_and_model(pair, tmp_path, damage):
    bad = copy_model(pair[1], tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64 + data[64:])
    fail(tmp_path, cfg(pair[0], bad), f"instruct model {bad}: model.safetensors is not a readable safetensors file")


# --------------------------------------------------------------------------- the pair


def test_shape_mismatch_says_which_model_has_which(pair, tmp_path):
    wider = write_pair(tmp_path / "wide", arch="llama", layers=1, seed=4, intermediate=96)[1]
    fail(
        tmp_path,
        cfg(pair[0], wider),
        "model.layers.0.mlp.down_proj.weight: shape (64, 128) in the base model",
        f"but (64, 96) in the instruct model ({wider})",
    )


def test_missing_tensor_is_named(pair, tmp_path):
    bad = copy_model(pair[1], tmp_path / "lacking", edit=lambda w: w.pop(Q))
    fail(tmp_path, cfg(pair[0], bad), f"{Q}: tensor present in the base model", f"missing from the instruct model ({bad})")


@pytest.mark.parametrize("tied_side", ["instruct", "base"])
def test_tied_and_untied_lm_head_do_not_mix(pair, tmp_path, tied_side):
    def untie(weights):
        weights.pop("lm_head.weight")

    tied = copy_model(pair[1 if tied_side == "instruct" else 0], tmp_path / "tied", edit=untie,
                      config={"tie_word_embeddings": True})  # fmt: skip
    base, instruct = (pair[0], tied) if tied_side == "instruct" else (tied, pair[1])
    untied_side = "base" if tied_side == "instruct" else "instruct"
    check = fail if tied_side == "instruct" else (lambda _tmp, *a: refuse(*a))  # one CLI run
    check(
        tmp_path,
        cfg(base, instruct),
        f"lm_head.weight: the {untied_side} model",
        f"has its own lm_head.weight but the {tied_side} model",
        "ties it to model.embed_tokens.weight",
    )


# --------------------------------------------------------------------------- output


def test_output_that_overflows_its_dtype_names_the_tensor(pair, tmp_path):
    """bfloat16 inputs hold 1e5 fine; the float16 output they ask for cannot."""

    def scale(weights):
        weights[Q] = weights[Q] * 1e7

    base = copy_model(pair[0], tmp_path / "b", edit=scale)
    instruct = copy_model(pair[1], tmp_path / "i", edit=scale)
    c = dict(cfg(base, instruct), out_dtype="float16")
    fail(tmp_path, c, f"{Q}: the merged tensor holds", "in float16, the output dtype", "use a wider dtype")


def test_sweep_output_that_overflows_its_dtype_names_the_tensor_and_lambda(pair, tmp_path):
    """The sweep checks the outputs it writes itself (lambdas after the first) as it writes them."""

    def scale(weights):
        weights[Q] = weights[Q] * 1e7

    base = copy_model(pair[0], tmp_path / "b", edit=scale)
    instruct = copy_model(pair[1], tmp_path / "i", edit=scale)
    path = write_yaml(tmp_path / "sweep.yml", dict(cfg(base, instruct), out_dtype="float16"))
    proc = run_cli("mergekit-timber", "sweep", path, tmp_path / "sw", "--lambdas", "0.2,0.5", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{Q}: the merged tensor for lambda=0.5 holds" in last and "in float16, the output dtype" in last, last
    assert not (tmp_path / "sw").exists() or not any((tmp_path / "sw").iterdir())


def test_sweep_names_distinct_lambdas_apart():
    from mergekit_timber.errors import TimberConfigError
    from mergekit_timber.tools.sweep import output_name, parse_lambdas

    lams = parse_lambdas("0.2,0.2000001,0,1")
    assert [output_name(x) for x in lams] == ["lambda-0.2", "lambda-0.2000001", "lambda-0", "lambda-1"]
    with pytest.raises(TimberConfigError, match="repeated"):
        parse_lambdas("0.2,0.20")


# --------------------------------------------------------------------------- valid recipes merge
#
# Recipes mergekit merges must merge with Timber too. Each runs mergekit's run_merge (the
# seam in place, as mergekit-yaml runs it) and its output is compared, tensor for tensor,
# with the same pair merged by the plain recipe.


def merge(config, out, *, source=True):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from helpers import load_dir

    text = yaml.safe_dump(config) if source else None
    run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(quiet=True), config_source=text)
    return load_dir(out)


def same_tensors(got, want, names=None):
    names = sorted(want) if names is None else names
    assert set(names) <= set(got), sorted(set(names) - set(got))
    for name in names:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    return merge(cfg(*pair), tmp_path_factory.mktemp("reference") / "out")


def test_other_methods_parameters_are_ignored_with_a_warning(pair, reference, tmp_path, caplog):
    """mergekit resolves only a method's own parameters: weight & co. do not change a Timber merge."""
    base, instruct = pair
    config = cfg(base, instruct, normalize=True, int8_mask=True, **{"lambda": 0.2})
    config["models"][0]["parameters"] = {"weight": 1.0, "density": 0.5}
    with caplog.at_level("WARNING", logger="mergekit_timber.integration.preflight"):
        got = merge(config, tmp_path / "out")
    same_tensors(got, reference)
    warned = [r.getMessage() for r in caplog.records if "timber ignores it" in r.getMessage()]
    assert len(warned) == 4, warned  # one per parameter, naming where and whose it is
    assert any("'weight' (in models[0]" in w and "a parameter of" in w and "linear" in w for w in warned), warned


def test_other_methods_parameter_through_mergekit_yaml(pair, tmp_path):
    base, instruct = pair
    path = write_yaml(tmp_path / "c.yml", cfg(base, instruct, density=0.5))
    proc = run_cli("mergekit-yaml", path, tmp_path / "out")
    assert "parameter 'density' (in parameters) is a parameter of" in proc.stderr and "timber ignores it" in proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("key,closest", [("wieght", "weight"), ("lamda", "lambda"), ("desnity", "density")])
def test_a_name_no_method_knows_is_still_an_error(pair, key, closest):
    refuse(cfg(*pair, **{key: 0.5}), f"unknown parameter {key!r}", f"did you mean {closest!r}?",
           "no merge method has a parameter of that name")


def test_tensor_the_merge_never_reads_may_differ(pair, reference, tmp_path):
    extra = copy_model(pair[1], tmp_path / "extra", edit=lambda w: w.update({"model.unused_buffer": torch.ones(3)}))
    same_tensors(merge(cfg(pair[0], extra), tmp_path / "out"), reference)


def test_mixed_dtypes_warn_and_merge_as_mergekit_aligns_them(pair, tmp_path, caplog):
    def to_half(weights):
        for name in weights:
            weights[name] = weights[name].to(torch.float16)

    half = copy_model(pair[1], tmp_path / "half", edit=to_half)
    with caplog.at_level("WARNING", logger="mergekit_timber.integration.preflight"):
        got = merge(cfg(pair[0], half), tmp_path / "out")
    line = " ".join(r.getMessage() for r in caplog.records)
    assert "dtype BF16 in the base model" in line and "F16 in the instruct model" in line
    assert "mergekit promotes both to float32" in line and "set dtype:" in line
    # mergekit promotes bf16 + f16 to float32: the same as asking for float32 inputs.
    same_tensors(got, merge(dict(cfg(pair[0], half), dtype="float32"), tmp_path / "f32"))
    assert got[Q].dtype == torch.float32


def test_slices_with_their_own_base_model(pair, reference, tmp_path):
    base, instruct = pair
    sources = [{"model": str(m), "layer_range": [0, 1]} for m in (base, instruct)]
    config = {"merge_method": "timber", "slices": [{"sources": sources, "base_model": str(base)}]}
    got = merge(config, tmp_path / "out")
    same_tensors(got, reference)
    assert set(got) == set(reference)
    from helpers import config_of

    assert config_of(tmp_path / "out")["eos_token_id"] == config_of(instruct)["eos_token_id"]  # the drop-in


def test_slices_with_different_base_models_stop(pair, tmp_path):
    other = copy_model(pair[0], tmp_path / "other")
    base, instruct = pair
    slices = [
        {"sources": [{"model": str(b), "layer_range": [0, 1]}, {"model": str(instruct), "layer_range": [0, 1]}],
         "base_model": str(b)}
        for b in (base, other)
    ]
    refuse({"merge_method": "timber", "slices": slices}, "the slices name different base models")


# --------------------------------------------------------------------------- ties as transformers reads them


def write_gemma2_pair(root):
    """A tiny Gemma-2 pair (transformers ties its embeddings by default), no tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = Gemma2ForCausalLM(config).to(torch.bfloat16)
    dirs = []
    for role, noise in (("base", 0.0), ("instruct", 0.02)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        model.save_pretrained(root / role)
        dirs.append(root / role)
    return dirs


def test_redundant_lm_head_with_tie_default_merges(tmp_path):
    """The Base stores lm_head as well, its config leaves tie_word_embeddings out: transformers
    ties it (Gemma-2's default), as in the Instruct, so the pair is consistent."""
    base, instruct = write_gemma2_pair(tmp_path / "pair")
    reference = merge(cfg(base, instruct), tmp_path / "reference")
    redundant = copy_model(
        base, tmp_path / "redundant",
        edit=lambda w: w.update({"lm_head.weight": w["model.embed_tokens.weight"].clone()}),
    )
    for model in (redundant, instruct):
        config = json.loads((model / "config.json").read_text())
        config.pop("tie_word_embeddings", None)
        (model / "config.json").write_text(json.dumps(config))
    got = merge(cfg(redundant, instruct), tmp_path / "out")
    same_tensors(got, reference)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "config,tied",
    [
        ({"model_type": "llama"}, False),  # LlamaConfig's default
        ({"model_type": "gemma2"}, True),  # Gemma2Config's default
        ({"model_type": "llama", "tie_word_embeddings": True}, True),
        ({"model_type": "qwen2_5_vl", "text_config": {"tie_word_embeddings": True}}, True),  # forwarded
        ({"model_type": "qwen2_5_vl"}, False),
    ],
)
def test_tie_is_read_as_transformers_reads_it(tmp_path, config, tied):
    from mergekit.common import ModelReference
    from mergekit.options import MergeOptions

    from mergekit_timber.integration.preflight import ties_embeddings

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ties_embeddings(ModelReference.model_validate(str(tmp_path)), MergeOptions(), config) is tied
