"""Quantized input checkpoints: what a Timber merge reads exactly, what it refuses, how to dequantize.

Timber refines each weight matrix in float64 from the pair's real values. A quantized
checkpoint stores codes and scales instead, and mergekit reads only the names its
architecture lists, so it would pair codes without their scales. Three cases:

- **block-FP8** (DeepSeek-V3, Kimi-K2, many ``-FP8`` models): a float8 ``weight`` with a
  ``weight_scale_inv`` grid, one scale per 128x128 block (edge blocks partial), and
  ``quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}``. The values
  are code x scale of its block (DeepSeek-V3's ``weight_dequant``), exact in float32, so a
  Timber merge reads such a model through `DequantizingLoader`: each weight comes out
  dequantized in float32, one tensor and its scales at a time, is refined in float64 and
  rounded once, to bf16 (or ``out_dtype:``/``dtype:``): an ordinary model.
- **MXFP4** (gpt-oss experts): uint8 ``*_blocks`` (two FP4 codes a byte) and ``*_scales``
  (E8M0 exponents, one per 32 values). A plain rule too, but it renames and transposes the
  experts, so a merge refuses it and ``mergekit-timber dequantize`` writes the bf16
  checkpoint first (the same rule as transformers' ``convert_moe_packed_tensors``).
- everything else (GPTQ, AWQ, bitsandbytes, compressed-tensors, FP8 without block scales,
  ...): refused in one line naming the format and the model.

`check_inputs` is preflight's part (headers only), `dequantized_reading` the merge's
(`exact_config` the dtypes mergekit then reads and writes in), `dequantized_config` strips ``quantization_config`` from the output's config, and
`dequantize_checkpoint` is the streaming ``mergekit-timber dequantize``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple

from mergekit_timber.checkpoint import DTYPES, SAFETENSORS_DTYPES, Checkpoint, local_dir, looks_like_weights
from mergekit_timber.errors import TimberInputError

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

BLOCK_FP8 = "block-FP8"
MXFP4 = "MXFP4"

FP8_SCALE = "_scale_inv"  # X.weight -> X.weight_scale_inv
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
# Activation scales of static FP8 schemes: nothing a bf16 model needs.
FP8_DROPPED = (".input_scale", ".activation_scale")
FP8_CODE_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
DEFAULT_DTYPE = "bfloat16"

# quantization_config.quant_method -> the format's name, as users know it.
METHOD_NAMES = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors",
    "fbgemm_fp8": "FBGEMM FP8", "hqq": "HQQ", "eetq": "EETQ", "torchao": "torchao", "quanto": "quanto",
    "aqlm": "AQLM", "exl2": "EXL2", "higgs": "HIGGS", "vptq": "VPTQ", "spqr": "SpQR", "bitnet": "BitNet",
    "fp_quant": "FP-Quant", "mxfp4": MXFP4, "fp8": "FP8",
}  # fmt: skip
# Tensor-name endings that only quantized checkpoints have -> the format they point to.
COMPANIONS = (
    (".qweight", "GPTQ/AWQ (packed int32 qweight)"), (".qzeros", "GPTQ/AWQ (packed int32 qzeros)"),
    (".g_idx", "GPTQ (g_idx)"), (".SCB", "bitsandbytes 8-bit (SCB)"),
    (".absmax", "bitsandbytes 4-bit (absmax)"), (".quant_map", "bitsandbytes 4-bit (quant_map)"),
    (".weight_packed", "compressed-tensors (weight_packed)"),
    (".weight_zero_point", "compressed-tensors (weight_zero_point)"),
    (".weight_scale", "FP8/INT8 with weight_scale (compressed-tensors or FBGEMM)"),
)  # fmt: skip


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Quantization:
    """What a checkpoint directory holds: the format, why we think so, how to read it."""

    format: str
    evidence: str
    block: Optional[Tuple[int, int]] = None  # block-FP8: (rows, columns) of a scale block
    # block-FP8: weight -> its weight_scale_inv; MXFP4: X_blocks -> X_scales.
    companions: Mapping[str, str] = field(default_factory=dict)
    dropped: Tuple[str, ...] = ()  # tensors a dequantized model does not have

    @property
    def mergeable(self) -> bool:
        """A Timber merge reads it directly (dequantized as it reads)."""
        return self.format == BLOCK_FP8

    @property
    def dequantizable(self) -> bool:
        """`mergekit-timber dequantize` writes it as an ordinary checkpoint."""
        return self.format in (BLOCK_FP8, MXFP4)

    def hidden(self) -> set:
        """Names a dequantized reading does not show: scales and other companions."""
        return set(self.companions.values()) | set(self.dropped)


def quantization_config(config: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The checkpoint's quantization settings (top level, or under text_config)."""
    for where in (config, config.get("text_config") or {}):
        if isinstance(where, Mapping):
            for key in ("quantization_config", "compression_config"):
                if isinstance(where.get(key), Mapping):
                    return where[key]
    return None


def _method(qc: Mapping[str, Any]) -> Tuple[str, str]:
    """(quant_method, the format's name with its settings)."""
    method = str(qc.get("quant_method") or "unknown").lower()
    name = METHOD_NAMES.get(method, method)
    bits = qc.get("bits") or ("4-bit" if qc.get("load_in_4bit") else "8-bit" if qc.get("load_in_8bit") else None)
    if bits:
        name += f" ({bits}-bit)" if isinstance(bits, int) else f" ({bits})"
    return method, name


def _block(qc: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    block = qc.get("weight_block_size")
    if isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return int(block[0]), int(block[1])
    return None


def detect(checkpoint: Checkpoint, config: Optional[Mapping[str, Any]] = None) -> Optional[Quantization]:
    """The quantization of a checkpoint (config and safetensors headers only), or None.

    Raises a one-line TimberInputError for a block-FP8 checkpoint whose tensors do not
    match its config (a weight without scales, a scale grid of the wrong shape).
    """
    config = checkpoint.config() if config is None else config
    qc = quantization_config(config)
    names = checkpoint.names()
    present = set(names)
    dtypes = {name: checkpoint.info(name)[1] for name in names}
    float8 = [n for n in names if dtypes[n].startswith("F8_") and not n.endswith(FP8_SCALE)]
    mxfp4 = {
        n: n[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES
        for n in names
        if n.endswith(MXFP4_BLOCKS) and dtypes[n] == "U8" and n[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES in present
    }
    companion = next(((n, what) for end, what in COMPANIONS for n in names if n.endswith(end)), None)

    if qc is not None:
        method, name = _method(qc)
        evidence = f"quantization_config.quant_method: {method}"
        if method == "fp8" and _block(qc) is not None and companion is None:
            return _block_fp8(checkpoint, names, dtypes, _block(qc), evidence)
        if method == "fp8":
            why = "per-tensor scales" if _block(qc) is None else f"tensor {companion[0]}"
            return Quantization(f"FP8 ({why})", evidence)
        if method == "mxfp4" and mxfp4:
            return Quantization(MXFP4, evidence, companions=mxfp4)
        return Quantization(name, evidence)
    if mxfp4:
        first = next(iter(mxfp4))
        return Quantization(MXFP4, f"uint8 tensor {first} with {mxfp4[first]}", companions=mxfp4)
    if companion is not None:
        return Quantization(companion[1], f"tensor {companion[0]}")
    if float8:
        return Quantization(
            "FP8 (no quantization_config)", f"tensor {float8[0]} is {dtypes[float8[0]]}"
        )
    scales = [n for n in names if n.endswith(FP8_SCALE)]
    if scales:
        return Quantization("FP8 scales (no quantization_config)", f"tensor {scales[0]}")
    return None


def _block_fp8(checkpoint, names, dtypes, block, evidence) -> Quantization:
    """A block-FP8 checkpoint, every code tensor checked against its scale grid."""
    where = f"{checkpoint.role} ({checkpoint.directory})"
    present = set(names)
    companions = {}
    for name in names:
        if name.endswith(FP8_SCALE):
            if name[: -len(FP8_SCALE)] not in present:
                raise TimberInputError(f"{where}: {name} has no weight {name[: -len(FP8_SCALE)]} to scale")
            continue
        if not dtypes[name].startswith("F8_"):
            continue
        scale = name + FP8_SCALE
        if dtypes[name] not in FP8_CODE_DTYPES:
            codes = "/".join(FP8_CODE_DTYPES)
            raise TimberInputError(f"{where}: {name} is {dtypes[name]}; block-FP8 codes are {codes}")
        if scale not in present:
            raise TimberInputError(f"{where}: block-FP8 weight {name} has no {scale} (its block scales)")
        shape, scale_shape = checkpoint.info(name)[0], checkpoint.info(scale)[0]
        expected = scale_grid(shape, block)
        if len(shape) < 2 or tuple(scale_shape) != expected:
            raise TimberInputError(
                f"{where}: {scale} has shape {list(scale_shape)}; weight {name} {list(shape)} in "
                f"{block[0]}x{block[1]} blocks needs {list(expected)}"
            )
        if dtypes[scale] not in FP8_SCALE_DTYPES:
            kinds = ", ".join(FP8_SCALE_DTYPES)
            raise TimberInputError(f"{where}: {scale} is {dtypes[scale]}; expected one of {kinds}")
        companions[name] = scale
    dropped = tuple(n for n in names if n.endswith(FP8_DROPPED))
    return Quantization(BLOCK_FP8, evidence, block=block, companions=companions, dropped=dropped)


def scale_grid(shape, block: Tuple[int, int]) -> Tuple[int, ...]:
    """The scale grid of a (..., rows, columns) weight: one scale per block, edges partial."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def refusal(quant: Quantization, label: str, directory: Path) -> TimberInputError:
    """The one line that stops a merge of a model Timber cannot read exactly."""
    head = f"{label} holds {quant.format} weights ({quant.evidence}), which Timber cannot merge exactly"
    if quant.dequantizable:
        return TimberInputError(
            f"{head}; dequantize it first: `mergekit-timber dequantize {directory} {directory}-bf16`, "
            "then merge the bf16 directory"
        )
    return TimberInputError(
        f"{head} and mergekit-timber cannot dequantize; merge the unquantized model it was made from, "
        "or dequantize it with the tool that made it and save it in bf16"
    )


# ----------------------------------------------------------------------------- rules


def dequantize_block_fp8(code: "torch.Tensor", scale: "torch.Tensor", block: Tuple[int, int], dtype) -> "torch.Tensor":
    """y[i, j] = float32(code[i, j]) * float32(scale[i // rows, j // cols]), rounded once to dtype.

    DeepSeek-V3's weight_dequant (inference/kernel.py) and transformers' Fp8Dequantize;
    edge blocks partial. One band of `rows` rows is in float32 at a time.
    """
    import torch

    if tuple(scale.shape) != scale_grid(code.shape, block):
        raise ValueError(f"scale grid {list(scale.shape)} does not fit weight {list(code.shape)} in blocks {block}")
    rows, cols = code.shape[-2:]
    out = torch.empty(code.shape, dtype=dtype, device=code.device)
    codes, scales, outs = code.reshape(-1, rows, cols), scale.reshape(-1, *scale.shape[-2:]), out.view(-1, rows, cols)
    for b in range(codes.shape[0]):
        for k, r0 in enumerate(range(0, rows, block[0])):
            per_column = scales[b, k].to(torch.float32).repeat_interleave(block[1])[:cols]
            outs[b, r0 : r0 + block[0]] = codes[b, r0 : r0 + block[0]].to(torch.float32) * per_column
    return out


# E2M1 (FP4) values of the 16 codes, as transformers' integrations/mxfp4.py lists them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: "torch.Tensor", scales: "torch.Tensor", dtype) -> "torch.Tensor":
    """gpt-oss experts: (E, R, G, 16) uint8 blocks, (E, R, G) E8M0 scales -> (E, G * 32, R).

    transformers' convert_moe_packed_tensors: low nibble first, value = FP4 x 2^(scale - 127),
    then the last two axes swapped (the layout transformers' gpt-oss holds). One expert at a time.
    """
    import torch

    if blocks.ndim != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not pair")
    experts, rows, groups, width = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype).to(blocks.device)
    out = torch.empty(experts, groups * width * 2, rows, dtype=dtype, device=blocks.device)
    for e in range(experts):
        packed = blocks[e].to(torch.uint8).reshape(rows * groups, width)
        exponent = (scales[e].to(torch.int32) - 127).reshape(rows * groups, 1)
        values = torch.empty(rows * groups, width * 2, dtype=dtype, device=blocks.device)
        values[:, 0::2] = lut[(packed & 0x0F).to(torch.int)]
        values[:, 1::2] = lut[(packed >> 4).to(torch.int)]
        torch.ldexp(values, exponent, out=values)
        out[e] = values.reshape(rows, groups * width * 2).T
    return out


# ----------------------------------------------------------------------------- preflight


class DequantizedView:
    """A Checkpoint as a Timber merge reads it: companions hidden, FP8 weights tagged with
    `dtype`, the dtype the merge writes them in (so preflight sees no mixed dtypes)."""

    def __init__(self, checkpoint: Checkpoint, quant: Quantization, dtype: str):
        self._checkpoint, self._quant, self._tag = checkpoint, quant, DTYPES[dtype]
        hidden = quant.hidden()
        self._names = [n for n in checkpoint.names() if n not in hidden]

    def names(self) -> List[str]:
        return list(self._names)

    def info(self, name: str):
        shape, dtype = self._checkpoint.info(name)
        return shape, (self._tag if name in self._quant.companions else dtype)

    def __getattr__(self, attribute):  # config(), close(), directory, role, ...
        return getattr(self._checkpoint, attribute)


def read_dtype(merge_config) -> str:
    """The dtype a merge with a block-FP8 input writes: `out_dtype:`, else `dtype:`, else bfloat16."""
    for dtype in (getattr(merge_config, "out_dtype", None), getattr(merge_config, "dtype", None)):
        if dtype in DTYPES:
            return dtype
    return DEFAULT_DTYPE


# Inputs of a merge with a block-FP8 model are read in float32 (code x block scale is exact
# there, and so is any bf16/fp16 input), or float64 when the recipe asks for it.
EXACT_READ = ("float32", "float64")
_OUTPUT_DTYPES: Dict[Any, "torch.dtype"] = {}  # model reference -> dtype the method rounds to, per merge


def exact_config(merge_config):
    """`merge_config` as mergekit runs it when a model is block-FP8: every input read exactly
    (mergekit's LoadTensor casts each tensor to `dtype:`), the output rounded once to `read_dtype`."""
    read = merge_config.dtype if merge_config.dtype in EXACT_READ else EXACT_READ[0]
    return merge_config.model_copy(update={"dtype": read, "out_dtype": read_dtype(merge_config)})


def output_dtype_for(model) -> Optional["torch.dtype"]:
    """The dtype the method writes its result in for an exact (block-FP8) merge of `model`,
    straight from float64: one rounding; None for every other merge."""
    return _OUTPUT_DTYPES.get(model) if _OUTPUT_DTYPES else None


def check_inputs(merge_config, dirs: Mapping[Any, Optional[Path]], checkpoints: Dict[Any, Tuple[str, Any]]) -> Dict:
    """Preflight: refuse every quantized input a merge cannot read exactly; views of the rest.

    `dirs` maps each model reference to its local directory (None for a LoRA entry),
    `checkpoints` to (label, Checkpoint or None for *.bin weights). Returns `checkpoints`
    with each block-FP8 model as the merge will read it (see DequantizedView).
    """
    views = dict(checkpoints)
    base_first = sorted(checkpoints.items(), key=lambda item: item[0] != merge_config.base_model)
    for ref, (label, checkpoint) in base_first:
        directory = dirs.get(ref)
        if checkpoint is None:  # pickled weights: only the config can tell
            qc = quantization_config(_read_config(directory)) if directory else None
            if qc is not None:
                method, name = _method(qc)
                raise refusal(Quantization(name, f"quantization_config.quant_method: {method}"), label, directory)
            continue
        quant = detect(checkpoint)
        if quant is None:
            continue
        if not quant.mergeable:
            raise refusal(quant, label, checkpoint.directory)
        views[ref] = (label, DequantizedView(checkpoint, quant, read_dtype(merge_config)))
    return views


def _read_config(directory: Optional[Path]) -> dict:
    try:
        return json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}


# ----------------------------------------------------------------------------- the merge


def _loader_class():
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex, ShardInfo

    class DequantizingLoader(LazyTensorLoader):
        """mergekit's loader of one block-FP8 model: each weight comes out dequantized.

        The index it shows has no scale tensors; a weight is read with its scales (one
        tensor at a time), dequantized band by band, and the FP8 pages are given back.
        """

        def __init__(self, inner: LazyTensorLoader, quant: Quantization):
            hidden = quant.hidden()
            paths = {n: f for n, f in inner.index.tensor_paths.items() if n not in hidden}
            index = ShardedTensorIndex(
                base_path=inner.index.base_path,
                is_safetensors=inner.index.is_safetensors,
                tensor_paths=paths,
                shards=[ShardInfo(s.filename, [k for k in s.contained_keys if k in paths]) for s in inner.index.shards],
            )
            super().__init__(index, inner.lazy_unpickle)
            self.inner, self.quant = inner, quant

        def get_tensor(self, key, device="cpu", aliases=None, raise_on_missing=True):
            if aliases and key not in self.index.tensor_paths:
                key = next((a for a in aliases if a in self.index.tensor_paths), key)
            if key not in self.index.tensor_paths:
                if raise_on_missing:
                    raise KeyError(key)
                return None
            if key not in self.quant.companions:
                return self.inner.get_tensor(key, device=device)
            import torch

            from mergekit_timber.integration import input_pages

            scale = self.inner.get_tensor(self.quant.companions[key])
            code = self.inner.get_tensor(key)
            try:
                out = dequantize_block_fp8(code, scale, self.quant.block, torch.float32)  # exact
            finally:
                input_pages.release(code, scale)
            return out.to(device)

        def flush(self):
            self.inner.flush()
            super().flush()

    return DequantizingLoader


def block_fp8_models(merge_config, options) -> Dict[Any, Quantization]:
    """The block-FP8 models of a merge (headers only); any other quantized one is refused."""
    found = {}
    for ref in merge_config.referenced_models():
        directory = local_dir(ref, options)
        if not any(directory.glob("*.safetensors")):
            continue
        with Checkpoint(directory, "model") as checkpoint:
            quant = detect(checkpoint)
        if quant is None:
            continue
        if not quant.mergeable or ref.lora is not None:
            raise refusal(quant, f"model {ref}" + (" (with a LoRA)" if ref.lora else ""), directory)
        found[ref] = quant
    return found


@contextlib.contextmanager
def dequantized_reading(merge_config, options) -> Iterator[bool]:
    """While mergekit merges `merge_config`, its block-FP8 models are read dequantized.

    mergekit keeps one loader per model in the class-level dict `LoaderCache.loaders`
    and creates one only for a model it has none of: ours are put there before the
    merge and taken out after it, so no other merge in the process sees them. Yields
    whether a model is block-FP8: then run mergekit with `exact_config`.
    """
    import torch
    from mergekit.io.tasks import LoaderCache

    loaders = getattr(LoaderCache, "loaders", None)
    ours = {}
    try:
        for ref, quant in block_fp8_models(merge_config, options).items():
            if not isinstance(loaders, dict):  # the mergekit internal this relies on (0.1.5)
                raise TimberInputError(
                    "mergekit.io.tasks.LoaderCache has no class-level `loaders` dict: this mergekit cannot read "
                    f"block-FP8 model {ref} dequantized; run `mergekit-timber dequantize` on it first"
                )
            inner = ref.merged(
                cache_dir=options.lora_merge_cache,
                trust_remote_code=options.trust_remote_code,
                lora_merge_dtype=options.lora_merge_dtype,
            ).lazy_loader(cache_dir=options.transformers_cache, lazy_unpickle=options.lazy_unpickle)
            ours[ref] = loaders[ref] = _loader_class()(inner, quant)
        if ours:
            for ref in merge_config.referenced_models():
                _OUTPUT_DTYPES[ref] = getattr(torch, read_dtype(merge_config))
        yield bool(ours)
    finally:
        for ref, loader in ours.items():
            if loaders.get(ref) is loader:
                del loaders[ref]
        if ours:
            for ref in merge_config.referenced_models():
                _OUTPUT_DTYPES.pop(ref, None)


def dequantized_config(out_config, merge_config):
    """The output's transformers config with no quantization_config (it is a bf16 model now)."""
    if getattr(out_config, "quantization_config", None) is None:
        return out_config
    del out_config.quantization_config
    if not (merge_config.out_dtype or merge_config.dtype):
        # What the dequantized weights are written in (transformers 5 spells it dtype).
        setattr(out_config, "dtype" if hasattr(out_config, "dtype") else "torch_dtype", DEFAULT_DTYPE)
    return out_config


# ----------------------------------------------------------------------------- dequantize


@dataclass
class _Entry:
    """One tensor of an output shard: name, safetensors dtype tag, shape, and how to make it."""

    name: str
    tag: str
    shape: Tuple[int, ...]
    make: Any  # () -> torch.Tensor

    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.tag][0]




def _entries(checkpoint: Checkpoint, quant: Quantization, dtype: "torch.dtype") -> Dict[str, List[_Entry]]:
    """Output shard file name -> its tensors (input shard names, scales dropped)."""
    from mergekit_timber.checkpoint import dtype_name

    tag = DTYPES[dtype_name(dtype)]
    hidden = quant.hidden()
    shards: Dict[str, List[_Entry]] = {}
    for name in checkpoint.names():
        if name in hidden:
            continue
        shape, source_tag = checkpoint.info(name)
        file = checkpoint.files[name].name
        if quant.format == BLOCK_FP8 and name in quant.companions:
            scale = quant.companions[name]

            def make(name=name, scale=scale):
                return dequantize_block_fp8(checkpoint.tensor(name), checkpoint.tensor(scale), quant.block, dtype)

            entry = _Entry(name, tag, tuple(shape), make)
        elif quant.format == MXFP4 and name in quant.companions:
            scales = quant.companions[name]
            experts, rows, groups, width = shape
            out_shape = (experts, groups * width * 2, rows)

            def make(name=name, scales=scales):
                return dequantize_mxfp4(checkpoint.tensor(name), checkpoint.tensor(scales), dtype)

            entry = _Entry(name[: -len(MXFP4_BLOCKS)], tag, out_shape, make)
        else:
            entry = _Entry(name, source_tag, tuple(shape), lambda name=name: checkpoint.tensor(name))
        shards.setdefault(file, []).append(entry)
    return shards


def _write_shard(path: Path, entries: List[_Entry]) -> None:
    """A safetensors file written tensor by tensor: the header first, then each tensor's bytes."""
    import sys

    import torch

    from mergekit_timber.integration import input_pages

    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise RuntimeError("writing safetensors needs a little-endian host")
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        end = offset + entry.nbytes()
        header[entry.name] = {"dtype": entry.tag, "shape": list(entry.shape), "data_offsets": [offset, end]}
        offset += entry.nbytes()
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for entry in entries:
            tensor = entry.make()
            if tuple(tensor.shape) != entry.shape or tensor.element_size() * tensor.numel() != entry.nbytes():
                raise TimberInputError(
                    f"{entry.name}: produced {list(tensor.shape)} {tensor.dtype}, expected {list(entry.shape)} {entry.tag}"
                )
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            fh.write(memoryview(flat.numpy()))
            input_pages.release(tensor)  # a copied input tensor is a view of its shard


def dequantize_checkpoint(
    source: Path, target: Path, dtype: str = DEFAULT_DTYPE
) -> Quantization:
    """Write the block-FP8 or MXFP4 checkpoint `source` as an ordinary `dtype` checkpoint at `target`.

    Shard by shard (same shard names), tensor by tensor: memory holds one output tensor
    and the pages of the input it reads. Scales are dropped, config.json loses its
    quantization_config; the other files (tokenizer, generation config, ...) are copied.
    The output is staged and published at the end (mergekit_timber.integration.output_dir): all or nothing.
    """
    import torch

    from mergekit_timber.integration.output_dir import OutputDir

    if dtype not in DTYPES:
        raise TimberInputError(f"dequantize: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = Path(source)
    if not source.is_dir():
        raise TimberInputError(f"dequantize: input {source} is not a directory")
    out = OutputDir(target, inputs=[source])
    out.check()
    checkpoint = Checkpoint(source, "input model")
    try:
        quant = detect(checkpoint)
        label = f"input model ({source})"
        if quant is None:
            raise TimberInputError(
                f"{label} is not quantized (no quantization_config, no FP8 or packed tensors): nothing to dequantize"
            )
        if not quant.dequantizable:
            raise TimberInputError(
                f"{label} holds {quant.format} weights ({quant.evidence}), which mergekit-timber cannot "
                "dequantize; use the unquantized model it was made from, or the tool that made it"
            )
        torch_dtype = getattr(torch, dtype)
        shards = _entries(checkpoint, quant, torch_dtype)
        try:
            stage = out.open()
            weight_map, total = {}, 0
            for file, entries in shards.items():
                LOG.info("dequantizing %s (%d tensors)", file, len(entries))
                _write_shard(stage / file, entries)
                for entry in entries:
                    weight_map[entry.name] = file
                    total += entry.nbytes()
            if (source / "model.safetensors.index.json").is_file() or len(shards) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for item in sorted(source.iterdir()):
                if item.is_file() and not looks_like_weights(item.name) and item.name != "config.json":
                    shutil.copyfile(item, stage / item.name)
            config = _read_config(source)
            if config:
                (stage / "config.json").write_text(json.dumps(plain_config(config, dtype), indent=2) + "\n")
            out.publish()
        finally:
            out.discard()
    finally:
        checkpoint.close()
    return quant


def plain_config(config: Mapping[str, Any], dtype: Optional[str], *, nested: bool = False) -> Dict[str, Any]:
    """`config` (a config.json, key for key) with no quantization_config and `dtype` set
    in the dtype keys it has (none: the key its transformers version reads)."""
    plain = dict(config)
    for key in ("quantization_config", "compression_config"):
        plain.pop(key, None)
    if isinstance(plain.get("text_config"), Mapping):
        plain["text_config"] = plain_config(plain["text_config"], dtype, nested=True)
    if dtype is None:
        return plain
    keys = [k for k in ("dtype", "torch_dtype") if k in plain] or ([] if nested else [_dtype_key(plain)])
    for key in keys:
        plain[key] = dtype
    return plain


def _dtype_key(config: Mapping[str, Any]) -> str:
    """transformers 5 writes `dtype`; transformers 4 reads only `torch_dtype`."""
    version = str(config.get("transformers_version") or "")
    return "dtype" if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 5 else "torch_dtype"

