"""Which checkpoint tensors Timber refines, and how each splits into matrices.

The one rule, shared by the merge (mergekit_timber.method.adapter) and `mergekit-timber
analyze`. Timber decomposes each linear map of the forward pass (SPEC: one
decomposition per projection; for MoE, per expert and per projection):

- not refined (the instruct tensor is kept): non-floating tensors, tensors of fewer
  than 2 dimensions (norms, biases), stacked biases (a name ending in ``bias``, e.g.
  gpt-oss ``experts.gate_up_proj_bias`` [E, 2I]), empty tensors, and vocabulary-sized
  tensors (embeddings, lm_head) when ``refine_embeddings`` is false;
- a 2-D tensor is one matrix, also a dense fused projection stored as one linear layer
  (Phi-3 ``qkv_proj``, ``gate_up_proj``): decomposed as stored, as the authors' script;
- a stacked expert tensor splits per expert, and a fused one also per projection, as
  the architecture's forward slices it (transformers' conversion mapping, or the\n  table below for what it does not cover, by config ``model_type``);
- a convolution kernel (Mamba ``conv1d``, vision patch embeddings) is read as
  [out, -1], as the authors' script reshapes tensors of more than 2 dimensions;
- any other tensor of 3 or more dimensions stops the merge with one line naming it
  and its shape: its layout is unknown, and a guess could silently be wrong.

The names and layouts are those mergekit 0.1.5 hands a merge method: mergekit reads
a tensor under the name its architecture lists, from the checkpoint as stored when
the name is there, else converted to the transformers-5 model layout (per-expert Hub
tensors become stacked ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
[E, H, I]). Analyze reads checkpoints as stored: the same table covers both. The
output goes back to the Instruct checkpoint's own names and layout as it is written
(mergekit_timber.integration.hub_layout, with transformers' reverse conversion, not this table).
"""

from __future__ import annotations

import functools
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_timber.errors import TimberInputError


@dataclass(frozen=True)
class Architecture:
    """What the layout depends on, read from a model's config."""

    model_type: Optional[str] = None
    text_model_type: Optional[str] = None
    hidden_size: Optional[int] = None

    @property
    def label(self) -> str:
        return self.model_type or "an unknown architecture"


UNKNOWN = Architecture()


def architecture_of(config: Mapping[str, Any]) -> Architecture:
    """The Architecture of a config.json dict (multimodal: its text model's hidden size)."""
    text = config.get("text_config") or {}
    hidden = text.get("hidden_size") or config.get("hidden_size")
    return Architecture(
        model_type=config.get("model_type") or None,
        text_model_type=text.get("model_type") or None,
        hidden_size=int(hidden) if isinstance(hidden, int) else None,
    )


@dataclass(frozen=True)
class Experts:
    """A stacked expert tensor: experts on axis 0, each expert's matrix on axes 1-2.

    ``parts`` names the projections concatenated along ``fused_axis`` in stored order
    (one part: not fused); ``interleaved`` means rows/columns alternate part by part
    (gpt-oss: gate = [..., ::2], up = [..., 1::2]) instead of one block per part.
    ``hidden_axis`` is the axis of length hidden_size, checked against the config so
    that a checkpoint in an unexpected orientation stops instead of being misread.
    """

    parts: Tuple[str, ...]
    hidden_axis: int
    fused_axis: Optional[int] = None
    interleaved: bool = False

    def describe(self) -> str:
        if len(self.parts) == 1:
            return f"per expert ({self.parts[0]})"
        how = "interleaved" if self.interleaved else "concatenated"
        return f"per expert and per projection ({', '.join(self.parts)} {how} on axis {self.fused_axis})"


# [E, 2I, H], gate rows then up rows, forward: linear(x, W[e]).chunk(2, dim=-1); down [E, H, I].
_GATE_UP_ROWS = Experts(("gate_proj", "up_proj"), hidden_axis=2, fused_axis=1)
_DOWN_ROWS = Experts(("down_proj",), hidden_axis=1)
# [E, H, 2I], gate columns then up columns, forward: (x @ W[e]).chunk(2, dim=-1); down [E, I, H].
_GATE_UP_COLS = Experts(("gate_proj", "up_proj"), hidden_axis=1, fused_axis=2)
_DOWN_COLS = Experts(("down_proj",), hidden_axis=2)
# gpt-oss: [E, H, 2I] with gate/up columns alternating: gate = [..., ::2], up = [..., 1::2].
_GATE_UP_COLS_INTERLEAVED = Experts(("gate_proj", "up_proj"), hidden_axis=1, fused_axis=2, interleaved=True)

_GATE_UP = re.compile(r"(^|\.)experts\.gate_up_proj$")
_DOWN = re.compile(r"(^|\.)experts\.down_proj$")
_STACKED_EXPERTS = ((_GATE_UP, _GATE_UP_ROWS), (_DOWN, _DOWN_ROWS))
_STACKED_EXPERTS_COLS = ((_GATE_UP, _GATE_UP_COLS), (_DOWN, _DOWN_COLS))

# Most MoE checkpoints store one matrix per expert, and transformers' conversion mapping
# (the one mergekit 0.1.5 reads them through) stacks them: `converted_layout` reads the
# layout off that mapping. Our own table, model_type -> (name pattern, layout), holds only
# what it does not cover: checkpoints stored stacked (or renamed) in their own layout.
# Each entry was read off the experts class of transformers 5 (modeling_<type>.py:
# parameter shapes and the forward's slicing).
LAYOUTS: Dict[str, Tuple[Tuple[re.Pattern, Experts], ...]] = {
    "qwen3_5_moe": _STACKED_EXPERTS,  # stored stacked as [E, 2I, H] / [E, H, I]
    # Granite MoE: the checkpoint stores block_sparse_moe.input_linear.weight [E, 2I, H]
    # (gate then up) and output_linear.weight [E, H, I]; transformers 5 renames them to
    # experts.gate_up_proj / experts.down_proj, same layout.
    **{
        model_type: _STACKED_EXPERTS + (
            (re.compile(r"(^|\.)block_sparse_moe\.input_linear\.weight$"), _GATE_UP_ROWS),
            (re.compile(r"(^|\.)block_sparse_moe\.output_linear\.weight$"), _DOWN_ROWS),
        )
        for model_type in ("granitemoe", "granitemoeshared", "granitemoehybrid")
    },
    # Llama 4 (Llama4TextExperts): gate_up_proj [E, H, 2I], down_proj [E, I, H], x @ W.
    "llama4": _STACKED_EXPERTS_COLS,
    # Aria: the checkpoint's experts.fc1/fc2 are renamed gate_up_proj/down_proj, x @ W.
    **{
        model_type: (
            (re.compile(r"(^|\.)experts\.(gate_up_proj|fc1\.weight)$"), _GATE_UP_COLS),
            (re.compile(r"(^|\.)experts\.(down_proj|fc2\.weight)$"), _DOWN_COLS),
        )
        for model_type in ("aria", "aria_text")
    },
    # Qwen3-VL-MoE: the checkpoint stores [E, H, 2I] / [E, I, H] under the model's own
    # names, so mergekit reads it as stored (transformers transposes on load).
    "qwen3_vl_moe": _STACKED_EXPERTS_COLS,
    "gpt_oss": ((_GATE_UP, _GATE_UP_COLS_INTERLEAVED), (_DOWN, _DOWN_COLS)),
}
LAYOUTS["llama4_text"] = LAYOUTS["llama4"]

# 2-D tensors that stack experts along axis 0 (DBRX: ffn.experts.mlp.w1/v1/w2
# [E*I, H]): read as one matrix they would mix experts; not supported, so they stop.
UNSUPPORTED: Dict[str, re.Pattern] = {
    "dbrx": re.compile(r"(^|\.)experts\.mlp\.(w1|v1|w2)$"),
}

@functools.lru_cache(maxsize=None)
def converted_layout(model_type: Optional[str]) -> Tuple[Tuple[re.Pattern, Experts], ...]:
    """The stacked experts transformers' conversion mapping builds for `model_type`: the
    per-expert gate and up matrices merged (MergeModulelist(dim=0)) and concatenated
    (Concatenate(dim=1)) into experts.gate_up_proj [E, 2I, H], gate rows first, and the
    down matrices into experts.down_proj [E, H, I]; () when it builds neither."""
    if not model_type:
        return ()
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:  # pragma: no cover - transformers comes with mergekit
        return ()
    found = set()
    for step in get_checkpoint_conversion_mapping(model_type) or ():
        if not isinstance(step, WeightConverter):
            continue
        ops = [(type(op), getattr(op, "dim", None)) for op in step.operations]
        targets, sources = list(step.target_patterns), list(step.source_patterns)
        if len(targets) != 1:
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(sources) == 2 \
                and ops == [(MergeModulelist, 0), (Concatenate, 1)]:
            found.add("gate_up")
        elif targets[0].endswith("experts.down_proj") and len(sources) == 1 and ops == [(MergeModulelist, 0)]:
            found.add("down")
    return _STACKED_EXPERTS if found == {"gate_up", "down"} else ()


# Convolution modules of transformers models (nn.Conv1d/2d/3d weights): one kernel,
# read as [out, -1] like the authors' script reads every tensor of > 2 dimensions.
_CONVOLUTION = re.compile(
    r"(^|\.)(conv1d|conv|conv1|conv2|patch_conv|patch_embedding|patch_embed\.proj|"
    r"patch_embeddings\.projection)\.weight$"
)


@dataclass(frozen=True)
class Split:
    """How one checkpoint tensor maps to the [B, m, n] matrices Timber decomposes."""

    refined: bool
    why: str  # what the tensor is, in words (README table, analyze, logs)
    experts: Optional[Experts] = None

    def matrices(self, tensor: torch.Tensor) -> torch.Tensor:
        """The [B, m, n] stack: one matrix, or per part (outer) and per expert (inner)."""
        lay = self.experts
        if lay is None:
            return tensor.reshape(1, tensor.shape[0], -1)
        if len(lay.parts) == 1:
            return tensor
        p, axis = len(lay.parts), lay.fused_axis
        width = tensor.shape[axis] // p
        split = (width, p) if lay.interleaved else (p, width)
        grid = tensor.unflatten(axis, split)  # [E, ., ., .] with a part axis
        part_axis = axis + 1 if lay.interleaved else axis
        stack = grid.movedim(part_axis, 0)  # [p, E, m, n]
        return stack.reshape(p * tensor.shape[0], *stack.shape[2:])

    def stacks(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """The matrices of matrices() as views of `tensor`, one [E, m, n] stack per part
        (matrices() copies a fused tensor: its parts and experts do not merge into one
        axis); writing into the views of an output writes it in the checkpoint layout."""
        lay = self.experts
        if lay is None:
            return [tensor.reshape(1, tensor.shape[0], -1)]  # a view of a contiguous tensor (outputs are)
        if len(lay.parts) == 1:
            return [tensor]
        p, axis = len(lay.parts), lay.fused_axis
        width = tensor.shape[axis] // p
        split = (width, p) if lay.interleaved else (p, width)
        grid = tensor.unflatten(axis, split)
        part_axis = axis + 1 if lay.interleaved else axis
        return list(grid.unbind(part_axis))

    def restore(self, stack: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of matrices(): the stack back in the checkpoint layout of `like`."""
        lay = self.experts
        if lay is None or len(lay.parts) == 1:
            return stack.reshape(like.shape)
        p, axis = len(lay.parts), lay.fused_axis
        grid = stack.reshape(p, like.shape[0], *stack.shape[1:])
        part_axis = axis + 1 if lay.interleaved else axis
        return grid.movedim(0, part_axis).reshape(like.shape)

    def labels(self, shape: Sequence[int]) -> List[Tuple[Optional[str], Optional[int]]]:
        """(projection, expert) of each matrix of matrices(), in order."""
        if self.experts is None:
            return [(None, None)]
        parts = self.experts.parts
        return [(part if len(parts) > 1 else None, e) for part in parts for e in range(shape[0])]


KEPT_NOT_FLOAT = Split(False, "not floating point: the instruct tensor")
KEPT_VECTOR = Split(False, "fewer than 2 dimensions (norm, bias): the instruct tensor")
KEPT_BIAS = Split(False, "stacked biases: the instruct tensor")
KEPT_EMPTY = Split(False, "empty: the instruct tensor")
KEPT_VOCABULARY = Split(False, "vocabulary-sized, refine_embeddings false: the instruct tensor")
ONE_MATRIX = Split(True, "one matrix, as stored")
KERNEL = Split(True, "convolution kernel read as [out, -1]")


def split(
    name: str,
    shape: Sequence[int],
    arch: Architecture = UNKNOWN,
    *,
    floating: bool = True,
    vocabulary: bool = False,
    refine_embeddings: bool = True,
) -> Split:
    """The Split of checkpoint tensor `name` of `shape` in a model of `arch`.

    Raises TimberInputError for a tensor of 3 or more dimensions whose layout the
    architecture does not define.
    """
    shape = tuple(int(d) for d in shape)
    if not floating:
        return KEPT_NOT_FLOAT
    if len(shape) < 2:
        return KEPT_VECTOR
    if any(d == 0 for d in shape):
        return KEPT_EMPTY
    if vocabulary and not refine_embeddings:
        return KEPT_VOCABULARY
    if name.endswith("bias"):
        return KEPT_BIAS
    unsupported = UNSUPPORTED.get(arch.model_type or "")
    if unsupported is not None and unsupported.search(name):
        raise TimberInputError(
            f"{name}: shape {list(shape)}: {arch.label} stacks its experts along axis 0 of a "
            "2-D tensor; Timber does not split this layout yet and will not refine the "
            "experts as one matrix"
        )
    for model_type in (arch.model_type, arch.text_model_type):
        own = LAYOUTS.get(model_type or "")
        stacked = _GATE_UP.search(name) or _DOWN.search(name)  # ask transformers only for these
        for pattern, experts in own if own is not None else (converted_layout(model_type) if stacked else ()):
            if pattern.search(name):
                _check_experts(name, shape, arch, experts)
                return Split(True, experts.describe(), experts)
    if len(shape) == 2:
        return ONE_MATRIX
    if _CONVOLUTION.search(name):
        return KERNEL
    raise TimberInputError(
        f"{name}: shape {list(shape)}: no known layout for a {len(shape)}-D tensor in "
        f"{arch.label}; Timber refines each expert and projection separately and will "
        "not guess how this tensor stacks or fuses them (see docs/architectures.md)"
    )


def _check_experts(name: str, shape: Tuple[int, ...], arch: Architecture, lay: Experts) -> None:
    problem = None
    if len(shape) != 3:
        problem = f"a stacked expert tensor of {arch.label} has 3 dimensions"
    elif arch.hidden_size is not None and shape[lay.hidden_axis] != arch.hidden_size:
        problem = (
            f"{arch.label} stores hidden_size ({arch.hidden_size}) on axis "
            f"{lay.hidden_axis} of this tensor"
        )
    elif lay.fused_axis is not None and shape[lay.fused_axis] % len(lay.parts):
        problem = f"axis {lay.fused_axis} holds {len(lay.parts)} fused projections but is odd"
    if problem:
        raise TimberInputError(f"{name}: shape {list(shape)} does not match its layout: {problem}")


# --------------------------------------------------------------------------- per model

_ARCHITECTURES: Dict[Hashable, Architecture] = {}
_LOCK = threading.Lock()


def architecture_of_model(model: Any) -> Architecture:
    """The Architecture of a mergekit ModelReference, read once per model.

    A plain cache of its config (threads of --multi-gpu may race to fill it; both
    read the same file). Anything without a config (an id of mergekit's tensor API)
    gives UNKNOWN, as does an id that is neither a local directory nor a Hub id (never
    looked up): 2-D and 1-D tensors need no architecture, others then stop.
    """
    with _LOCK:
        known = _ARCHITECTURES.get(model)
    if known is not None:
        return known
    path = getattr(getattr(model, "model", None), "path", None)
    if not callable(getattr(model, "config", None)) or not isinstance(path, str):
        return UNKNOWN
    from mergekit_timber.checkpoint import looks_like_hub_id

    if not os.path.isdir(path) and not looks_like_hub_id(path):
        return UNKNOWN  # an id of the tensor API naming no model: nothing to ask anyone
    from mergekit.io.tasks import LoaderCache

    config = model.config(trust_remote_code=LoaderCache().trust_remote_code)
    arch = architecture_of(config.to_dict())
    with _LOCK:
        _ARCHITECTURES[model] = arch
    return arch


def vocabulary_names(
    directory: str, config: Mapping[str, Any], names: Sequence[str], shapes: Mapping[str, Sequence[int]]
) -> set:
    """Names of the vocabulary-sized tensors of a checkpoint directory, as mergekit marks them.

    mergekit's architecture definition (vocabulary_axis) where it has one; otherwise
    the input/output embeddings: 2-D tensors whose first axis is the vocabulary size.
    """
    found = set()
    try:
        from mergekit.architecture import arch_info_for_config
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(directory))
        info = arch_info_for_config(cfg) if cfg.architectures else None
        if info is not None:
            for weight in info.all_weights(cfg):
                if weight.vocabulary_axis is not None:
                    found.update((weight.name, *(weight.tied_names or ()), *(weight.aliases or ())))
    except Exception:  # noqa: BLE001 - no definition: fall back to the shape rule
        info = None
    if info is not None:
        return found & set(names)
    text = config.get("text_config") or {}
    vocab = text.get("vocab_size") or config.get("vocab_size")
    # outside the numbered layers only: a layer's matrix may share the vocabulary size
    return {
        n for n in names
        if vocab and len(shapes[n]) == 2 and shapes[n][0] == vocab and not re.search(r"\.\d+\.", n)
    }
