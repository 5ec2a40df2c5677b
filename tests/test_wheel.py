"""The built distribution: `python -m build` gives a wheel and an sdist that pass `twine
check`; the wheel holds the product (method, integration, tools, CLI) and no test helpers,
and, installed alone into a fresh venv without matplotlib, makes `mergekit-yaml` see timber.

The fresh venv reaches the dependencies already installed here (torch, mergekit, ...)
through a .pth line naming this interpreter's site-packages, and gets only the wheel
(`--no-deps`): what is tested is the wheel and its .pth hook, not a download of torch.
"""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import base_config, load_dir, write_yaml
from pairs.synthetic import write_pair

REPO = Path(__file__).resolve().parent.parent


def run(*cmd, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (hatchling) is one of the test tools already here.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO)
    (wheel,), (sdist,) = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    return wheel, sdist


def test_wheel_and_sdist_pass_twine_check_and_carry_the_licenses(dist):
    pytest.importorskip("twine")
    wheel, sdist = dist
    proc = run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    assert proc.stdout.count("PASSED") == 2, proc.stdout
    names = zipfile.ZipFile(wheel).namelist()
    assert "mergekit_timber_hook.pth" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(n.endswith(".dist-info/licenses/COPYING") for n in names)
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: LGPL-3.0-only" in metadata
    # The product only: no tests, scripts or pair builders (scripts/pairs) in the wheel.
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "pairs/"))]
    assert not [n for n in names if n.startswith("mergekit_timber/") and ("testing" in n or "synthetic" in n or n.endswith(".txt"))], names
    packages = {n.split("/")[1] for n in names if n.startswith("mergekit_timber/") and n.count("/") > 1}
    assert packages == {"cli", "method", "integration", "tools"}, packages
    # The tools' dependencies are an extra, not requirements of the product.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "matplotlib" in r and "extra ==" not in r], requires
    assert [r for r in requires if "matplotlib" in r and "extra == 'tools'" in r.replace('"', "'")], requires


def test_wheel_in_a_fresh_venv_runs_timber_with_mergekit_yaml(dist, tmp_path):
    wheel, _ = dist
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    # Without the [tools] extra: matplotlib cannot be imported in this venv (as if not installed).
    (site / "zz_no_matplotlib.pth").write_text("import sys; sys.modules['matplotlib'] = None\n")
    probe = "import importlib\ntry:\n    importlib.import_module('matplotlib')\nexcept ImportError:\n    print('absent')"
    assert run(python, "-c", probe, cwd=tmp_path).stdout.strip() == "absent"

    base, instruct = write_pair(tmp_path / "pair", arch="llama", layers=1, seed=3)
    config = write_yaml(tmp_path / "timber.yml", base_config(base, instruct, **{"lambda": 0.2}))
    # cwd outside the repository: mergekit_timber must come from the wheel.
    where = run(python, "-c", "import mergekit_timber; print(mergekit_timber.__file__)", cwd=tmp_path).stdout
    assert where.strip().startswith(str(site)), where
    run(python, "-m", "mergekit.scripts.run_yaml", config, tmp_path / "out", cwd=tmp_path)
    assert "timber" in (tmp_path / "out" / "README.md").read_text()
    merged, original = load_dir(tmp_path / "out"), load_dir(instruct)
    name = "model.layers.0.mlp.down_proj.weight"
    assert merged[name].shape == original[name].shape and not torch.equal(merged[name], original[name])
    # A tool that needs the extra says so in one line, before any work.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(venv / "bin" / "mergekit-timber"), "analyze", str(base), str(instruct), "-o", "an"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "mergekit-timber: error: mergekit-timber analyze needs matplotlib: pip install 'mergekit-timber[tools]'"
    ), proc.stderr
    assert not (tmp_path / "an").exists()
    version = run(venv / "bin" / "mergekit-timber", "--version", cwd=tmp_path).stdout
    assert wheel.name.split("-")[1] in version  # mergekit-timber, version 0.1.0 for ..._timber-0.1.0-py3-...
