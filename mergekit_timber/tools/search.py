"""`mergekit-timber search`: choose lambda by measurement.

One sweep (mergekit_timber.tools.sweep: one decomposition per tensor for every lambda), then one
lm-evaluation-harness evaluation per model (each lambda's output, the Instruct, the Base)
as a Ray task, then Pass@k per model with the estimator and bootstrap bands of
mergekit_timber.tools.passk, against lambda (mergekit_timber.tools.search_report).

Ray places the work; there is no scheduler here. Without an address a local Ray is
started and stopped by the command (one CPU worker per evaluation, or one GPU each where
Ray sees GPUs); with `--address` (or RAY_ADDRESS) the evaluations run on an existing
cluster, whose workers must read and write OUT (shared storage) and have this package
installed. Everything in OUT survives a failure or Ctrl-C: each finished evaluation is
in its own folder with its settings (mergekit_timber.tools.search_eval), and a re-run redoes
only what is missing or was made with other settings.

Nothing of the merge method imports this module (nor Ray or lm-eval).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mergekit_timber.errors import TimberConfigError, TimberError
from mergekit_timber.tools.search_eval import EvalJob, Sampling, evaluate, finished, model_fingerprint
from mergekit_timber.tools.sweep import load_sweep_config, output_name, run_sweep
from mergekit_timber.tools import require

BOOTSTRAP_SEED = 0  # as `mergekit-timber passk`'s default
SWEEP_RECORD = "sweep-record.json"  # OUT/models/: which recipe made each lambda's output
# Variables a worker needs as the command sees them (Hub access, caches, threads).
_WORKER_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
               "HF_DATASETS_CACHE", "HF_TOKEN", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")


@dataclass(frozen=True)
class SearchRequest:
    recipe: Path
    out: Path
    lambdas: Tuple[float, ...]
    tasks: Tuple[str, ...]
    base_tasks: Optional[Tuple[str, ...]]  # the Base's variant of each task (plain prompts)
    with_base: bool
    include_path: Optional[Path]
    ks: Optional[Tuple[int, ...]]
    sampling: Sampling
    repeats: Optional[int]
    num_fewshot: Optional[int]
    limit: Optional[int]
    batch_size: int
    backend: str  # auto, hf, vllm
    device: str  # auto, cpu, cuda
    dtype: str
    threads: int
    workers: Optional[int]  # embedded Ray's CPUs (default: this machine's cores / threads)
    address: Optional[str]
    bootstrap: int
    confidence: float


@dataclass(frozen=True)
class Model:
    label: str
    path: str
    lam: Optional[float]  # None for Base and Instruct


def require_extra() -> None:
    """One line naming the extra when Ray, lm-eval or the plotting tools are missing."""
    require("search", "search", "tools")


def ray_address(option: Optional[str]) -> Optional[str]:
    return option or os.environ.get("RAY_ADDRESS") or None


# --------------------------------------------------------------------------- checks


def pair_of(recipe: Path) -> Tuple[str, str]:
    """(Base, Instruct) of a sweepable Timber recipe; one line when it names no Base."""
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_timber.integration import recipe as recipe_info

    source = load_sweep_config(recipe)
    if not source.get("base_model"):
        raise TimberConfigError(
            f"{recipe}: search needs the Base model as base_model: (it is evaluated, and Timber needs it)"
        )
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(source)))
    base, instruct = recipe_info.base_model(config), recipe_info.instruct_model(config)
    return _absolute(base.model.path), _absolute(instruct.model.path)


def _absolute(path: str) -> str:
    """A local folder as an absolute path (workers run elsewhere); a Hub id as it is."""
    return os.path.abspath(path) if os.path.isdir(path) else path


def local_tasks(include_path: Optional[Path]) -> set:
    """The tasks of --include-path alone (indexing lm-eval's own ~13,000 takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return set()
    return set(TaskManager(include_path=str(include_path), include_defaults=False).all_subtasks)


def check_tasks(tasks: Sequence[str], include_path: Optional[Path], option: str = "--tasks") -> None:
    """Every task is one lm-eval task (not a group), known to lm-eval or in --include-path."""
    from lm_eval.tasks import TaskManager

    if set(tasks) <= local_tasks(include_path):
        return
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_subtasks)
    for task in tasks:
        if task in known:
            continue
        if task in set(manager.all_groups) | set(manager.all_tags):
            raise TimberConfigError(f"{option}: {task!r} is a group of lm-eval tasks; name its tasks one by one")
        where = f"lm-eval's tasks nor {include_path}" if include_path else "lm-eval's tasks (add --include-path DIR for local ones)"
        close = difflib.get_close_matches(task, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TimberConfigError(f"{option}: unknown lm-eval task {task!r}: not in {where}{hint}")


def has_chat_template(model: str) -> bool:
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(model), "chat_template", None))


def validate(request: SearchRequest) -> Tuple[str, str]:
    """Everything checked before any work: extra installed, recipe, tasks, ks. (Base, Instruct)."""
    require_extra()
    if request.include_path is not None and not request.include_path.is_dir():
        raise TimberConfigError(f"--include-path: {request.include_path} is not a folder")
    base, instruct = pair_of(request.recipe)
    check_tasks(request.tasks, request.include_path)
    if request.base_tasks is not None:
        if len(request.base_tasks) != len(request.tasks):
            raise TimberConfigError(
                f"--base-tasks: give one task per --tasks task ({len(request.tasks)}), got {len(request.base_tasks)}"
            )
        check_tasks(request.base_tasks, request.include_path, "--base-tasks")
    if request.ks and request.repeats is not None and max(request.ks) > request.repeats:
        raise TimberConfigError(f"--k: k={max(request.ks)} exceeds --repeats {request.repeats} (samples per problem)")
    return base, instruct


# --------------------------------------------------------------------------- sweep


def sweep_missing(request: SearchRequest, merge_options, say: Callable[[str], None]) -> List[Model]:
    """Every lambda's output under OUT/models/, merging only those not already made by this recipe."""
    root = request.out / "models"
    record_path = root / SWEEP_RECORD
    try:
        made = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made = {}
    recipe_id = hashlib.sha256(json.dumps(load_sweep_config(request.recipe), sort_keys=True).encode()).hexdigest()[:16]
    missing = [lam for lam in request.lambdas
               if made.get(output_name(lam)) != recipe_id or not (root / output_name(lam) / "config.json").is_file()]
    if missing:
        say(f"sweep: {len(missing)} lambda{'s' * (len(missing) > 1)} ({', '.join(f'{x:g}' for x in missing)}) "
            f"into {root}")
        run_sweep(request.recipe, root, missing, merge_options)
        made.update({output_name(lam): recipe_id for lam in missing})
        record_path.write_text(json.dumps(made, indent=2) + "\n", encoding="utf-8")
    else:
        say(f"sweep: every lambda's output already in {root}")
    return [Model(output_name(lam), str((root / output_name(lam)).resolve()), lam) for lam in request.lambdas]


# --------------------------------------------------------------------------- evaluations


def build_jobs(request: SearchRequest, models: Sequence[Model], device: str, backend: str) -> List[EvalJob]:
    evals = (request.out / "evals").resolve()
    local = local_tasks(request.include_path)
    jobs = []
    for model in models:
        is_base = model.label == "base"
        tasks = request.base_tasks if is_base and request.base_tasks else request.tasks
        jobs.append(EvalJob(
            label=model.label, model=model.path, tasks=tuple(tasks), as_tasks=tuple(request.tasks),
            include_path=str(request.include_path.resolve()) if request.include_path else None,
            lm_eval_tasks=not set(tasks) <= local,
            chat=has_chat_template(model.path), sampling=request.sampling, repeats=request.repeats,
            num_fewshot=request.num_fewshot, limit=request.limit, batch_size=request.batch_size,
            backend=backend, device=device, dtype=request.dtype, threads=request.threads,
            out=str(evals / model.label), fingerprint=model_fingerprint(model.path),
        ))
    return jobs


@dataclass
class Outcome:
    records: Dict[str, dict] = dataclasses.field(default_factory=dict)  # label -> record
    failures: Dict[str, str] = dataclasses.field(default_factory=dict)  # label -> reason


class Cluster:
    """Ray for the length of a search: embedded (started and stopped here) or joined."""

    def __init__(self, address: Optional[str], workers: Optional[int], threads: int):
        self.address, self.workers, self.threads = address, workers, threads

    def __enter__(self) -> "Cluster":
        import logging

        import ray

        env = {name: os.environ[name] for name in _WORKER_ENV if name in os.environ}
        common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                      runtime_env={"env_vars": env} if env else None)
        if self.address:
            try:
                ray.init(address=self.address, **common)
            except (ConnectionError, RuntimeError, ValueError) as error:
                first = str(error).strip().splitlines()
                raise TimberError(
                    f"cannot join the Ray cluster at {self.address} ({first[0] if first else type(error).__name__});"
                    " is `ray start --head` running there, and is this its address (as `ray start` printed it)?"
                ) from None
        else:
            cpus = self.workers or max(1, (os.cpu_count() or 1) // self.threads)
            # "local": a Ray of our own. Without an address, ray.init would join any Ray
            # already running on this machine (another search, a `ray start`).
            ray.init(address="local", num_cpus=cpus * self.threads, **common)
        return self

    def gpus(self) -> float:
        import ray

        return ray.cluster_resources().get("GPU", 0)

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()  # embedded: stops the local Ray; joined: only disconnects


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_and_backend(request: SearchRequest, gpus: float) -> Tuple[str, str]:
    import importlib.util

    device = request.device if request.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise TimberConfigError("--device cuda: the Ray cluster has no GPU")
    backend = request.backend
    if backend == "auto":
        backend = "vllm" if device == "cuda" and importlib.util.find_spec("vllm") else "hf"
    if backend == "vllm" and device != "cuda":
        raise TimberConfigError("--backend vllm runs on CUDA GPUs only; use --backend hf on CPUs")
    return device, backend


def run_evaluations(jobs: Sequence[EvalJob], say: Callable[[str], None]) -> Outcome:
    """Each job as a Ray task (a GPU each on CUDA); a failed one is reported and retried once.

    Ray's own retries are off (max_retries=0) so that the first failure is reported by
    model before the retry. Ctrl-C cancels the running tasks; finished ones are on disk.
    """
    import ray

    remote = ray.remote(evaluate)
    outcome = Outcome()
    pending: Dict[object, Tuple[EvalJob, int]] = {}

    def submit(job: EvalJob, attempt: int) -> None:
        ref = remote.options(num_cpus=job.threads, num_gpus=1 if job.device == "cuda" else 0, max_retries=0,
                             name=f"evaluate {job.label}").remote(job)
        pending[ref] = (job, attempt)

    todo = [job for job in jobs if not finished(job)]
    for job in todo:  # what an interrupted run left half-written
        for staging in Path(job.out).parent.glob(f".{Path(job.out).name}.partial-*"):
            shutil.rmtree(staging, ignore_errors=True)
    for job in jobs:
        if job not in todo:
            say(f"evaluation of {job.label}: already done with these settings, kept")
    for job in todo:
        submit(job, 1)
    if todo:
        say(f"evaluating {len(todo)} model{'s' * (len(todo) > 1)} with lm-eval as Ray tasks "
            f"({todo[0].backend} on {todo[0].device}; logs: {Path(todo[0].out).parent}/<model>.log)")
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job, attempt = pending.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as error:
                reason = failure_reason(error)
                if attempt == 1:
                    say(f"evaluation of {job.label} failed: {reason}; retrying once")
                    submit(job, 2)
                else:
                    say(f"evaluation of {job.label} failed again: {reason}")
                    outcome.failures[job.label] = reason
                continue
            outcome.records[job.label] = record
            say(f"evaluation of {job.label}: done in {record['seconds']:.0f} s")
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return outcome


def failure_reason(error) -> str:
    """One line: the exception a task raised, or how its worker died."""
    import ray

    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and cause is not None:
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)) or \
            "worker died" in str(error).lower() or "exited unexpectedly" in str(error).lower():
        return "its Ray worker died"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- the command


def run_search(request: SearchRequest, merge_options, say: Callable[[str], None]) -> "SearchResult":
    """Validate, sweep, evaluate, score; writes OUT/summary.md, passk.csv, best_lambda.csv, passk_vs_lambda.png."""
    from mergekit_timber.tools import search_report

    base, instruct = validate(request)
    request.out.mkdir(parents=True, exist_ok=True)
    address = ray_address(request.address)
    with contextlib.ExitStack() as stack:
        # A cluster is joined first (a wrong address stops before the sweep); a local Ray is
        # started only when something is left to evaluate (a finished search re-scores at once).
        cluster = stack.enter_context(Cluster(address, None, request.threads)) if address else None
        device, backend = device_and_backend(request, cluster.gpus() if cluster else local_gpus())
        lambdas = sweep_missing(request, merge_options, say)
        models = ([Model("base", base, None)] if request.with_base else []) + lambdas + [Model("instruct", instruct, None)]
        jobs = build_jobs(request, models, device, backend)
        if cluster is None and not all(finished(job) for job in jobs):
            stack.enter_context(Cluster(None, request.workers, request.threads))
        outcome = run_evaluations(jobs, say)
    done = [job for job in jobs if job.label not in outcome.failures]
    if not done:
        return SearchResult(None, outcome.failures)
    swept = {m.label: m.lam for m in models if m.lam is not None}
    summary = search_report.report(done, swept, request.ks, request.bootstrap, request.confidence, BOOTSTRAP_SEED,
                                   request.out, say)
    return SearchResult(summary, outcome.failures)


@dataclass
class SearchResult:
    summary: Optional[str]  # None when no evaluation finished
    failures: Dict[str, str]
