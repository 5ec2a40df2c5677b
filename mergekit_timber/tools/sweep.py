"""One-pass lambda sweeps: one decomposition per tensor, one output model per lambda.

Timber is linear in lambda (Timber(lambda) = (1-lambda)*Timber-L + lambda*Instruct), so
a single decomposition serves every lambda. `run_sweep` runs ONE real mergekit merge for
the first lambda (so its output is what `mergekit-yaml` writes) with a
TimberMerge instance of its own: it carries the other lambdas and a sink, is registered
under a name used by this merge alone, and is removed afterwards; the `timber` every
other merge uses stays stateless. The sink writes the other lambdas' outputs with
mergekit's own TensorWriter.
Afterwards each extra output gets the first output's non-weight files (the Instruct
model's config, tokenizer and generation config: mergekit_timber.integration.seam), its own model
card and a `mergekit_config.yml` that reproduces it alone with `mergekit-yaml`.
Every output is staged inside its own folder and published by the rules of a single
merge (mergekit_timber.integration.output_dir), once all of them are written.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import yaml

from mergekit_timber.checkpoint import open_written
from mergekit_timber.integration import dropin, finite, hub_layout, quantized, signals
from mergekit_timber.errors import SWEEP_METHOD_PREFIX, TimberConfigError
from mergekit_timber.method.parameters import LAMBDA
from mergekit_timber.checkpoint import is_weight_file
from mergekit_timber.integration.output_dir import display, writing_into

SIDE_SHARD_BYTES = 1_000_000_000

# Files of the first output written anew for each lambda (weights are written anew too).
_PER_OUTPUT = ("README.md", "mergekit_config.yml")


def output_name(lam: float) -> str:
    """`lambda-0.2`; the shortest exact form where 6 digits would merge two lambdas."""
    short = f"{lam:g}"
    return f"lambda-{short if float(short) == lam else repr(float(lam))}"


@dataclass
class SweepSession:
    """Writers for the lambdas after the first; its `save` is the sweep method's sink."""

    writers: List[object]
    lambdas: Sequence[float]  # of the writers, in order
    out_dtype: Optional[object] = None  # torch.dtype the config asks to write
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def save(self, name: str, tensors: Sequence) -> None:
        with self._lock:
            for index, (writer, tensor) in enumerate(zip(self.writers, tensors)):
                if self.out_dtype is not None:
                    tensor = tensor.to(self.out_dtype)
                # mergekit's writer holds it until its shard is flushed: on the host, so a
                # device keeps at most the current tensor of each extra output.
                tensor = tensor.to("cpu")
                # Finite as written (the first output is checked by the seam).
                finite.check_tensor(name, tensor, f" for lambda={self.lambdas[index]:g}")
                writer.save_tensor(name=name, tensor=tensor, clone=False)  # fresh outputs


def parse_lambdas(text: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TimberConfigError(f"--lambdas: expected numbers separated by commas; got {text!r}") from None
    if not values:
        raise TimberConfigError("--lambdas: give at least one value")
    for value in values:
        LAMBDA.check(value, prefix="--lambdas: ")
    if len(set(values)) != len(values):
        raise TimberConfigError(f"--lambdas: repeated value in {text!r}")
    if len({output_name(v) for v in values}) != len(values):  # one directory per lambda
        raise TimberConfigError(f"--lambdas: two values share an output directory in {text!r}")
    return values


def config_for(source: Dict, lam: float) -> Dict:
    """The sweep's config with one global lambda (every other lambda setting removed)."""
    config = copy.deepcopy(source)
    for model in config.get("models") or []:
        if isinstance(model, dict) and isinstance(model.get("parameters"), dict):
            model["parameters"].pop("lambda", None)
            if not model["parameters"]:
                del model["parameters"]
    config.setdefault("parameters", {})
    config["parameters"] = dict(config["parameters"] or {}, **{"lambda": lam})
    return config


def load_sweep_config(config_path: Path) -> Dict:
    text = Path(config_path).read_text(encoding="utf-8")
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise TimberConfigError(
            f"{config_path}: sweep takes a single-document mergekit YAML (got {len(documents)} documents)"
        )
    config = documents[0]
    if config.get("merge_method") != "timber":
        raise TimberConfigError(
            f"{config_path}: sweep needs merge_method: timber (got {config.get('merge_method')!r})"
        )
    if config.get("slices") or config.get("modules"):
        raise TimberConfigError(f"{config_path}: sweep supports models: configs, not slices/modules")
    return config


def run_sweep(config_path: Path, out_root: Path, lambdas: Sequence[float], options) -> List[Path]:
    """Write OUT/lambda-X/ for every lambda from one pass; return the output dirs.

    Every output is staged inside its folder and published only once all of them are
    written, each as a single merge's output is (mergekit_timber.integration.output_dir).
    """
    from mergekit.config import MergeConfiguration

    from mergekit_timber.integration import seam

    source = load_sweep_config(config_path)
    out_root = Path(out_root)
    outs = [out_root / output_name(lam) for lam in lambdas]
    texts = [yaml.safe_dump(config_for(source, lam), sort_keys=False) for lam in lambdas]
    configs = [MergeConfiguration.model_validate(yaml.safe_load(t)) for t in texts]
    targets = seam.prepare(configs[0], options, outs, texts[0])
    with signals.terminate_as_exception():
        try:
            _write_and_publish(targets, configs, texts, lambdas, options)
        finally:
            for target in reversed(targets):  # the last made folders first: parents empty last
                target.discard()  # staging folders of a sweep that failed
    return outs


def _write_and_publish(targets, configs, texts, lambdas, options) -> None:
    """Stage every output, write them all from one merge, then publish each."""
    from mergekit.common import dtype_from_name
    from mergekit.io.tensor_writer import TensorWriter

    from mergekit_timber.integration import seam

    stages = [target.open() for target in targets]
    # Each extra writer buffers up to one shard in memory: cap it, or mergekit's 5 GB
    # default would hold every extra output of a mid-sized model in RAM at once.
    side_shard = min(options.out_shard_size, SIDE_SHARD_BYTES) if options.out_shard_size > 0 else SIDE_SHARD_BYTES
    # The extra outputs keep the Instruct's tensor names and layout, as the first does (seam).
    instruct = seam.instruct_dir(configs[0], options)
    with hub_layout.written_like_instruct(instruct, stages[1:], trust_remote_code=options.trust_remote_code):
        writers = [
            TensorWriter(str(stage), max_shard_size=side_shard, safe_serialization=options.safe_serialization)
            for stage in stages[1:]
        ]
        # As the first output is written (seam): a block-FP8 merge rounds once, to read_dtype.
        exact = quantized.block_fp8_models(configs[0], options)
        out_name = quantized.read_dtype(configs[0]) if exact else configs[0].out_dtype
        out_dtype = dtype_from_name(out_name) if out_name else None
        session = SweepSession(writers=writers, lambdas=lambdas[1:], out_dtype=out_dtype)
        with _sweep_method(lambdas[1:], session.save) as method_name:
            # The card and mergekit_config.yml come from configs[0]/texts[0]: they name `timber`.
            seam.write_merge(configs[0], stages[0], options, texts[0], name=targets[0].name, run_as=method_name)

        with open_written(stages[0], "sweep output") as first_output:
            for stage, writer in zip(stages[1:], writers):
                with writing_into(stage):
                    # Tensors mergekit wrote without calling the method (non-float buffers,
                    # passthrough) do not depend on lambda: take them from the first output
                    # (both name them as the Instruct checkpoint does).
                    for name in sorted(set(first_output.names()) - hub_layout.written(stage)):
                        writer.save_tensor(name=name, tensor=first_output.tensor(name), clone=False)
                    writer.finalize()
    for index, stage in enumerate(stages[1:]):
        with seam._step(f"copying config and tokenizer into {display(stage)}"):
            _copy_non_weight_files(stages[0], stage)
        if options.write_model_card:  # every config names the same Instruct (only lambda differs)
            seam.write_card(stage, configs[index + 1], texts[index + 1], name=targets[index + 1].name,
                            options=options, instruct_dir=instruct)
        dropin.verify(stage, instruct, configs[index + 1], options, dropin.written_shapes(stage))
    for target in targets:
        target.publish()



_SWEEP_IDS = itertools.count(1)


@contextlib.contextmanager
def _sweep_method(extra_lambdas: Sequence[float], sink) -> Iterator[str]:
    """Register, for one merge, a `timber` that also computes `extra_lambdas` into `sink`.

    mergekit looks methods up by name (at planning and for every tensor, in every
    executor thread), so the instance gets a name no other merge uses; mergekit 0.1.5
    has no unregister, so its registry entry is removed by hand afterwards.
    """
    import mergekit_timber
    from mergekit import merge_methods
    from mergekit.merge_methods import registry
    from mergekit_timber.method.adapter import TimberMerge

    name = f"{SWEEP_METHOD_PREFIX}{next(_SWEEP_IDS)}-{id(sink):x}"
    merge_methods.register(
        TimberMerge(name, tail_removed=False, version=mergekit_timber.__version__,
                    extra_lambdas=extra_lambdas, sink=sink)
    )
    try:
        yield name
    finally:
        registry._METHODS.pop(name, None)


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name in _PER_OUTPUT or is_weight_file(item.name):
            continue
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
