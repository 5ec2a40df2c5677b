"""A Timber output keeps the Instruct checkpoint's own tensor names and layout.

mergekit 0.1.5 reads a tensor that its architecture names but the checkpoint does not
store by converting the checkpoint to the transformers-5 model layout
(`mergekit.architecture.conversion`, transformers' `conversion_mapping`): per-expert Hub
tensors (Qwen3-MoE `mlp.experts.{e}.gate_proj.weight`, Mixtral
`block_sparse_moe.experts.{e}.w1.weight`) arrive stacked (`mlp.experts.gate_up_proj`
[E, 2I, H]) and are written under that name. Only transformers 5 loads that; every
other tool expects the names the Instruct model is published under.

So for a Timber merge each tensor is written as the Instruct checkpoint stores it,
one tensor at a time as mergekit hands it to its `TensorWriter`:

- a name the Instruct checkpoint stores is written as it is (stacked stays stacked:
  Llama-4, Qwen3-VL-MoE, Granite's `input_linear`; dense models are untouched);
- any other name goes through the reverse of the very conversion mergekit read it
  with: transformers' mapping for the Instruct's `model_type`, reversed as
  `transformers.core_model_loading.revert_weight_conversion` reverses it for
  `save_pretrained` (reverse transforms, converters first, then renamings). A stacked
  tensor becomes its per-expert tensors right there; where the reverse fuses several
  tensors into one stored tensor, the parts are held until the last one arrives;
- every name a reversal produces must be one the Instruct checkpoint stores (the same
  name, or the same with another layer index for sliced merges), with the same shape;
  otherwise the merge stops with one line naming the tensor.

Hook-in: `TensorWriter.save_tensor` is wrapped once (`install`, called by the first
Timber merge of the process); the wrapper acts only
for a writer whose output directory a Timber merge registered (`written_like_instruct`,
entered by mergekit_timber.integration.seam around mergekit's merge and by the sweep around its
extra writers). Every other writer, hence every non-Timber merge, gets mergekit's own
method with the same arguments.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from mergekit_timber.checkpoint import first_line
from mergekit_timber.errors import TimberOutputError

LOG = logging.getLogger(__name__)

# The one private mergekit name this module touches, with the parameters it passes on.
PATCHED = "mergekit.io.tensor_writer.TensorWriter.save_tensor"
_PATCHED_PARAMS = ("self", "name", "tensor", "clone")

_LAYER = re.compile(r"\.(\d+)\.")


def _layer_template(name: str) -> str:
    """`model.layers.3.mlp...` -> `model.layers.#.mlp...` (slices renumber layers)."""
    return _LAYER.sub(".#.", name, count=1)


class InstructLayout:
    """The Instruct checkpoint's stored tensors and the reverse of the conversion mergekit reads it with."""

    def __init__(self, stored: Mapping[str, Optional[Tuple[int, ...]]], model_type: Optional[str],
                 config=None, source: str = "the Instruct model"):
        self.stored = dict(stored)  # name -> shape (None where the format gives none without reading)
        self.templates = {_layer_template(n): s for n, s in self.stored.items()}
        self.model_type, self.config, self.source = model_type, config, source
        self.renamings, self.converters = _reverse_mapping(model_type)
        self._by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    @classmethod
    def of_checkpoint(cls, directory: Path, *, trust_remote_code: bool = False) -> "InstructLayout":
        directory = Path(directory)
        stored = _stored_tensors(directory)
        try:
            model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            model_type = None
        config = None
        if model_type and _reverse_mapping(model_type) != ([], []):
            from transformers import AutoConfig  # a few ops read it (Chunk(num_shards_attribute))

            try:
                config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
            except Exception as error:  # noqa: BLE001 - the common ops need none
                LOG.debug("no transformers config for %s: %s", directory, error)
        return cls(stored, model_type, config, source=str(directory))

    @property
    def converts(self) -> bool:
        return bool(self.renamings or self.converters)

    def revert(self, name: str, tensor: torch.Tensor, pending: Dict[str, object]) -> List[Tuple[str, torch.Tensor]]:
        """(name, tensor) pieces to write for mergekit's `name`, as the Instruct stores them.

        `pending` holds, per writer, the parts of a stored tensor that the reverse fuses
        from several of mergekit's tensors until the last part arrives ([] until then).
        """
        if name in self.stored or not self.converts:
            return [(name, tensor)]
        from transformers.core_model_loading import apply_converters, apply_renamings

        renamed, pattern = apply_converters(name, self.converters)
        if pattern is None:
            pieces = [(apply_renamings(name, self.renamings), tensor)]
        else:
            converter = pending.get(renamed)
            if converter is None:
                converter = pending[renamed] = copy.deepcopy(self._by_pattern[pattern])
            converter.add_tensor(renamed, name, pattern, tensor)
            if any(p not in converter.collected_tensors for p in converter.source_patterns):
                return []  # the other parts of this stored tensor come later
            del pending[renamed]
            try:
                converted = converter.convert(renamed, model=_StoredShapes(self), config=self.config)
            except Exception as error:  # one line naming the tensor, not transformers' traceback
                raise TimberOutputError(
                    f"{name}: transformers' reverse conversion for {self.model_type} failed: {first_line(error)}"
                ) from error
            pieces = [
                (apply_renamings(key, self.renamings), value[0] if isinstance(value, list) else value)
                for key, value in converted.items()
            ]
        if not unchanged(pieces, name, tensor):
            for piece, value in pieces:
                self._check(name, piece, tuple(value.shape))
        return pieces

    def _check(self, merged: str, piece: str, shape: Tuple[int, ...]) -> None:
        want = self.stored.get(piece, self.templates.get(_layer_template(piece), _ABSENT))
        if want is _ABSENT:
            problem = "a tensor the Instruct checkpoint does not store"
        elif want is not None and tuple(want) != shape:
            problem = f"shape {list(shape)} where the Instruct checkpoint stores {list(want)}"
        else:
            return
        raise TimberOutputError(
            f"{merged}: transformers' reverse conversion for {self.model_type} writes it as {piece}, "
            f"{problem} ({self.source}); the output would not load where the Instruct model does"
        )


_ABSENT = object()


class _StoredShapes:
    """What a reverse op asks the model for (`get_parameter(name).shape`, e.g. Transpose
    with check_dims), answered with the Instruct checkpoint's stored shape of `name`."""

    def __init__(self, layout: InstructLayout):
        self.layout = layout

    def get_parameter(self, name: str):
        shape = self.layout.stored.get(name) or self.layout.templates.get(_layer_template(name))
        if shape is None:
            raise AttributeError(f"the Instruct checkpoint stores no {name} (or its shape is unknown)")
        return torch.empty(shape, device="meta")


def unchanged(pieces: Sequence[Tuple[str, torch.Tensor]], name: str, tensor: torch.Tensor) -> bool:
    """Whether `pieces` is `tensor` itself under `name` (no reversal applied)."""
    return len(pieces) == 1 and pieces[0][0] == name and pieces[0][1] is tensor


def _reverse_mapping(model_type: Optional[str]):
    """(renamings, converters) reversing transformers' checkpoint conversion for `model_type`,
    in the order revert_weight_conversion applies them."""
    if not model_type:
        return [], []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    transforms = get_checkpoint_conversion_mapping(model_type) or []
    # As revert_weight_conversion for a model not loaded by from_pretrained: no prefix
    # is added back (whether the checkpoint had it is unknown; the check below tells).
    transforms = [t for t in transforms if not isinstance(t, PrefixChange)]
    reverse = [t.reverse_transform() for t in transforms[::-1]]
    return (
        [t for t in reverse if isinstance(t, WeightRenaming)],
        [t for t in reverse if isinstance(t, WeightConverter)],
    )


def _stored_tensors(directory: Path) -> Dict[str, Optional[Tuple[int, ...]]]:
    """name -> shape of a checkpoint, from the safetensors headers (no data read);
    names only (shape None) for pickled checkpoints, from mergekit's own index."""
    from mergekit_timber.checkpoint import Checkpoint

    if any(directory.glob("*.safetensors")):
        with Checkpoint(directory, "instruct") as checkpoint:
            return {name: checkpoint.info(name)[0] for name in checkpoint.names()}
    from mergekit.io import ShardedTensorIndex

    return {name: None for name in ShardedTensorIndex.from_disk(str(directory)).tensor_paths}


# --------------------------------------------------------------------------- the writers


class _Target:
    """One output directory being written for a Timber merge."""

    def __init__(self, layout: InstructLayout):
        self.layout = layout
        self.pending: Dict[str, object] = {}
        self.written: Set[str] = set()
        self.lock = threading.Lock()


_TARGETS: Dict[str, _Target] = {}
_TARGETS_LOCK = threading.Lock()
_ORIGINAL = None  # mergekit's TensorWriter.save_tensor, once install() has run


def _key(directory) -> str:
    return os.path.realpath(os.fspath(directory))


def install() -> bool:
    """Wrap TensorWriter.save_tensor (once); False, mergekit left alone, if it is not as expected."""
    global _ORIGINAL
    from mergekit.io.tensor_writer import TensorWriter

    current = TensorWriter.save_tensor
    if getattr(current, "_timber_hub_layout", False):
        _ORIGINAL = current.__wrapped__
        return True
    if tuple(inspect.signature(current).parameters) != _PATCHED_PARAMS:
        LOG.warning("mergekit-timber: %s%s not found; Timber outputs cannot keep the Instruct's tensor names",
                    PATCHED, _PATCHED_PARAMS)
        return False
    _ORIGINAL = current

    def save_tensor(self, name: str, tensor: torch.Tensor, clone: bool = False):
        target = _TARGETS.get(_key(self.out_path)) if _TARGETS else None
        if target is None:  # not a Timber output: mergekit's own method, same arguments
            return current(self, name, tensor, clone)
        with target.lock:
            pieces = target.layout.revert(name, tensor, target.pending)
            target.written.update(piece for piece, _ in pieces)
        split = not unchanged(pieces, name, tensor)
        for piece, value in pieces:
            # Pieces are views of one merged tensor where they can be: safetensors writes
            # each view's bytes only; a pickled shard would store the whole storage.
            current(self, piece, value, clone or (split and not self.safe_serialization))

    save_tensor.__wrapped__ = current
    save_tensor._timber_hub_layout = True
    TensorWriter.save_tensor = save_tensor
    return True


@contextlib.contextmanager
def written_like_instruct(instruct_dir: Path, out_dirs: Sequence[Path], *,
                          trust_remote_code: bool = False) -> Iterator[InstructLayout]:
    """While inside, TensorWriters writing into `out_dirs` write the Instruct's names and layout."""
    layout = InstructLayout.of_checkpoint(Path(instruct_dir), trust_remote_code=trust_remote_code)
    # Installed for every Timber output, also one that converts nothing: `written` (the
    # sweep's record of what it wrote) sees only what the wrapper saw.
    if _ORIGINAL is None and not install():
        raise TimberOutputError(
            f"{PATCHED} is not as mergekit 0.1.5 has it: the output could not keep the tensor "
            f"names of {instruct_dir}"
        )
    keys = [_key(d) for d in out_dirs]
    targets = [_Target(layout) for _ in keys]
    with _TARGETS_LOCK:
        busy = [k for k in keys if k in _TARGETS]
        if busy:
            raise TimberOutputError(f"{busy[0]} is already being written by another Timber merge")
        _TARGETS.update(zip(keys, targets))
    try:
        yield layout
        for key, target in zip(keys, targets):
            if target.pending:
                waiting = sorted(target.pending)[0]
                raise TimberOutputError(
                    f"{waiting}: mergekit wrote only some of the tensors {instruct_dir} stores it "
                    "from; the output would miss it"
                )
    finally:
        with _TARGETS_LOCK:
            for key in keys:
                _TARGETS.pop(key, None)


def written(out_dir: Path) -> Set[str]:
    """Names written so far into a registered `out_dir`, as stored (after reversal)."""
    target = _TARGETS.get(_key(out_dir))
    if target is None:
        raise KeyError(f"{out_dir} is not being written by a Timber merge")
    with target.lock:
        return set(target.written)

