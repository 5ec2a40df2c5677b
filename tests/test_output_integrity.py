"""A Timber merge never leaves a directory that loads as a model it is not, and every
failure a user can cause ends in one line, through the real mergekit-yaml."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import cli, load_dir, write_yaml
from pairs.synthetic import write_pair

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("integrity") / "llama", arch="llama", layers=1, seed=7)


def timber_yaml(path, base, instruct):
    return write_yaml(path, {"merge_method": "timber", "base_model": str(base), "models": [{"model": str(instruct)}]})


def mergekit_yaml(*args, env=None, cwd=None):
    full = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    full.update(env or {})
    return subprocess.run(
        [cli("mergekit-yaml"), *map(str, args)], capture_output=True, text=True, env=full, cwd=cwd, timeout=600
    )


def failed(proc) -> str:
    """The one line a failure prints (last on stderr, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def snapshot(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def no_staging_left(folder):
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".timber-staging-")]


def weight_names(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".safetensors", ".index.json")))


def test_earlier_single_file_model_then_sharded_reruns(pair, tmp_path):
    """Re-running into a folder that holds a model replaces it, as mergekit does (no opt-in),
    with no weight file, shard or index of the earlier model left."""
    base, instruct = pair
    cfg = timber_yaml(tmp_path / "t.yml", base, instruct)
    out = tmp_path / "out"
    shutil.copytree(instruct, out)  # an earlier, finished model: model.safetensors

    counts, tensors = [], []
    for shard_size in ("100K", "40K"):  # replace, then rerun with another shard size
        proc = mergekit_yaml(cfg, out, "--out-shard-size", shard_size)
        assert proc.returncode == 0, proc.stderr[-3000:]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert weight_names(out) == sorted(shards + ["model.safetensors.index.json"])  # nothing stale
        counts.append(len(shards))
        tensors.append(load_dir(out))
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == 3
        no_staging_left(out)
    assert 1 < counts[0] < counts[1]
    assert tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert not torch.equal(tensors[0]["model.layers.0.mlp.up_proj.weight"], load_dir(instruct)["model.layers.0.mlp.up_proj.weight"])


def test_failed_merge_into_a_used_directory_keeps_the_earlier_model(pair, tmp_path):
    base, instruct = pair
    broken = tmp_path / "broken"
    shutil.copytree(instruct, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    shutil.copytree(instruct, out)
    before = snapshot(out)

    line = failed(mergekit_yaml(timber_yaml(tmp_path / "t.yml", base, broken), out))
    assert line.startswith("mergekit-timber: error: ") and "model.layers.0.mlp.up_proj.weight" in line
    assert snapshot(out) == before  # the earlier model, whole: no partial new shards, no staging folder


SITECUSTOMIZE = '''
import errno, os, shutil

_copyfile = shutil.copyfile


def copyfile(src, dst, *args, **kwargs):
    # The disk fills while the tokenizer is copied: an empty file, then ENOSPC.
    if os.path.basename(dst) == "tokenizer.json":
        open(dst, "wb").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
    return _copyfile(src, dst, *args, **kwargs)


shutil.copyfile = copyfile
'''


def test_disk_full_while_copying_the_tokenizer(pair, tmp_path):
    base, instruct = pair
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))

    line = failed(mergekit_yaml(timber_yaml(tmp_path / "t.yml", base, instruct), out, env={"PYTHONPATH": pythonpath}))
    # The file on the full disk, where the user will look (not the source, not the staging folder).
    assert line == (
        f"mergekit-timber: error: copying the tokenizer of {instruct} failed: No space left on device: "
        f"{os.path.realpath(out)}/tokenizer.json"
    )
    assert not out.exists()  # nothing that could load as a model; the folder it made is gone


def test_relative_local_paths_never_reach_the_hub(pair, tmp_path):
    base, instruct = pair
    shutil.copytree(base.parent, tmp_path / "models")
    cfg = write_yaml(
        tmp_path / "t.yml", {"merge_method": "timber", "base_model": "models/base", "models": [{"model": "models/instruct"}]}
    )
    proc = mergekit_yaml(cfg, "out", cwd=tmp_path)  # offline: mergekit's card step would ask the Hub
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `config.json` | models/instruct (the Instruct model)" in card and "huggingface.co/models" not in card


def test_missing_local_path_is_reported_as_such(pair, tmp_path):
    base, instruct = pair
    cfg = write_yaml(tmp_path / "t.yml", {"merge_method": "timber", "base_model": "./models/base", "models": [{"model": str(instruct)}]})
    line = failed(mergekit_yaml(cfg, tmp_path / "out", cwd=tmp_path))
    assert line.startswith("mergekit-timber: error: base model './models/base': no such directory (")
    assert not (tmp_path / "out").exists()
    proc = mergekit_yaml(cfg, tmp_path / "out", cwd=tmp_path, env={"MERGEKIT_TIMBER_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "TimberInputError" in proc.stderr


def test_pickled_output_is_checked_and_published(pair, tmp_path):
    """--no-safe-serialization: mergekit writes pytorch_model.bin; the finite check reads it
    and the merge (and every sweep output) is the same model as the safetensors one."""
    base, instruct = pair
    cfg = timber_yaml(tmp_path / "t.yml", base, instruct)
    assert mergekit_yaml(cfg, tmp_path / "st").returncode == 0
    proc = mergekit_yaml(cfg, tmp_path / "pt", "--no-safe-serialization")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weight_names(tmp_path / "pt") == [] and (tmp_path / "pt" / "pytorch_model.bin").is_file()
    want = load_dir(tmp_path / "st")
    got = torch.load(tmp_path / "pt" / "pytorch_model.bin", weights_only=True)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)

    sweep = subprocess.run(
        [cli("mergekit-timber"), "sweep", str(cfg), str(tmp_path / "sw"), "--lambdas", "0.2,0.5",
         "--no-safe-serialization"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    for lam in ("0.2", "0.5"):
        out = torch.load(tmp_path / "sw" / f"lambda-{lam}" / "pytorch_model.bin", weights_only=True)
        assert sorted(out) == sorted(want)
    assert all(torch.equal(v, want[k]) for k, v in torch.load(
        tmp_path / "sw" / "lambda-0.2" / "pytorch_model.bin", weights_only=True).items())  # fmt: skip
