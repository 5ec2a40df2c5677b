"""A Timber output is the Instruct model with refined weights: its config, generation
config, tokenizer and chat template, through every entry point; other merges untouched."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_dir, run_cli, write_yaml
from pairs.synthetic import write_pair

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # Base and Instruct differ in eos ids, context length, generation config and chat template.
    return write_pair(tmp_path_factory.mktemp("dropin") / "qwen3", arch="qwen3", layers=1, seed=3, distinct_files=True)


def timber_config(base, instruct, **extra):
    return {"merge_method": "timber", "base_model": str(base), "models": [{"model": str(instruct)}], **extra}


def assert_dropin(out: Path, instruct: Path, dtype: str = "bfloat16") -> None:
    """`out` reads, in transformers, as the Instruct model (config, generation, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    got, want = AutoConfig.from_pretrained(out).to_dict(), AutoConfig.from_pretrained(instruct).to_dict()
    assert str(got.pop("dtype")).removeprefix("torch.") == dtype
    for read in (got, want):
        read.pop("_name_or_path")  # where it was read from
    want.pop("dtype")
    assert got == want
    assert GenerationConfig.from_pretrained(out).to_dict() == GenerationConfig.from_pretrained(instruct).to_dict()
    for name in TOKENIZER_FILES + ("generation_config.json",):
        assert filecmp.cmp(out / name, instruct / name, shallow=False), name
    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(instruct)
    assert tok.chat_template == ref.chat_template and tok.chat_template
    assert tok.eos_token == ref.eos_token == "<|im_end|>" and tok.get_vocab() == ref.get_vocab()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    eos = json.loads((instruct / "generation_config.json").read_text())["eos_token_id"]
    assert model.generation_config.eos_token_id == eos == [3, 1]
    card = (out / "README.md").read_text()
    assert f"| `config.json` | {instruct} (the Instruct model)" in card
    assert f"| tokenizer files | {instruct} (the Instruct model)" in card


def test_mergekit_yaml(pair, tmp_path):
    base, instruct = pair
    config = timber_config(base, instruct, dtype="bfloat16", out_dtype="float32")
    out = tmp_path / "out"
    run_cli("mergekit-yaml", write_yaml(tmp_path / "t.yml", config), out)
    assert_dropin(out, instruct, dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.yml"]  # no staging left


def test_mergekit_multi_step(pair, tmp_path):
    base, instruct = pair
    doc = dict(name="refined", **timber_config(base, instruct, parameters={"lambda": 0.5}))
    run_cli("mergekit-multi", write_yaml(tmp_path / "m.yml", doc), "--intermediate-dir", tmp_path / "work")
    assert_dropin(tmp_path / "work" / "refined", instruct)


def test_python_api_run_merge(pair, tmp_path):
    base, instruct = pair
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    assert getattr(run_merge, "_timber_seam", False)  # the .pth hook loaded the seam
    run_merge(MergeConfiguration.model_validate(timber_config(base, instruct)), str(tmp_path / "api"), options=MergeOptions(quiet=True))
    assert_dropin(tmp_path / "api", instruct)


def test_every_sweep_output(pair, tmp_path):
    base, instruct = pair
    cfg = write_yaml(tmp_path / "s.yml", timber_config(base, instruct))
    run_cli("mergekit-timber", "sweep", cfg, tmp_path / "sweep", "--lambdas", "0,0.5")
    for lam in ("0", "0.5"):
        assert_dropin(tmp_path / "sweep" / f"lambda-{lam}", instruct)


def _in_process(config, out, original=False):
    """The merge through the seam, or (`original`) by mergekit alone: the patches undone."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergekit_timber.integration import patches

    if original:
        patches.undo()
    try:
        merge = __import__("mergekit.merge").merge.run_merge  # mergekit's own while undone
        merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(quiet=True))
    finally:
        if original:
            patches.install()
    assert getattr(run_merge, "_timber_seam", False)
    return load_dir(out)


@pytest.mark.parametrize("tokenizer", [None, "instruct", "base"])
def test_weights_and_vocabulary_are_mergekit_s(pair, tmp_path, tokenizer):
    """The seam changes files around the weights, never a tensor (with or without a tokenizer step)."""
    base, instruct = pair
    extra = {} if tokenizer is None else {"tokenizer": {"source": str(instruct) if tokenizer == "instruct" else "base"}}
    config = timber_config(base, instruct, **extra)
    got, want = _in_process(config, tmp_path / "seam"), _in_process(config, tmp_path / "plain", original=True)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    if tokenizer == "base":  # an explicit tokenizer step still wins; config stays the Instruct's
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "seam")
        assert tok.eos_token == "<|endoftext|>" and not tok.chat_template
        assert AutoConfig.from_pretrained(tmp_path / "seam").max_position_embeddings == 8192
        assert (tmp_path / "seam" / "generation_config.json").read_text() == (instruct / "generation_config.json").read_text()
        assert f"| tokenizer files | {base} (the recipe's tokenizer step)" in (tmp_path / "seam" / "README.md").read_text()


def test_explicit_chat_template_wins(pair, tmp_path):
    base, instruct = pair
    from transformers import AutoTokenizer

    _in_process(timber_config(base, instruct, chat_template="chatml"), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert "<|im_start|>" in tok.chat_template and tok.chat_template != AutoTokenizer.from_pretrained(instruct).chat_template
    assert tok.eos_token == "<|im_end|>"  # the Instruct tokenizer, re-saved with the recipe's template


def test_tagalong_files_come_from_the_instruct_model(pair, tmp_path):
    """mergekit's tagalong copy (e.g. preprocessor_config.json of VL models) reads the donor the seam picks."""
    base, instruct = pair
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, _copy_tagalong_files

    models = tmp_path / "models"
    shutil.copytree(base.parent, models)
    for role in ("base", "instruct"):
        (models / role / "preprocessor_config.json").write_text(json.dumps({"from": role}))
    timber = timber_config(models / "base", models / "instruct")
    linear = {"merge_method": "linear", "base_model": str(models / "base"), "models": timber["models"], "parameters": {"weight": 1.0}}
    for config, donor in ((timber, "instruct"), (linear, "base")):
        out = tmp_path / donor
        out.mkdir()
        _copy_tagalong_files(MergeConfiguration.model_validate(config), str(out), ["preprocessor_config.json"], MergeOptions())
        assert json.loads((out / "preprocessor_config.json").read_text()) == {"from": donor}


# ------------------------------------------------------------------ other merges untouched

NO_HOOK = {"MERGEKIT_TIMBER_NO_HOOK": "1"}


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_other_methods_write_byte_identical_files(pair, tmp_path, method):
    base, instruct = pair
    params = {"weight": 0.5} if method == "linear" else {"weight": 0.7, "density": 0.6}
    config = {"merge_method": method, "base_model": str(base), "models": [{"model": str(instruct), "parameters": params}]}
    if method == "linear":
        config["models"].append({"model": str(base), "parameters": {"weight": 0.5}})
    cfg = write_yaml(tmp_path / "c.yml", config)
    outs = {}
    for label, env in (("with", {}), ("without", NO_HOOK)):
        outs[label] = tmp_path / label / "out"  # same basename: the card names it
        run_cli("mergekit-yaml", cfg, outs[label], env=dict(env, PYTHONHASHSEED="0"))
    names = sorted(p.name for p in outs["with"].iterdir())
    assert names == sorted(p.name for p in outs["without"].iterdir())
    assert "tokenizer.json" in names and "model.safetensors" in names
    match, mismatch, errors = filecmp.cmpfiles(outs["with"], outs["without"], names, shallow=False)
    assert not mismatch and not errors, mismatch


def _python(code, env=None):
    full = dict(os.environ)
    full.pop("MERGEKIT_TIMBER_NO_HOOK", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_no_hook_really_excludes_the_seam():
    code = (
        "import sys, mergekit.merge as m, mergekit.scripts.run_yaml as r\n"
        "seam = lambda f: getattr(f, '_timber_seam', False)\n"
        "print('mergekit_timber.integration.patches' in sys.modules, seam(m.run_merge), seam(r.run_merge), "
        "seam(m._get_donor_model), seam(m._model_out_config), sys.excepthook is sys.__excepthook__)"
    )
    assert _python(code, NO_HOOK).stdout.split() == ["False"] * 5 + ["True"]
    # With the hook: the seam is in place before run_yaml binds run_merge; the excepthook
    # is left alone in a process that is not one of the CLIs.
    assert _python(code).stdout.split() == ["True"] * 6


# ------------------------------------------------------------------ another mergekit
#
# The real mergekit-yaml in a subprocess, against a mergekit that differs from the one
# installed: its metadata says 0.1.6 (a dist-info first on PYTHONPATH, as after
# `pip install -U mergekit` with the same code), or a copy of the package in which a
# function the seam relies on was renamed (a mergekit refactor). Non-Timber merges must
# be byte for byte mergekit's own; a Timber merge must be right or stop with one line.

MERGEKIT = Path(__import__("mergekit").__file__).parent


def fake_version(site: Path, version: str) -> None:
    info = site / f"mergekit-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mergekit\nVersion: {version}\n")


def renamed_copy(site: Path, old: str, new: str) -> None:
    """A copy of the installed mergekit in which mergekit.merge's `old` is called `new`."""
    shutil.copytree(MERGEKIT, site / "mergekit", ignore=shutil.ignore_patterns("__pycache__"))
    merge = site / "mergekit" / "merge.py"
    text = merge.read_text()
    assert f"def {old}(" in text
    merge.write_text(text.replace(old, new))


def linear_config(base, instruct):
    return {"merge_method": "linear", "base_model": str(base), "parameters": {"weight": 0.5},
            "models": [{"model": str(base)}, {"model": str(instruct)}]}


def merge_with(site, config, out, env=None):
    """mergekit-yaml with `site` first on PYTHONPATH (None: the mergekit installed)."""
    path = os.pathsep.join(p for p in (str(site) if site else "", os.environ.get("PYTHONPATH", "")) if p)
    cfg = write_yaml(out.parent / f"{out.parent.name}.yml", config)
    return run_cli("mergekit-yaml", cfg, out, check=False, env=dict(env or {}, PYTHONPATH=path, PYTHONHASHSEED="0"))


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors" in names
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, mismatch


@pytest.fixture(scope="module")
def references(pair, tmp_path_factory):
    """Outputs on the mergekit installed: linear without the plugin, timber with it."""
    base, instruct = pair
    root = tmp_path_factory.mktemp("references")
    outs = {"linear": root / "linear" / "out", "timber": root / "timber" / "out"}
    for method, env in (("linear", NO_HOOK), ("timber", {})):
        outs[method].parent.mkdir()
        config = linear_config(base, instruct) if method == "linear" else timber_config(base, instruct)
        proc = merge_with(None, config, outs[method], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return outs


@pytest.mark.parametrize("mergekit", ["reports 0.1.6", "renamed _get_donor_model"])
def test_another_mergekit_never_breaks_a_merge(pair, references, tmp_path, mergekit):
    base, instruct = pair
    site = tmp_path / "site"
    fake_version(site, "0.1.6")
    if mergekit.startswith("renamed"):
        name = mergekit.split()[1]
        renamed_copy(site, name, name.replace("_", "_mk_", 1))
    for method in ("linear", "timber"):
        (tmp_path / method).mkdir()
        config = linear_config(base, instruct) if method == "linear" else timber_config(base, instruct)
        out = tmp_path / method / "out"  # same basename as the reference: the card names it
        proc = merge_with(site, config, out)
        if method == "linear" or mergekit == "reports 0.1.6":
            # Every relied-on function is there: linear is mergekit's, Timber runs (with one notice).
            assert proc.returncode == 0, proc.stderr[-3000:]
            same_files(out, references[method])
            notices = proc.stderr.count("is not a version mergekit-timber was verified with")
            assert notices == (1 if method == "timber" and mergekit == "reports 0.1.6" else 0), proc.stderr[-3000:]
            if method == "linear":
                assert "mergekit-timber" not in proc.stderr, proc.stderr[-3000:]
        else:
            assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith("mergekit-timber: error: timber merges cannot run with this mergekit (0.1.6): "), last
            assert f"mergekit.merge.{name} is missing" in last and "pip install mergekit==0.1.5" in last, last
            assert not out.exists()


def test_a_broken_seam_leaves_mergekit_alone_and_refuses_timber(pair, tmp_path):
    """Our own failure at install (here: the seam module cannot be imported) is a refusal too."""
    base, instruct = pair
    code = (
        "import sys\n"
        "sys.modules['mergekit_timber.integration.seam'] = None  # importing it now raises ImportError\n"
        "import mergekit.merge as m\n"
        "from mergekit_timber.integration import guard\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.options import MergeOptions\n"
        f"config = MergeConfiguration.model_validate({timber_config(base, instruct)!r})\n"
        "try:\n"
        f"    m.run_merge(config, {str(tmp_path / 'out')!r}, options=MergeOptions(quiet=True))\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
        "print(m._get_donor_model.__module__, m._model_out_config.__module__)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()
    assert first.startswith("TimberError timber merges cannot run with this mergekit") and "installing the seam failed" in first
    assert second == "mergekit.merge mergekit.merge"  # mergekit's own functions, not replaced
    assert not (tmp_path / "out").exists()
