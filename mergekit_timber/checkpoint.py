"""Lazy, tensor-at-a-time reading of safetensors model directories.

The one reader of checkpoint directories in mergekit-timber (analyze, sweep, preflight,
tests, benchmark): sharded (``model.safetensors.index.json``) or not, headers read
without loading data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from mergekit_timber.errors import TimberInputError

if TYPE_CHECKING:  # torch is imported by safetensors when a tensor is read
    import torch

# Every safetensors dtype a checkpoint may hold: header tag -> (bytes per element, torch
# name, whether it holds weight values). The one dtype table; the names below are views of it.
SAFETENSORS_DTYPES: Dict[str, Tuple[int, str, bool]] = {
    "F64": (8, "float64", True), "F32": (4, "float32", True), "F16": (2, "float16", True),
    "BF16": (2, "bfloat16", True), "F8_E4M3": (1, "float8_e4m3fn", True),
    "F8_E5M2": (1, "float8_e5m2", True), "F8_E8M0": (1, "float8_e8m0fnu", False),  # scales only
    "I64": (8, "int64", False), "I32": (4, "int32", False), "I16": (2, "int16", False),
    "I8": (1, "int8", False), "U8": (1, "uint8", False), "U16": (2, "uint16", False),
    "U32": (4, "uint32", False), "U64": (8, "uint64", False), "BOOL": (1, "bool", False),
}  # fmt: skip
# Tags of floating weight values (what layout may refine).
FLOATING_TAGS = frozenset(tag for tag, (_, _, values) in SAFETENSORS_DTYPES.items() if values)
# The dtypes mergekit computes in (its dtype_from_name): name -> tag.
MERGE_DTYPES: Dict[str, str] = {
    name: tag for tag, (size, name, values) in SAFETENSORS_DTYPES.items() if values and size >= 2
}
# The floating dtypes checkpoints are written in here: name (as config.json, mergekit's
# dtype:/out_dtype: and torch spell it) -> safetensors header tag.
DTYPES: Dict[str, str] = {name: MERGE_DTYPES[name] for name in ("bfloat16", "float16", "float32")}


def dtype_name(dtype: "torch.dtype") -> str:
    """torch.bfloat16 -> "bfloat16" (torch.<name> is the dtype of a name in DTYPES)."""
    return str(dtype).replace("torch.", "")

# The files of a model folder by kind: the one such table (output_dir, dropin, card and
# the dequantizer read it). Weight shards and indexes as mergekit's TensorWriter and
# transformers' save_pretrained name them:
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # any checkpoint's shards, whatever their names
GENERATION_CONFIG = "generation_config.json"
# mergekit's tokenizer copy (merge._copy_tokenizer) copies these from the donor, byte for
# byte (and GENERATION_CONFIG).
MERGEKIT_TOKENIZER_COPY = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "video_preprocessor_config.json",
)  # fmt: skip
# Files any tokenizer saved by transformers leaves: one of them is a tokenizer to copy.
TOKENIZER_CORE = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# The other files of a model output: config, generation config, tokenizer and chat
# template, mergekit's tagalong files, the recipe (README.md, the card, apart).
MODEL_FILES = frozenset((
    "config.json", GENERATION_CONFIG, *MERGEKIT_TOKENIZER_COPY, *TOKENIZER_CORE,
    "preprocessor_config.json", "mergekit_config.yml",
))  # fmt: skip
MODEL_FOLDERS = frozenset(("additional_chat_templates",))  # transformers 5 tokenizer saves


def is_weight_file(name: str) -> bool:
    """A weight shard or shard index as mergekit writes it, by file name."""
    return bool(WEIGHT_FILE.match(name)) or name in INDEX_FILES


def looks_like_weights(name: str) -> bool:
    """Any checkpoint's weight shard or shard index, by suffix."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(tuple(s + ".index.json" for s in WEIGHT_SUFFIXES))


# What the Hub accepts as a repo id: org/name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(ref: str) -> bool:
    """Whether `ref` is spelled as a Hub repo id (org/name); "./x", "/x", "~/x", "a/b/c" are not.

    Spelling only: whether a ref IS a local model is decided by `resolve_model`, as
    mergekit decides it (a local path when it exists, else a Hub id).
    """
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "~")) and not os.path.isabs(ref)


def resolve_model(ref: str, role: str, fetch: Optional[Callable[[], str]] = None) -> Path:
    """A local model directory for `ref`, decided as mergekit decides it: the local folder
    when `ref` exists, else a Hub id, downloaded by `fetch` (default: the model's json and
    safetensors files). A local folder `org/` does not make `org/name` a local path."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TimberInputError(f"{role} {ref!r} is not a directory")
    if not looks_like_hub_id(ref):
        raise TimberInputError(f"{role} {ref!r}: no such directory ({path.absolute()})")
    try:
        if fetch is not None:
            return Path(fetch())
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # one line, whatever the hub library raised
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise TimberInputError(
            f"{role} {ref!r} is not a local directory ({path.absolute()} does not exist) and the "
            f"Hugging Face Hub could not provide it as a repo id: {type(exc).__name__}: {reason}"
        ) from None


def local_dir(ref, options) -> Path:
    """A merge's model (a mergekit ModelReference) as a local directory, found as mergekit
    finds it (a Hub id is fetched into its cache): the lookup of the seam, preflight (which
    words its failures through resolve_model) and the block-FP8 check."""
    return Path(ref.local_path(cache_dir=options.transformers_cache, ignore_lora=True))


class Checkpoint:
    """Lazy, tensor-at-a-time access to a safetensors model directory."""

    def __init__(self, directory: Path, role: str):
        self.directory, self.role = Path(directory), role
        index = self.directory / "model.safetensors.index.json"
        self.files: Dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map") or {}
            except (OSError, ValueError, AttributeError) as exc:
                raise TimberInputError(f"{role} {index}: unreadable index: {first_line(exc)}") from None
            self.files = {name: self.directory / f for name, f in weight_map.items()}
            missing = sorted({str(p.name) for p in self.files.values() if not p.is_file()})
            if missing:
                raise TimberInputError(
                    f"{role} {self.directory}: shard {missing[0]} listed in "
                    "model.safetensors.index.json is missing"
                )
        else:
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                raise TimberInputError(
                    f"{role} {self.directory}: no *.safetensors weights found "
                    "(analyze reads safetensors checkpoints only)"
                )
            from safetensors import safe_open

            for shard in shards:
                try:
                    with safe_open(str(shard), framework="pt") as fh:
                        names = list(fh.keys())
                except Exception as exc:
                    raise _unreadable(role, shard, exc) from None
                for name in names:
                    self.files[name] = shard
        self._stack = contextlib.ExitStack()
        self._handles: Dict[Path, Any] = {}

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as exc:
                raise _unreadable(self.role, file, exc) from None
        return self._handles[file]

    def names(self) -> List[str]:
        return list(self.files)

    def info(self, name: str) -> Tuple[Tuple[int, ...], str]:
        """(shape, safetensors dtype string) from the header, without reading data."""
        handle = self._handle(name)
        try:
            sl = handle.get_slice(name)
        except Exception as exc:  # an index naming a tensor its shard lacks
            raise TimberInputError(
                f"{self.role} {self.files[name]}: tensor {name}: {first_line(exc)}"
            ) from None
        return tuple(sl.get_shape()), str(sl.get_dtype())

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def config(self) -> dict:
        path = self.directory / "config.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}
        except RecursionError:  # json nests by recursion: transformers would fail the same way
            raise TimberInputError(
                f"{self.role} {path}: nested too deeply to read (Python's recursion limit)"
            ) from None

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _unreadable(role: str, file: Path, exc: BaseException) -> TimberInputError:
    return TimberInputError(
        f"{role} {file.parent}: {file.name} is not a readable safetensors file "
        f"(truncated or corrupt?): {first_line(exc)}"
    )


class PickledShards:
    """The ``*.bin`` shards mergekit writes with ``--no-safe-serialization``, read as a
    Checkpoint is (names, tensor by name); memory-mapped, so a tensor is read when used."""

    def __init__(self, directory: Path):
        import torch

        self.directory = Path(directory)
        self._tensors: Dict[str, torch.Tensor] = {}
        for shard in sorted(self.directory.glob("*.bin")):
            self._tensors.update(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))

    def names(self) -> List[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> "torch.Tensor":
        return self._tensors[name]

    def close(self) -> None:
        self._tensors.clear()

    def __enter__(self) -> "PickledShards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_written(directory: Path, role: str):
    """A model directory mergekit wrote: its safetensors shards, else its ``*.bin`` ones."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")) or not any(directory.glob("*.bin")):
        return Checkpoint(directory, role)
    return PickledShards(directory)
