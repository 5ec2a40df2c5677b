"""`mergekit-timber sweep`: one pass, one output per lambda, each equal to a single run."""

import pytest
import torch
import yaml

from helpers import load_dir, run_cli, write_yaml
from pairs.synthetic import write_pair


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_sweep_outputs_equal_single_runs(tmp_path, arch):
    base, instruct = write_pair(tmp_path / "pair", arch=arch, layers=2, seed=2)
    config = {
        "merge_method": "timber",
        "base_model": str(base),
        # A per-module lambda in the source config: the sweep replaces it.
        "models": [{"model": str(instruct), "parameters": {"lambda": [{"filter": "mlp", "value": 0.9}, {"value": 0.3}]}}],
    }
    cfg = write_yaml(tmp_path / "sweep.yml", config)
    out = tmp_path / "sweep"
    proc = run_cli("mergekit-timber", "sweep", cfg, out, "--lambdas", "0,0.2,0.5,1")
    assert "lambda=0.5" in proc.stdout
    instruct_tensors = load_dir(instruct)
    for lam in ("0", "0.2", "0.5", "1"):
        swept = out / f"lambda-{lam}"
        recipe = swept / "mergekit_config.yml"
        parsed = yaml.safe_load(recipe.read_text())
        assert parsed["parameters"]["lambda"] == float(lam)
        assert "parameters" not in parsed["models"][0]
        card = (swept / "README.md").read_text()
        assert f"lambda: {float(lam)}" in card and "mergekit-timber" in card
        assert (swept / "config.json").exists() and (swept / "tokenizer.json").exists()
        # The recipe reproduces the output alone, tensor for tensor.
        single = tmp_path / f"single-{lam}"
        run_cli("mergekit-yaml", recipe, single)
        got, want = load_dir(swept), load_dir(single)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (lam, name)
        if lam == "1":
            for name, t in instruct_tensors.items():
                if name in got:
                    assert torch.equal(got[name], t), name


def test_sweep_rejects_bad_input(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="llama", layers=1, seed=2)
    cfg = write_yaml(tmp_path / "l.yml", {"merge_method": "timber_l", "base_model": str(base), "models": [{"model": str(instruct)}]})
    proc = run_cli("mergekit-timber", "sweep", cfg, tmp_path / "o", check=False)
    assert proc.returncode != 0 and "sweep needs merge_method: timber (got 'timber_l')" in proc.stderr
    cfg = write_yaml(tmp_path / "t.yml", {"merge_method": "timber", "base_model": str(base), "models": [{"model": str(instruct)}]})
    proc = run_cli("mergekit-timber", "sweep", cfg, tmp_path / "o", "--lambdas", "0.2,1.4", check=False)
    assert proc.returncode != 0 and "lambda must lie in [0, 1]; got 1.4" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_sweep_method_is_its_own_and_leaves_timber_stateless():
    from mergekit import merge_methods
    from mergekit_timber.tools.sweep import _sweep_method

    saved = []
    with _sweep_method([0.5, 0.8], lambda name, outs: saved.append(name)) as name:
        method = merge_methods.get(name)
        assert method.extra_lambdas == (0.5, 0.8) and method.sink is not None
        assert method.label == "timber" and name != "timber"
        timber = merge_methods.get("timber")
        assert timber.extra_lambdas == () and timber.sink is None
    assert name not in {m.spec.name for m in merge_methods.registered_methods()}
