import os
import sys

# Tests never reach the Hub: every model is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "scripts"))  # answer_check

if os.environ.get("PYTEST_XDIST_WORKER"):
    # See helpers.run_cli: parallel workers must not oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
