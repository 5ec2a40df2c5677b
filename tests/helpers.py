"""Shared helpers for end-to-end tests: run the real CLIs, read outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mergekit_timber.checkpoint import Checkpoint

BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    """Path of a console script installed beside this interpreter."""
    path = BIN / name
    return str(path) if path.exists() else name


def run_cli(*args, check=True, env=None, timeout=600, cwd=None):
    """Run a console script as a user would; return the CompletedProcess."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Parallel workers share the cores: spinning OpenMP threads of oversubscribed
        # processes slow LAPACK down by orders of magnitude, so one thread each.
        full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    proc = subprocess.run(
        [cli(args[0]), *map(str, args[1:])],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def write_yaml(path: Path, config) -> Path:
    if isinstance(config, str):
        path.write_text(config)
    else:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_dir(model_dir: Path) -> dict:
    """All tensors of a model directory (any number of safetensors shards)."""
    with Checkpoint(model_dir, "model") as checkpoint:
        return {name: checkpoint.tensor(name) for name in checkpoint.names()}


def config_of(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def base_config(base, instruct, method="timber", **params) -> dict:
    """A mergekit config dict: `method` on one Base/Instruct pair, `params` global."""
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(instruct)}]}
    if params:
        cfg["parameters"] = params
    return cfg


def shared_toy_pair(tmp_path_factory) -> Path:
    """The 'fast' toy pair (scripts/toy_pair.py), trained once per test session and shared
    by the xdist workers and the test files that use it."""
    from filelock import FileLock

    import toy_pair

    root = tmp_path_factory.getbasetemp().parent  # common to every worker of the run
    out = root / "toy_pair_fast"
    with FileLock(str(root / "toy_pair_fast.lock")):
        if not (out / "pair.json").exists():
            toy_pair.build_pair(out, "fast", seed=0, threads=1)
    return out
