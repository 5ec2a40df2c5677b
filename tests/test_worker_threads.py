"""--multi-gpu runs tensors in worker threads: mergekit's options and a termination
signal must reach them. mergekit's MultiGPUExecutor needs CUDA devices (tests/test_cuda.py
runs the real one); here the thread-side code runs in fresh threads, as it does there."""

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mergekit_timber.method import layout

from mergekit_timber.integration import worker_threads

REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class RemoteConfig(PretrainedConfig):
    model_type = "timber_remote_test"

    def __init__(self, hidden_size=64, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''


def in_fresh_thread(fn):
    """fn() run in a new thread, as mergekit's workers run: its result or its exception."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as error:  # noqa: BLE001 - handed back to the test
            out["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out


def test_trust_remote_code_reaches_worker_threads(tmp_path):
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    model = tmp_path / "remote"
    model.mkdir()
    (model / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (model / "config.json").write_text(json.dumps({
        "model_type": "timber_remote_test", "hidden_size": 64, "architectures": ["RemoteModel"],
        "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig"},
    }))
    ref = ModelReference.model_validate(str(model))
    options = MergeOptions(trust_remote_code=True, lazy_unpickle=True, transformers_cache=str(tmp_path / "hf"))
    LoaderCache().setup(options)  # what mergekit's run_merge does, on the main thread only

    # mergekit alone: a worker's LoaderCache starts from the class defaults.
    assert in_fresh_thread(lambda: LoaderCache().trust_remote_code)["value"] is False
    assert "trust_remote_code" in str(in_fresh_thread(lambda: layout.architecture_of_model(ref)).get("error"))

    with worker_threads.options_in_every_thread(options):
        seen = in_fresh_thread(lambda: {k: getattr(LoaderCache(), k) for k in worker_threads.loader_options(options)})
        assert seen["value"] == worker_threads.loader_options(options)
        assert seen["value"]["trust_remote_code"] is True and seen["value"]["lazy_unpickle"] is True
        found = in_fresh_thread(lambda: layout.architecture_of_model(ref))
        assert "error" not in found, found
        assert found["value"].model_type == "timber_remote_test"
    assert in_fresh_thread(lambda: LoaderCache().trust_remote_code)["value"] is False  # mergekit's default again


WORKER_SCRIPT = textwrap.dedent('''
    import concurrent.futures, os, signal, sys, threading, time
    import torch
    from mergekit_timber.integration import signals
    from mergekit_timber.method.adapter import refine_tensor, _refine
    from mergekit_timber.method import layout, adapter as method

    marker = sys.argv[1]
    started = threading.Event()

    def worker():
        # A long run of tensors, as one GPU's island of a multi-GPU merge.
        g = torch.Generator().manual_seed(0)
        base = torch.randn(600, 400, generator=g)
        instruct = base + 0.01 * torch.randn(600, 400, generator=g)
        started.set()
        for _ in range(100000):
            method._refine(layout.ONE_MATRIX, base[None], instruct[None], [0.2], method.ERANK)

    with signals.terminate_as_exception():
        try:
            with concurrent.futures.ThreadPoolExecutor() as pool:
                future = pool.submit(worker)
                started.wait()
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)  # the main thread is waiting (as on mergekit's futures)
        finally:
            with open(marker, "w") as fh:
                fh.write(type(future.exception(timeout=0)).__name__)
''')


def test_sigterm_stops_worker_threads(tmp_path):
    """The main thread's cleanup waits for the pool: the workers must stop at once."""
    marker = tmp_path / "worker-ended-by"
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == -15, proc.stderr[-2000:]  # ended by SIGTERM, as a single-device merge
    assert marker.read_text() == "Terminated"
    assert elapsed < 40, elapsed  # not the 60 s sleep, nor the worker's 100000 tensors
