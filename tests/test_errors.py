"""Bad input stops the merge with one clear line and leaves no output posing as success."""

import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file, save_file

from helpers import cli, run_cli, write_yaml
from pairs.synthetic import write_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("err") / "llama", arch="llama", layers=1, seed=4)


def fail(tmp_path, config, expected):
    cfg = write_yaml(tmp_path / "bad.yml", config)
    out = tmp_path / "out"
    proc = run_cli("mergekit-yaml", cfg, out, check=False)
    assert proc.returncode != 0, proc.stdout
    assert expected in proc.stderr, proc.stderr[-3000:]
    # Not presented as a finished model: mergekit writes config and card last.
    assert not (out / "config.json").exists() and not (out / "README.md").exists()
    return proc.stderr


def one_line(stderr):
    lines = [l for l in stderr.splitlines() if l.startswith("mergekit-timber: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def cfg(base, models, **params):
    c = {"merge_method": "timber", "models": [{"model": str(m)} for m in models]}
    if base is not None:
        c["base_model"] = str(base)
    if params:
        c["parameters"] = params
    return c


def test_missing_base(pair, tmp_path):
    base, instruct = pair
    one_line(fail(tmp_path, cfg(None, [instruct]), "timber: no base model"))


def test_missing_second_model(pair, tmp_path):
    base, instruct = pair
    line = one_line(fail(tmp_path, cfg(base, [base]), "needs exactly one model besides base_model"))
    assert "got 0" in line


def test_three_models(pair, tmp_path):
    base, instruct = pair
    other = write_pair(tmp_path / "other", arch="llama", layers=1, seed=5)[1]
    line = one_line(fail(tmp_path, cfg(base, [instruct, other]), "needs exactly one model besides base_model"))
    assert "got 2" in line and str(other) in line


def test_shape_mismatch_names_tensor_and_shapes(pair, tmp_path):
    base, _ = pair
    wider = write_pair(tmp_path / "wide", arch="llama", layers=1, seed=4, intermediate=96)[1]
    line = one_line(fail(tmp_path, cfg(base, [wider]), "model.layers.0.mlp.down_proj.weight: shape (64, 128)"))
    assert f"(64, 128) in the base model ({base})" in line and f"(64, 96) in the instruct model ({wider})" in line


@pytest.mark.parametrize("which,value", [("instruct", float("nan")), ("base", float("inf"))])
def test_nan_or_inf_names_the_tensor(pair, tmp_path, which, value):
    base, instruct = pair
    victim = {"base": base, "instruct": instruct}[which]
    poisoned = tmp_path / f"poisoned-{which}"
    poisoned.mkdir()
    for f in victim.iterdir():
        (poisoned / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(poisoned / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][3, 5] = value
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    pair_dirs = {"base": (poisoned, instruct), "instruct": (base, poisoned)}[which]
    line = one_line(fail(tmp_path, cfg(pair_dirs[0], [pair_dirs[1]]), "NaN/Inf"))
    assert f"model.layers.0.self_attn.q_proj.weight: the {which} model's tensor holds 1 NaN/Inf" in line


@pytest.mark.parametrize("lam", [1.5, -0.1])
def test_lambda_out_of_range(pair, tmp_path, lam):
    base, instruct = pair
    line = one_line(fail(tmp_path, cfg(base, [instruct], **{"lambda": lam}), "lambda must lie in [0, 1]"))
    assert str(lam) in line


def test_lambda_out_of_range_under_a_filter(pair, tmp_path):
    base, instruct = pair
    lam = [{"filter": "mlp", "value": 2.0}, {"value": 0.2}]
    one_line(fail(tmp_path, cfg(base, [instruct], **{"lambda": lam}), "lambda must lie in [0, 1]; got 2.0"))


def test_timber_l_rejects_lambda(pair, tmp_path):
    base, instruct = pair
    c = cfg(base, [instruct], **{"lambda": 0.3})
    c["merge_method"] = "timber_l"
    one_line(fail(tmp_path, c, "timber_l: parameter lambda is not accepted"))


def test_timber_l_rejects_lambda_on_the_model_entry(pair, tmp_path):
    base, instruct = pair
    c = cfg(base, [instruct])
    c["merge_method"] = "timber_l"
    c["models"][0]["parameters"] = {"lambda": 0.3}
    one_line(fail(tmp_path, c, "timber_l: parameter lambda is not accepted"))


def test_conflicting_cutoffs(pair, tmp_path):
    base, instruct = pair
    line = one_line(fail(tmp_path, cfg(base, [instruct], rank_ratio=0.9, energy=0.98), "choose one cutoff rule"))
    assert "rank_ratio=0.9" in line and "energy=0.98" in line


# ------------------------------------------------------------------ user-caused, one line each (issue 27)


@pytest.mark.parametrize("role", ["base", "instruct"])
def test_model_folder_without_config_json(pair, tmp_path, role):
    base, instruct = pair
    bare = tmp_path / role
    shutil.copytree({"base": base, "instruct": instruct}[role], bare)
    (bare / "config.json").unlink()
    models = {"base": (bare, instruct), "instruct": (base, bare)}[role]
    line = one_line(fail(tmp_path, cfg(models[0], [models[1]]), "no config.json"))
    assert f"{role} model {bare}: no config.json" in line


@pytest.mark.parametrize("text,expected", [
    ("merge_method: timber\nmodels: [\n", "bad.yml: not valid YAML at line 3, column 1"),
    ("", "bad.yml: the YAML file is empty"),
    ("# only a comment\n", "bad.yml: the YAML file is empty"),
])  # fmt: skip
def test_unreadable_recipe(tmp_path, text, expected):
    one_line(fail(tmp_path, text, expected))


def test_unknown_dtype_in_a_timber_recipe_only(pair, tmp_path):
    base, instruct = pair
    line = one_line(fail(tmp_path, dict(cfg(base, [instruct]), out_dtype="float17"), "out_dtype: 'float17'"))
    assert "is not a dtype mergekit knows; did you mean 'float16'?" in line
    # Another method's recipe keeps mergekit's own answer, untouched.
    linear = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in pair],
              "out_dtype": "float17"}
    stderr = fail(tmp_path, linear, 'RuntimeError: Unimplemented dtype "float17"')
    assert "Traceback" in stderr and "mergekit-timber: error" not in stderr


def test_float16_overflow_blames_the_cast(pair, tmp_path):
    base, instruct = pair
    big = tmp_path / "big"
    shutil.copytree(base, big)
    weights = load_file(str(big / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][1, 2] = 1e6  # fine in bf16, Inf in float16
    save_file(weights, str(big / "model.safetensors"), metadata={"format": "pt"})
    line = one_line(fail(tmp_path, dict(cfg(big, [instruct]), dtype="float16"), "once cast to float16"))
    assert ("model.layers.0.self_attn.q_proj.weight: the base model's tensor is finite in its file (BF16) but holds "
            "1 Inf value(s) once cast to float16, the recipe's dtype:") in line and "use dtype: bfloat16" in line


@pytest.mark.parametrize("safe", [True, False])
def test_file_size_limit(pair, tmp_path, safe):
    base, instruct = pair
    config = write_yaml(tmp_path / "ok.yml", cfg(base, [instruct]))
    flags = "" if safe else " --no-safe-serialization"
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -f 64; exec {cli('mergekit-yaml')} {config} {tmp_path / 'out'}{flags}"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert f"writing the merged model into {tmp_path / 'out'} failed: " in line
    assert "reached this process's file-size limit of 65536 bytes (ulimit -f); raise it" in line
    if not safe:  # torch.save's own words ("unexpected pos ...") do not name the file
        assert "pytorch_model" in line
    assert not (tmp_path / "out").exists()


def test_passk_on_a_binary_file(tmp_path):
    binary = tmp_path / "records.jsonl"
    binary.write_bytes(b'{"model": "a"}\n\xff\xfe\x00garbage')
    proc = run_cli("mergekit-timber", "passk", binary, "-o", tmp_path / "passk", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{binary}: not a text file (byte 0xff at offset 15 is not UTF-8)" in proc.stderr
