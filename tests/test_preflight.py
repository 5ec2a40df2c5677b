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
from mergekit_timber.testing.synthetic import write_pair

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

    from mergekit_timber import preflight
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
        ([0.1, [0.2]], "a list holds either numbers"),
        (1.5, "lambda must lie in [0, 1]; got 1.5"),
    ],
)
def test_values_in_filters_and_gradients(pair, setting, message):
    from mergekit_timber.errors import TimberConfigError
    from mergekit_timber.preflight import check_document

    with pytest.raises(TimberConfigError) as caught:
        check_document(cfg(*pair, **{"lambda": setting}))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_valid_settings_pass(pair):
    from mergekit_timber.preflight import check_document

    check_document(cfg(*pair, **{"lambda": [{"filter": "mlp", "value": [0.1, "1e-1"]}, {"value": 0}]}))
    check_document(cfg(*pair, refine_embeddings=[True, False], rank_ratio=0.5))
    check_document(dict(cfg(*pair), merge_method="timber_l"))
    check_document(dict(cfg(*pair), name="step1"))  # a mergekit-multi document
    check_document(dict(cfg(*pair, **{"lamda": 1}), merge_method="linear"))  # not ours


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


def test_dtype_mismatch_is_named(pair, tmp_path):
    def to_half(weights):
        for name in weights:
            weights[name] = weights[name].to(torch.float16)

    half = copy_model(pair[1], tmp_path / "half", edit=to_half)
    refuse(cfg(pair[0], half), "dtype BF16 in the base model", "F16 in the instruct model", "set dtype:")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_timber import preflight

    # One dtype asked for: mergekit casts both, nothing to refuse.
    preflight.check(MergeConfiguration.model_validate(dict(cfg(pair[0], half), dtype="float32")), MergeOptions())


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
    from mergekit_timber.sweep import output_name, parse_lambdas

    lams = parse_lambdas("0.2,0.2000001,0,1")
    assert [output_name(x) for x in lams] == ["lambda-0.2", "lambda-0.2000001", "lambda-0", "lambda-1"]
    with pytest.raises(TimberConfigError, match="repeated"):
        parse_lambdas("0.2,0.20")
