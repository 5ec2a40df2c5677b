"""The output folder of a Timber merge, as users point mergekit at it: symlinks to another
filesystem, mount points, `.`, folders with their own mode and group, folders holding the
user's files, re-runs, SIGTERM/SIGHUP/SIGKILL mid-merge, disks that are full or read-only.
Through the real mergekit-yaml, mergekit-multi and mergekit-timber sweep."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli, config_of, load_dir, run_cli, write_yaml
from pairs.synthetic import write_pair

ENV = {"OMP_NUM_THREADS": "1"}

# Files a user keeps beside a model: none of them is a model file, none is touched.
USER_FILES = {
    "model-Q4_K_M.gguf": b"GGUF user quantisation",
    "training_args.bin": b"trainer state",
    "optimizer.pt": b"optimizer state",
    "notes.txt": b"my notes",
    "extra.safetensors": b"not listed by any index",
    "sub/model.safetensors": b"a sub-folder's model is not this model",
    "sub/config.json": b"{}",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("outdir") / "llama", arch="llama", layers=1, seed=7)


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A pair whose merge takes a few seconds: time to send a signal mid-merge."""
    root = tmp_path_factory.mktemp("outdir_big")
    return write_pair(root / "llama", arch="llama", layers=4, hidden=512, intermediate=1024, heads=8, kv_heads=4,
                      head_dim=64, vocab=2048, seed=7)  # fmt: skip


@pytest.fixture(scope="module")
def cfg(pair, tmp_path_factory):
    base, instruct = pair
    return timber_yaml(tmp_path_factory.mktemp("cfg") / "timber.yml", base, instruct)


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory):
    """The merge written into a fresh folder: what every other case must hold."""
    out = tmp_path_factory.mktemp("ref") / "out"
    merge(cfg, out)
    return {"tensors": load_dir(out), "config": config_of(out), "files": sorted(p.name for p in out.iterdir())}


def timber_yaml(path, base, instruct):
    return write_yaml(path, {"merge_method": "timber", "base_model": str(base), "models": [{"model": str(instruct)}]})


def merge(cfg, out, *args, cwd=None, env=None, check=True, tool="mergekit-yaml"):
    return run_cli(tool, cfg, out, *args, cwd=cwd, env={**ENV, **(env or {})}, check=check)


def failed(proc) -> str:
    """The one line a failure prints (last on stderr, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def put_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def assert_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        assert (folder / name).read_bytes() == data, name


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }  # fmt: skip


def staging_left(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".timber-staging-"))


def assert_model(out: Path, reference) -> None:
    """`out` holds exactly the reference merge's model: same tensors, config, model files."""
    got = load_model(out)
    assert got.keys() == reference["tensors"].keys()
    assert all(torch.equal(got[k], reference["tensors"][k]) for k in got)
    assert config_of(out) == reference["config"]
    assert not staging_left(out)


def load_model(folder: Path) -> dict:
    """The model's tensors, by its index or its model.safetensors (the user's extra.safetensors aside)."""
    if (folder / "model.safetensors.index.json").is_file():
        return load_dir(folder)
    return load_file(folder / "model.safetensors")


def weight_names(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json"))
                  and not p.name == "extra.safetensors")  # fmt: skip


def previous_model(folder: Path, instruct: Path) -> None:
    """An earlier output in `folder`: weights in custom-named shards its own index lists,
    config, tokenizer files (one the new output lacks), a transformers chat-template folder
    and a mergekit card."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(instruct / name, folder / name)
    (folder / "tokenizer.model").write_bytes(b"an old sentencepiece model")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool.jinja").write_text("{{ old }}")
    (folder / "README.md").write_text("---\n---\nThis is a merge of pre-trained language models created using [mergekit](x).\n")
    (folder / "mergekit_config.yml").write_text("merge_method: linear\n")
    for shard in ("weights-a.safetensors", "weights-b.safetensors"):
        shutil.copy(instruct / "model.safetensors", folder / shard)
    weight_map = {"x.weight": "weights-a.safetensors", "y.weight": "weights-b.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@contextlib.contextmanager
def tmpfs(where: Path, *options):
    """A tmpfs mounted at `where` for the test; skipped where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join(("size=64m",) + options) if not any(o.startswith("size=") for o in options) else ",".join(options)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip() or proc.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def shm_dir():
    """A folder on /dev/shm (another filesystem than the tests' tmp folder)."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm on this platform")
    folder = Path(tempfile.mkdtemp(prefix="timber-test-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- re-runs


def test_rerun_replaces_the_previous_model_and_nothing_else(pair, cfg, reference, tmp_path):
    """No opt-in: a re-run replaces the model, as mergekit does, and never leaves a stale shard;
    every file of the user survives byte for byte."""
    out = tmp_path / "out"
    previous_model(out, pair[1])
    put_user_files(out)

    for shard_size in ("40K", None):  # over the previous model, then again with another shard size
        if shard_size is None:  # the user replaced the card by their own README.md
            (out / "README.md").write_text("# my project\n")
        merge(cfg, out, *(("--out-shard-size", shard_size) if shard_size else ("--no-write-model-card",)))
        assert_model(out, reference)
        assert_user_files(out)
        names = weight_names(out)
        if shard_size:
            shards = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
            assert names == sorted(shards + ["model.safetensors.index.json"]) and len(shards) > 2  # nothing stale
        else:
            assert names == ["model.safetensors"]  # no index, no shard left of the sharded runs
        # The previous model's files the new one lacks are gone; its own ones are the new ones.
        assert not (out / "tokenizer.model").exists() and not (out / "additional_chat_templates").exists()
        others = sorted(p.name for p in out.iterdir() if p.name not in USER_FILES and p.name != "sub")
        gone = {"model.safetensors"} | (set() if shard_size else {"mergekit_config.yml"})  # no card: no recipe
        assert [n for n in others if n not in names] == [n for n in reference["files"] if n not in gone]
        if shard_size:
            assert "timber" in (out / "mergekit_config.yml").read_text()
    # Without a card, a README.md mergekit did not write stays; the stale recipe goes.
    assert (out / "README.md").read_text() == "# my project\n" and not (out / "mergekit_config.yml").exists()


def test_mergekit_multi_no_lazy_twice(pair, reference, tmp_path):
    """mergekit-multi --no-lazy re-merges into the same intermediate folders: a Timber step
    (and a Timber final step reading it) re-runs like any mergekit step."""
    base, instruct = pair
    chain = tmp_path / "chain.yml"
    chain.write_text(
        f"name: step\nmerge_method: timber\nbase_model: {base}\nmodels:\n  - model: {instruct}\n---\n"
        f"merge_method: timber\nbase_model: {base}\nmodels:\n  - model: step\nparameters:\n  lambda: 0.5\n"
    )
    work, final = tmp_path / "work", tmp_path / "final"
    runs = []
    for _ in range(2):
        run_cli("mergekit-multi", chain, "--intermediate-dir", work, "--out-path", final, "--no-lazy", env=ENV)
        assert_model(work / "step", reference)
        runs.append(load_dir(final))
        assert not staging_left(final)
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# --------------------------------------------------------------------------- where


def test_symlink_to_another_filesystem(pair, cfg, reference, tmp_path, shm_dir):
    """The merge lands in the symlink's target, on its filesystem; the link stays a link."""
    target = shm_dir / "out"
    previous_model(target, pair[1])
    put_user_files(target)
    try:  # a folder of its own: mode 2700, a setgid group, an inode
        os.chown(target, -1, 4242)
    except PermissionError:  # not root: the group it has
        pass
    group = os.stat(target).st_gid
    os.chmod(target, 0o2700)
    inode = os.stat(target).st_ino
    link = tmp_path / "out"
    link.symlink_to(target)
    assert os.stat(tmp_path).st_dev != os.stat(target).st_dev

    merge(cfg, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    info = os.stat(target)
    assert (info.st_ino, stat.S_IMODE(info.st_mode), info.st_gid) == (inode, 0o2700, group)
    assert_model(target, reference)
    assert_user_files(target)
    assert not staging_left(tmp_path)
    assert "out" in (target / "README.md").read_text()  # the card names the model by the user's path


def test_dot_is_the_output(pair, cfg, reference, tmp_path):
    """`mergekit-yaml r.yml .`: the current folder receives the model; it is never replaced.
    Its name has 240 characters: the staging folder inside it has a short name of its own."""
    here = tmp_path / ("h" * 240)
    previous_model(here, pair[1])
    put_user_files(here)
    recipe = shutil.copy(cfg, here / "r.yml")
    inode = os.stat(here).st_ino

    merge("r.yml", ".", cwd=here)
    assert os.stat(here).st_ino == inode
    assert_model(here, reference)
    assert_user_files(here)
    assert Path(recipe).read_text() == Path(cfg).read_text()


def test_mount_point_with_its_mode_and_setgid_group(pair, cfg, reference, tmp_path):
    """A mount point (a volume in a container), mode 0700 with a setgid group: it receives
    the model and stays what it was (never removed, replaced or re-created)."""
    group = 4242
    with tmpfs(tmp_path / "mnt", "size=64m", "mode=2700", f"gid={group}") as mnt:
        previous_model(mnt, pair[1])
        put_user_files(mnt)
        merge(cfg, mnt)
        info = os.stat(mnt)
        assert os.path.ismount(mnt)
        assert stat.S_IMODE(info.st_mode) == 0o2700 and info.st_gid == group
        assert os.stat(mnt / "config.json").st_gid == group  # written inside it: the folder's group
        assert_model(mnt, reference)
        assert_user_files(mnt)


# --------------------------------------------------------------------------- signals


def start_merge(cfg, out, *args, tool="mergekit-yaml"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **ENV)
    return subprocess.Popen([cli(tool), *map(str, (*(["sweep"] if tool == "mergekit-timber" else []), cfg, out, *args))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_termination_signals)  # fmt: skip


def default_termination_signals() -> None:
    """In the child: SIGTERM/SIGHUP act as in a terminal, even when pytest runs under nohup.

    An ignored SIGHUP is inherited and, rightly, stays ignored by the merge
    (test_nohup_keeps_sighup_ignored), which would make a SIGHUP test a no-op.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def wait_for_shard(proc, folder: Path, timeout=240) -> None:
    """Until the merge has written a first shard into its staging folder (mid-merge)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the merge ended before a shard was written: {proc.stderr.read()[-2000:]}")
        if list(folder.glob(".timber-staging-*/model/model-*.safetensors")):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no shard written in time")


def test_sigterm_mid_merge_keeps_the_previous_model(big_pair, tmp_path):
    base, instruct = big_pair
    cfg = timber_yaml(tmp_path / "t.yml", base, instruct)
    out = tmp_path / "out"
    shutil.copytree(instruct, out)  # the previous model
    put_user_files(out)
    before = snapshot(out)

    proc = start_merge(cfg, out, "--out-shard-size", "1M")
    wait_for_shard(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, stderr[-3000:]  # ended by the signal, as without the plugin
    assert snapshot(out) == before  # the previous model whole, no hidden folder
    assert not staging_left(out)


def test_sighup_mid_sweep_keeps_the_previous_models(big_pair, tmp_path):
    base, instruct = big_pair
    cfg = timber_yaml(tmp_path / "t.yml", base, instruct)
    root = tmp_path / "sweep"
    for lam in ("0.2", "0.5"):
        shutil.copytree(instruct, root / f"lambda-{lam}")
    (root / "notes.txt").write_text("mine")
    before = snapshot(root)

    proc = start_merge(cfg, root, "--lambdas", "0.2,0.5", "--out-shard-size", "1M", tool="mergekit-timber")
    wait_for_shard(proc, root / "lambda-0.2")
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGHUP, stderr[-3000:]
    assert snapshot(root) == before


def test_leftover_of_a_killed_merge_is_removed_by_the_next_one(big_pair, cfg, reference, tmp_path):
    """SIGKILL leaves the staging folder (nothing can run then); the next merge into the same
    output removes it with one line; a staging folder a live merge holds is left alone."""
    base, instruct = big_pair
    out = tmp_path / "out"
    proc = start_merge(timber_yaml(tmp_path / "big.yml", base, instruct), out, "--out-shard-size", "1M")
    wait_for_shard(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = staging_left(out)

    # A concurrent merge's staging folder: its lock is held by a live process.
    live = out / f".timber-staging-{os.getpid()}-0123abcd"
    live.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(live / 'lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = merge(cfg, out)
        removed = [line for line in proc.stderr.splitlines() if "left by a Timber merge that was stopped" in line]
        assert len(removed) == 1 and str(out / left) in removed[0], proc.stderr[-3000:]
        assert staging_left(out) == [live.name]
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(live)
    assert_model(out, reference)


# --------------------------------------------------------------------------- failures


def test_read_only_output_is_refused_before_work(cfg, tmp_path):
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as ro:
        proc = merge(cfg, ro / "out", check=False)
        line = failed(proc)
        assert line == f"mergekit-timber: error: output {ro / 'out'}: cannot write into {ro}: read-only file system"
        assert "Warmup loader cache" not in proc.stderr  # before mergekit did any work


def test_output_name_too_long_is_refused_before_work(cfg, tmp_path):
    """(A 240-character name works: test_dot_is_the_output.)"""
    too_long = tmp_path / ("m" * 300)
    proc = merge(cfg, too_long, check=False)
    line = failed(proc)
    assert line.startswith(f"mergekit-timber: error: output {too_long}: the name mmmm") and "is 300 bytes long; this filesystem allows 255" in line
    assert "Warmup loader cache" not in proc.stderr


def test_disk_full_while_writing_weights(cfg, tmp_path):
    """safetensors raises SafetensorError (not an OSError) on a full disk: one line naming
    the output and the cause."""
    with tmpfs(tmp_path / "full", "size=96k") as full:
        out = full / "out"
        line = failed(merge(cfg, out, check=False))
        assert line == f"mergekit-timber: error: writing the merged model into {out} failed: No space left on device"
        assert list(full.iterdir()) == []  # no staging folder, no empty output folder


def test_disk_full_messages_of_both_writers(tmp_path):
    """torch.save (--no-safe-serialization) says only "unexpected pos": a full output disk is
    named as such; safetensors' message carries the OS error."""
    from safetensors.torch import save_file

    from mergekit_timber.integration.output_dir import describe, is_write_failure

    with tmpfs(tmp_path / "full", "size=64k") as full:
        tensors = {"w": torch.zeros(100_000)}
        for write in (lambda: torch.save(tensors, full / "x.bin"), lambda: save_file(tensors, str(full / "x.safetensors"))):
            with pytest.raises(Exception) as caught:
                write()
            assert is_write_failure(caught.value)
            assert describe(caught.value, written=full) == "No space left on device"


def test_card_failure_warns_and_publishes(cfg, tmp_path):
    """The card is cosmetic: a failure there warns and the model is published without it."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import mergekit.card\n\ndef method_md(*args, **kwargs):\n    raise RuntimeError('template broke')\n\n"
        "mergekit.card.method_md = method_md\n"
    )
    out = tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    proc = merge(cfg, out, env={"PYTHONPATH": pythonpath})
    assert "writing the model card failed (RuntimeError: template broke); the model is published without README.md" in proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "README.md").exists() and not (out / "mergekit_config.yml").exists()


# --------------------------------------------------------------------------- the sweep


def test_sweep_replaces_earlier_outputs_under_a_symlinked_root(pair, cfg, reference, tmp_path, shm_dir):
    """Each OUT/lambda-X/ is published as a single merge's output: on the symlink's
    filesystem, over the earlier model (no opt-in), the user's files kept."""
    link = tmp_path / "sweep"
    link.symlink_to(shm_dir)
    for lam in ("0.2", "0.5"):
        previous_model(shm_dir / f"lambda-{lam}", pair[1])
        put_user_files(shm_dir / f"lambda-{lam}")
    proc = run_cli("mergekit-timber", "sweep", cfg, link, "--lambdas", "0.2,0.5", "--out-shard-size", "40K", env=ENV)
    assert "lambda=0.5" in proc.stdout
    assert link.is_symlink() and not staging_left(tmp_path)
    assert_model(shm_dir / "lambda-0.2", reference)  # the default lambda is 0.2
    for lam in ("0.2", "0.5"):
        out = shm_dir / f"lambda-{lam}"
        assert_user_files(out)
        assert not staging_left(out) and not (out / "tokenizer.model").exists()
        shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert weight_names(out) == sorted(shards | {"model.safetensors.index.json"})  # no stale shard


# --------------------------------------------------------------------------- Hub id or local


def test_hub_id_is_tried_when_no_such_local_folder_exists(pair, tmp_path):
    """`org/model` is a local model only when that folder exists (as mergekit decides): a
    folder `org/` beside it does not make it one."""
    from mergekit_timber.checkpoint import resolve_model

    (tmp_path / "org").mkdir()
    cfg = write_yaml(tmp_path / "t.yml", {"merge_method": "timber", "base_model": str(pair[0]), "models": [{"model": "org/model"}]})
    line = failed(run_cli("mergekit-yaml", cfg, tmp_path / "out", cwd=tmp_path, check=False))
    assert line.startswith(
        f"mergekit-timber: error: instruct model 'org/model' is not a local directory ({tmp_path / 'org' / 'model'} "
        "does not exist) and the Hugging Face Hub could not provide it as a repo id: "
    ), line

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        fetched = []
        assert resolve_model("org/model", "instruct", lambda: fetched.append(1) or str(pair[1])) == pair[1]
        assert fetched == [1]  # the Hub route, although ./org exists
        shutil.copytree(pair[1], tmp_path / "org" / "model")
        assert resolve_model("org/model", "instruct", lambda: fetched.append(2) or "/nowhere") == Path("org/model")
        assert fetched == [1]  # a local folder: never asked the Hub
    finally:
        os.chdir(here)


# --------------------------------------------------------------------------- rules, in process


def test_what_counts_as_the_previous_model(tmp_path):
    from mergekit_timber.integration.output_dir import OutputDir

    out = tmp_path / "out"
    out.mkdir()
    put_user_files(out)
    for name in ("config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin", "tokenizer.json",
                 "weights-a.safetensors", "weights-z.safetensors", "other.bin"):  # fmt: skip
        (out / name).write_bytes(b"x")
    (out / "README.md").write_text("# mine")
    (out / ".timber-staging-1-abcd").mkdir()
    listed = {"a": "weights-a.safetensors", "b": "../escape.safetensors", "c": "training_args.bin",
              "d": "notes.txt", "e": "sub/model.safetensors", "f": "missing.safetensors"}  # fmt: skip
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": listed}))
    (out / "pytorch_model.bin.index.json").write_text("[" * 100000)  # unreadable: names nothing

    assert OutputDir(out).previous_model_files() == {
        "config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin", "tokenizer.json",
        "weights-a.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    }  # fmt: skip


def test_failure_messages_name_the_output_file(tmp_path):
    import errno

    from mergekit_timber.integration.output_dir import describe

    staged = tmp_path / "out" / ".timber-staging-12-00ff00ff" / "model" / "tokenizer.json"
    # shutil.copyfile (sendfile) puts the source first: a full disk is the destination's.
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/models/instruct/tokenizer.json", None, str(staged))
    assert describe(error) == f"No space left on device: {tmp_path / 'out' / 'tokenizer.json'}"
    missing = OSError(errno.ENOENT, os.strerror(errno.ENOENT), "/models/instruct/tokenizer.json", None, str(staged))
    assert describe(missing) == "No such file or directory: /models/instruct/tokenizer.json"


def test_nohup_keeps_sighup_ignored():
    from mergekit_timber.integration import signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with signals.terminate_as_exception():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_publish_order_config_last(tmp_path, monkeypatch):
    """The previous config.json goes first, the new weights come in before the previous
    model's other files go, and config.json comes last: never a config beside mixed weights."""
    from mergekit_timber.integration import output_dir
    from mergekit_timber.integration.output_dir import OutputDir

    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.model", "notes.txt"):  # fmt: skip
        (out / name).write_text("old " + name)
    target = OutputDir(out)
    staged = target.open()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (staged / name).write_text("new " + name)

    steps = []
    real_rename = os.rename

    def rename(source, target):  # every step of a publication is a rename in the output folder
        if Path(source).parent == out:
            steps.append(("away", Path(source).name))
        if Path(target).parent == out:
            steps.append(("in", Path(target).name))
        return real_rename(source, target)

    monkeypatch.setattr(output_dir.os, "rename", rename)
    target.publish()
    monkeypatch.undo()

    assert steps[0] == ("away", "config.json") and steps[-1] == ("in", "config.json")
    assert steps.index(("in", "model.safetensors")) < min(
        steps.index(("away", n)) for n in ("model-00001-of-00002.safetensors", "model.safetensors.index.json")
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"]
    assert all((out / n).read_text() == "new " + n for n in ("config.json", "model.safetensors", "tokenizer.json"))


def test_publish_never_replaces_a_users_folder(tmp_path):
    from mergekit_timber.errors import TimberOutputError
    from mergekit_timber.integration.output_dir import OutputDir

    out = tmp_path / "out"
    (out / "tokenizer.json").mkdir(parents=True)  # a folder of the user's under a model file's name
    (out / "tokenizer.json" / "mine.txt").write_text("mine")
    (out / "config.json").write_text("old")
    target = OutputDir(out)
    staged = target.open()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (staged / name).write_text("new")
    with pytest.raises(TimberOutputError, match="tokenizer.json there is a folder"):
        target.publish()
    target.discard()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]  # nothing changed
    assert (out / "config.json").read_text() == "old"


def test_which_staging_folders_are_leftovers(tmp_path, caplog):
    """A staging folder is a leftover when no process holds its lock (or, before its lock
    exists, when the pid in its name is gone); one line per folder removed."""
    import fcntl

    from mergekit_timber.integration.output_dir import OutputDir

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held, free = out / ".timber-staging-1-aaaa", out / ".timber-staging-1-bbbb"
    young, orphan = out / f".timber-staging-{os.getpid()}-cccc", out / f".timber-staging-{dead.pid}-dddd"
    for folder in (held, free, young, orphan):
        (folder / "model").mkdir(parents=True)
    for folder in (held, free):
        (folder / "lock").write_text("host 1 boot\n")
    fd = os.open(held / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a running merge's lock (another open file: flock conflicts)
    try:
        with caplog.at_level("WARNING", logger="mergekit_timber.integration.output_dir"):
            OutputDir(out).remove_leftovers()
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == sorted([held.name, young.name])
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == sorted(f"removed {p}" for p in (free, orphan))


def test_leftovers_where_the_filesystem_has_no_locks(tmp_path, monkeypatch):
    """Without flock (some network filesystems) a staging folder is a leftover when its
    owner ran on this machine, in this boot, and its pid is gone; another host's is kept."""
    import errno

    from mergekit_timber.integration import output_dir
    from mergekit_timber.integration.output_dir import OutputDir

    def no_locks(fd):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(output_dir, "_flock", no_locks)
    host, pid, boot = output_dir._identity().split(" ")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owners = {"gone": f"{host} {dead.pid} {boot}", "alive": f"{host} {pid} {boot}",
              "rebooted": f"{host} {pid} another-boot", "elsewhere": f"other-host {dead.pid} {boot}"}  # fmt: skip
    out = tmp_path / "out"
    for index, (name, owner) in enumerate(owners.items()):
        folder = out / f".timber-staging-{index}-{index:04x}"
        folder.mkdir(parents=True)
        (folder / "lock").write_text(owner + "\n")
        (folder / name).touch()
    OutputDir(out).remove_leftovers()
    kept = sorted(next(p.name for p in folder.iterdir() if p.name != "lock") for folder in out.iterdir())
    assert kept == ["alive", "elsewhere"]
