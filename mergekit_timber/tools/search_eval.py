"""One lm-evaluation-harness evaluation of one model, as `mergekit-timber search` runs it.

This module runs inside a Ray worker (mergekit_timber.tools.search sends `evaluate` there), so it
imports lm-eval and torch only inside its functions, and everything it needs travels in
one picklable `EvalJob`. An evaluation writes into a staging folder beside its final one
and renames it into place once lm-eval's files and `record.json` (its settings) are
written: a folder `OUT/evals/<label>/` is always a finished evaluation, and re-running
with the same settings on the same model weights skips it.

The sampling settings are pinned and identical for every model: all of them go to
lm-eval's `gen_kwargs`, which override the task's `generation_kwargs`. transformers fills
any setting left out from the model's generation_config.json (an Instruct model's usually
sets temperature, top_k, top_p), and lm-eval passes only `do_sample`/`temperature` by
default, so `top_k`, `top_p` and `min_p` are always given explicitly (0, 1.0 and 0.0: off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

RECORD = "record.json"
# Files whose size and modification time stand for a model's weights in its fingerprint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings given to every model alike (none comes from a model's files)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    do_sample: bool = True
    max_gen_toks: int = 256
    seed: int = 1234

    def gen_kwargs(self) -> dict:
        kwargs = dataclasses.asdict(self)
        del kwargs["seed"]  # a per-request seed would make every repeat the same sample
        if not self.do_sample:
            kwargs["temperature"] = 0.0  # greedy: lm-eval's spelling
        return kwargs


@dataclass(frozen=True)
class EvalJob:
    """One model on the search's tasks, with every setting that decides its samples."""

    label: str  # base, instruct, lambda-0.2, ...
    model: str  # a local folder (or a Hub id for Base/Instruct)
    tasks: Tuple[str, ...]  # the tasks this model runs
    as_tasks: Tuple[str, ...]  # the name its problems are scored under (Base may run a variant)
    include_path: Optional[str]
    lm_eval_tasks: bool  # some task is lm-eval's own (else only --include-path is indexed: ~10 s less)
    chat: bool  # apply the model's chat template
    sampling: Sampling
    repeats: Optional[int]  # None: each task's own `repeats`
    num_fewshot: Optional[int]
    limit: Optional[int]
    batch_size: int
    backend: str  # hf or vllm
    device: str  # cpu or cuda
    dtype: str
    threads: int
    out: str  # OUT/evals/<label>
    fingerprint: str  # of the model's weights: new weights, new evaluation

    def settings(self) -> dict:
        """What the record keeps and a re-run compares (not where it writes)."""
        settings = dataclasses.asdict(self)
        for key in ("out", "threads"):  # neither changes a sample
            settings.pop(key)
        return json.loads(json.dumps(settings))  # tuples as lists, as read back from JSON


def model_fingerprint(model: str) -> str:
    """Names, sizes and modification times of a local model's weight and config files."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"
    parts = []
    for item in sorted(path.iterdir()):
        if item.is_file() and item.name.endswith(_WEIGHT_SUFFIXES):
            stat = item.stat()
            parts.append(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_record(out: Path) -> Optional[dict]:
    try:
        return json.loads((Path(out) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished(job: EvalJob) -> bool:
    """True when OUT/evals/<label>/ holds an evaluation with exactly these settings."""
    record = read_record(Path(job.out))
    return record is not None and record.get("settings") == job.settings()


def sample_files(out: Path) -> dict:
    """task name -> lm-eval's samples_<task>_<date>.jsonl of a finished evaluation."""
    record = read_record(Path(out)) or {}
    return {task: Path(out) / name for task, name in record.get("samples", {}).items()}


def evaluate(job: EvalJob) -> dict:
    """Run lm-eval for one model (skipped when already finished); return its record.

    The model's standard output and error (lm-eval's log, progress bars) go to
    OUT/evals/<label>.log.
    """
    out = Path(job.out)
    if finished(job):
        return {**read_record(out), "skipped": True}
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # a previous try of this worker process
    staging.mkdir(parents=True)
    start = time.time()
    with _output_to(out.parent / f"{out.name}.log"):
        samples = _run_lm_eval(job, staging)
    record = {"label": job.label, "settings": job.settings(), "samples": samples,
              "seconds": round(time.time() - start, 1)}
    (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if out.exists():  # an evaluation with other settings: replaced by this one
        shutil.rmtree(out)
    os.replace(staging, out)
    return record


def _run_lm_eval(job: EvalJob, staging: Path) -> dict:
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    if job.device == "cpu":
        import torch

        torch.set_num_threads(job.threads)
    manager = TaskManager(include_path=job.include_path, include_defaults=job.lm_eval_tasks)
    tasks = list(manager.load(list(job.tasks))["tasks"].values())
    if job.repeats is not None:
        for task in tasks:
            task.set_config("repeats", job.repeats)
    model_args = {"pretrained": job.model, "dtype": job.dtype}
    if job.backend == "vllm":
        model_args.update(seed=job.sampling.seed, tensor_parallel_size=1)
    tracker = EvaluationTracker(output_path=str(staging))
    results = lm_eval.simple_evaluate(
        model=job.backend, model_args=model_args, tasks=tasks, num_fewshot=job.num_fewshot,
        batch_size="auto" if job.backend == "vllm" else job.batch_size, device=job.device,
        limit=job.limit, log_samples=True, evaluation_tracker=tracker, apply_chat_template=job.chat,
        gen_kwargs=job.sampling.gen_kwargs(), task_manager=manager,
        random_seed=job.sampling.seed, numpy_random_seed=job.sampling.seed,
        torch_random_seed=job.sampling.seed, fewshot_random_seed=job.sampling.seed,
    )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    found = {}
    for task in job.tasks:
        files = sorted(staging.glob(f"*/samples_{task}_*.jsonl"))
        if len(files) != 1:
            raise RuntimeError(f"{job.label}: lm-eval wrote {len(files)} samples files for task {task!r}")
        found[task] = str(files[0].relative_to(staging))
    return found


@contextlib.contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (file descriptors too) to LOG."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
