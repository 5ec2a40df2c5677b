"""One-pass lambda sweeps: one decomposition per tensor, one output model per lambda.

Timber is linear in lambda (SPEC: Timber(lambda) = (1-lambda)*TimberL + lambda*Instruct),
so a single decomposition serves every lambda. `run_sweep` runs ONE real mergekit merge
for the first lambda (so config, tokenizer and card are exactly mergekit's); while it
runs, the Timber method also computes the other lambdas from the same decomposition
and hands them to this module, which writes them with mergekit's own TensorWriter.
Afterwards each extra output gets the first output's non-weight files, its own model
card and a `mergekit_config.yml` that reproduces it alone with `mergekit-yaml`.
"""

from __future__ import annotations

import copy
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from mergekit_timber.errors import TimberConfigError

_active: Optional["SweepSession"] = None

SIDE_SHARD_BYTES = 1_000_000_000

# Files of the first output that are per-lambda (written anew) or weights.
_PER_OUTPUT = ("README.md", "mergekit_config.yml")


def active_sweep() -> Optional["SweepSession"]:
    return _active


def output_name(lam: float) -> str:
    """`lambda-0.2`; the shortest exact form where 6 digits would merge two lambdas."""
    short = f"{lam:g}"
    return f"lambda-{short if float(short) == lam else repr(float(lam))}"


@dataclass
class SweepSession:
    """Writers for the lambdas after the first; fed tensor by tensor by the method."""

    other_lambdas: Sequence[float]
    writers: List[object]
    out_dtype: Optional[object] = None  # torch.dtype the config asks to write
    saved: List[set] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.saved = [set() for _ in self.writers]

    def save(self, name: str, tensors: Sequence) -> None:
        with self._lock:
            for index, (writer, tensor) in enumerate(zip(self.writers, tensors)):
                if self.out_dtype is not None:
                    tensor = tensor.to(self.out_dtype)
                writer.save_tensor(name=name, tensor=tensor, clone=False)  # fresh outputs
                self.saved[index].add(name)


def parse_lambdas(text: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TimberConfigError(f"--lambdas: expected numbers separated by commas; got {text!r}") from None
    if not values:
        raise TimberConfigError("--lambdas: give at least one value")
    for value in values:
        if not 0 <= value <= 1:
            raise TimberConfigError(f"--lambdas: lambda must lie in [0, 1]; got {value:g}")
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
    """Write OUT/lambda-X/ for every lambda from one pass; return the output dirs."""
    global _active
    import mergekit_timber  # noqa: F401 - registers timber with mergekit
    from mergekit.card import generate_card
    from mergekit.common import dtype_from_name
    from mergekit.config import MergeConfiguration
    from mergekit.io.tensor_writer import TensorWriter
    from mergekit.merge import run_merge

    source = load_sweep_config(config_path)
    out_root = Path(out_root)
    outs = [out_root / output_name(lam) for lam in lambdas]
    for out in outs:
        if out.exists() and any(out.iterdir()):
            raise TimberConfigError(f"{out}: exists and is not empty; choose a new OUT")
    texts = [yaml.safe_dump(config_for(source, lam), sort_keys=False) for lam in lambdas]
    configs = [MergeConfiguration.model_validate(yaml.safe_load(t)) for t in texts]

    # Each extra writer buffers up to one shard in memory: cap it, or mergekit's 5 GB
    # default would hold every extra output of a mid-sized model in RAM at once.
    side_shard = min(options.out_shard_size, SIDE_SHARD_BYTES) if options.out_shard_size > 0 else SIDE_SHARD_BYTES
    writers = [
        TensorWriter(
            str(out),
            max_shard_size=side_shard,
            safe_serialization=options.safe_serialization,
        )
        for out in outs[1:]
    ]
    out_dtype = dtype_from_name(configs[0].out_dtype) if configs[0].out_dtype else None
    session = SweepSession(other_lambdas=list(lambdas[1:]), writers=writers, out_dtype=out_dtype)
    if _active is not None:
        raise RuntimeError("a sweep is already running in this process")
    _active = session
    try:
        run_merge(configs[0], str(outs[0]), options=options, config_source=texts[0])
    finally:
        _active = None

    first_tensors = _tensor_files(outs[0])
    for index, (out, writer) in enumerate(zip(outs[1:], writers)):
        # Tensors mergekit wrote without calling the method (non-float buffers,
        # passthrough) do not depend on lambda: take them from the first output.
        for name in sorted(set(first_tensors) - session.saved[index]):
            writer.save_tensor(name=name, tensor=_read(first_tensors[name], name), clone=False)
        writer.finalize()
        _copy_non_weight_files(outs[0], out)
        config, text = configs[index + 1], texts[index + 1]
        if options.write_model_card:
            (out / "README.md").write_text(generate_card(config, text, name=out.name), encoding="utf-8")
            (out / "mergekit_config.yml").write_text(text, encoding="utf-8")
    return outs


def _tensor_files(model_dir: Path) -> Dict[str, Path]:
    from safetensors import safe_open

    names = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            names.update({key: file for key in fh.keys()})
    return names


def _read(file: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return fh.get_tensor(name)


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name in _PER_OUTPUT or item.suffix == ".safetensors" or item.name.endswith(
            (".safetensors.index.json", ".bin", ".bin.index.json")
        ):
            continue
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
