"""Synthetic Base/Instruct model pairs that mergekit can merge, built offline.

`write_pair` writes two Hugging Face model directories, ``<out>/base`` and
``<out>/instruct``, each holding a real transformers ``config.json``, a
``generation_config.json``, a tokenizer (a byte-level BPE trained on the small bundled
English text ``english.txt``, so plain English encodes) and the weights in
safetensors, with exactly the tensor names and shapes that transformers'
``save_pretrained`` writes for the architecture (``llama``, ``qwen3`` or
``qwen3_moe``). As in real pairs, only the Instruct has a chat template and ends a turn
with ``<|im_end|>``; the Base ends documents with ``<|endoftext|>``.

Weights are never held as a model: they are generated tensor by tensor from
per-tensor seeds and streamed straight into the safetensors files of both models
at once, so a Qwen3-0.6B-shaped pair (:data:`QWEN3_0_6B_SHAPE`) costs one
tensor's worth of memory (well under 3 GB) and a few tens of seconds.

Values: Base weights are N(0, 0.02) for matrices and ~1 for norm weights.
Instruct = Base + delta, where for every matrix the delta has a decaying singular
spectrum (``spectrum="decay"``: a rank-``min(m, n, 128)`` part with singular
values ~ 1/sqrt(i), plus a small full-rank Gaussian tail), scaled so that
``||delta||_F / ||W_base||_F == delta_scale`` before rounding to the storage
dtype; 1-D tensors move by the same relative amount. Everything is
deterministic given ``seed`` and independent of the MoE storage layout.

Mixture-of-experts (``qwen3_moe``): transformers 5 keeps the experts of a layer
stacked in memory (``mlp.experts.gate_up_proj`` [E, 2*I, H], gate rows first, and
``mlp.experts.down_proj`` [E, H, I]) but ``save_pretrained`` converts them back to
the per-expert Hub layout (``mlp.experts.{e}.{gate,up,down}_proj.weight``).
``moe_layout="per_expert"`` (the default) writes what ``save_pretrained`` writes;
``moe_layout="stacked"`` writes the in-memory layout. transformers and mergekit
0.1.5 read both; the values are identical either way.

Command line::

    python scripts/make_pair.py OUT [--arch qwen3] [--layers 2] ...
    python scripts/make_pair.py OUT --preset qwen3-0.6b --layers 4

prints the base and instruct directories (one per line).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from mergekit_timber.checkpoint import DTYPES, dtype_name

__all__ = [
    "ARCHES",
    "QWEN3_0_6B_SHAPE",
    "SPECTRA",
    "TensorSpec",
    "main",
    "tensor_specs",
    "write_pair",
    "write_timber_yaml",
]

PathLike = Union[str, "os.PathLike[str]"]

ARCHES = ("llama", "qwen3", "qwen3_moe")
# How config.json and tokenizer_config.json are written: by this transformers (5), or as
# most Hub checkpoints were, by transformers 4 (`rope_theta`, Llama-3.1's `rope_scaling`
# with rope_type llama3, Qwen3-MoE's `num_experts`, `torch_dtype`, a `Qwen2Tokenizer`
# tokenizer config holding the chat template).
CONFIG_FORMATS = ("transformers5", "transformers4")
SPECTRA = ("decay", "lowrank", "flat")
MOE_LAYOUTS = ("per_expert", "stacked")

# The real Qwen3-0.6B shape (Qwen/Qwen3-0.6B config.json), as write_pair kwargs.
QWEN3_0_6B_SHAPE: Dict[str, Any] = {
    "arch": "qwen3",
    "layers": 28,
    "hidden": 1024,
    "intermediate": 3072,
    "heads": 16,
    "kv_heads": 8,
    "head_dim": 128,
    "vocab": 151936,
    "tie_embeddings": True,
}

PRESETS: Dict[str, Dict[str, Any]] = {"qwen3-0.6b": QWEN3_0_6B_SHAPE}

BASE_STD = 0.02  # std of Base matrix weights
NORM_STD = 0.02  # norm weights are 1 + N(0, NORM_STD)
DECAY_RANK_CAP = 128  # rank of the structured part of a "decay" delta
DECAY_POWER = 0.5  # singular values of the structured part ~ i ** -DECAY_POWER
NOISE_RATIO = 0.25  # ||noise tail||_F / ||structured part||_F for "decay"
LOWRANK_RANK_CAP = 8  # rank of a "lowrank" delta (no tail)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # shard above 2 GiB, like save_pretrained's default
_ROW_CHUNK = 8192  # rows per chunk when filling big Gaussian tensors (fixed: determinism)



# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint.

    ``parts`` lists the logical 2-D (or 1-D) blocks the tensor is made of, each as
    (seed name, shape); for everything but stacked MoE experts that is the tensor
    itself. Seeds are keyed by the per-expert name, so both MoE layouts get the
    same values.
    """

    name: str
    shape: Tuple[int, ...]
    parts: Tuple[Tuple[str, Tuple[int, ...]], ...]
    # how the parts form the tensor: "single", "stack" ([E, *part]) or
    # "stack_cat" (per expert: concat of two parts along dim 0, then stack)
    assemble: str = "single"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _single(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, tuple(shape), ((name, tuple(shape)),))


def tensor_specs(
    *,
    arch: str = "qwen3",
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = 512,
    experts: int = 4,
    moe_intermediate: int = 32,
    tie_embeddings: Optional[bool] = None,
    moe_layout: str = "per_expert",
) -> List[TensorSpec]:
    """The tensors `write_pair` writes, in file order, for the given shape."""
    _check_arch(arch)
    if moe_layout not in MOE_LAYOUTS:
        raise ValueError(f"moe_layout must be one of {MOE_LAYOUTS}, not {moe_layout!r}")
    tie = _default_tie(arch) if tie_embeddings is None else bool(tie_embeddings)
    H, q, kv = hidden, heads * head_dim, kv_heads * head_dim
    specs = [_single("model.embed_tokens.weight", vocab, H)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            _single(p + "input_layernorm.weight", H),
            _single(p + "self_attn.q_proj.weight", q, H),
            _single(p + "self_attn.k_proj.weight", kv, H),
            _single(p + "self_attn.v_proj.weight", kv, H),
            _single(p + "self_attn.o_proj.weight", H, q),
        ]
        if arch in ("qwen3", "qwen3_moe"):
            specs += [
                _single(p + "self_attn.q_norm.weight", head_dim),
                _single(p + "self_attn.k_norm.weight", head_dim),
            ]
        specs.append(_single(p + "post_attention_layernorm.weight", H))
        if arch == "qwen3_moe":
            E, I = experts, moe_intermediate
            specs.append(_single(p + "mlp.gate.weight", E, H))
            per = [
                (p + f"mlp.experts.{e}.{proj}.weight", shape)
                for e in range(E)
                for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))
            ]
            if moe_layout == "per_expert":
                specs += [TensorSpec(n, s, ((n, s),)) for n, s in per]
            else:
                gate_up = tuple(x for x in per if not x[0].endswith("down_proj.weight"))
                down = tuple(x for x in per if x[0].endswith("down_proj.weight"))
                specs += [
                    TensorSpec(p + "mlp.experts.gate_up_proj", (E, 2 * I, H), gate_up, "stack_cat"),
                    TensorSpec(p + "mlp.experts.down_proj", (E, H, I), down, "stack"),
                ]
        else:
            specs += [
                _single(p + "mlp.gate_proj.weight", intermediate, H),
                _single(p + "mlp.up_proj.weight", intermediate, H),
                _single(p + "mlp.down_proj.weight", H, intermediate),
            ]
    specs.append(_single("model.norm.weight", H))
    if not tie:
        specs.append(_single("lm_head.weight", vocab, H))
    return specs


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, not {arch!r}")


def _default_tie(arch: str) -> bool:
    return arch == "qwen3"


# --------------------------------------------------------------------------- values


def _seed_for(seed: int, name: str, what: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _gen(seed: int, name: str, what: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(_seed_for(seed, name, what))
    return g


def _randn(shape: Sequence[int], g: torch.Generator) -> torch.Tensor:
    """float32 N(0, 1), filled in fixed-size row chunks (same values at any size)."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    if out.dim() < 2 or out.shape[0] <= _ROW_CHUNK:
        out.normal_(generator=g)
        return out
    for start in range(0, out.shape[0], _ROW_CHUNK):
        out[start : start + _ROW_CHUNK].normal_(generator=g)
    return out


def _make_delta(shape: Tuple[int, ...], g: torch.Generator, spectrum: str) -> torch.Tensor:
    """Unscaled float32 delta of the given shape with the requested spectrum."""
    if len(shape) < 2:
        return _randn(shape, g)
    m, n = shape
    if spectrum == "flat":
        return _randn(shape, g)
    cap = DECAY_RANK_CAP if spectrum == "decay" else LOWRANK_RANK_CAP
    r = max(1, min(m, n, cap))
    sv = torch.arange(1, r + 1, dtype=torch.float32).pow(-DECAY_POWER)
    # U diag(sv) V^T with U, V Gaussian (near-orthogonal columns once m, n >> r);
    # the 1/sqrt(m n) that would make them orthonormal is folded into sv.
    us = _randn((m, r), g).mul_(sv / math.sqrt(m * n))
    v = _randn((n, r), g)
    if spectrum == "lowrank":
        return us @ v.T
    # "decay": a full-rank Gaussian tail with NOISE_RATIO of the structured norm
    noise_std = NOISE_RATIO * float(sv.square().sum().sqrt()) / math.sqrt(m * n)
    delta = _randn((m, n), g)
    return delta.addmm_(us, v.T, beta=noise_std)


def _part_values(
    name: str, shape: Tuple[int, ...], *, seed: int, delta_scale: float, spectrum: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(base, instruct) float32 values of one logical block."""
    if len(shape) == 1:
        base = _randn(shape, _gen(seed, name, "base")).mul_(NORM_STD).add_(1.0)
    else:
        base = _randn(shape, _gen(seed, name, "base")).mul_(BASE_STD)
    if delta_scale == 0:
        return base, base.clone()
    delta = _make_delta(shape, _gen(seed, name, "delta"), spectrum)
    scale = delta_scale * float(base.norm()) / max(float(delta.norm()), 1e-30)
    instruct = torch.add(base, delta, alpha=scale, out=delta)  # reuse the delta's buffer
    return base, instruct


def _tensor_values(
    spec: TensorSpec, *, seed: int, delta_scale: float, spectrum: str, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(base, instruct) of one checkpoint tensor, in the storage dtype."""
    if spec.assemble == "single":
        ((name, shape),) = spec.parts
        b, i = _part_values(name, shape, seed=seed, delta_scale=delta_scale, spectrum=spectrum)
        return b.to(dtype), i.to(dtype)
    pairs = [
        _part_values(n, s, seed=seed, delta_scale=delta_scale, spectrum=spectrum)
        for n, s in spec.parts
    ]
    bases = [p[0] for p in pairs]
    insts = [p[1] for p in pairs]
    if spec.assemble == "stack_cat":  # (gate_e, up_e) pairs -> [E, 2I, H]
        bases = [torch.cat(bases[k : k + 2], 0) for k in range(0, len(bases), 2)]
        insts = [torch.cat(insts[k : k + 2], 0) for k in range(0, len(insts), 2)]
    base, inst = torch.stack(bases), torch.stack(insts)
    assert tuple(base.shape) == spec.shape, (spec.name, base.shape, spec.shape)
    return base.to(dtype), inst.to(dtype)


# --------------------------------------------------------------------------- safetensors


def _plan_shards(specs: Sequence[TensorSpec], itemsize: int, max_shard_bytes: int) -> List[List[TensorSpec]]:
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _header(specs: Sequence[TensorSpec], dtype: torch.dtype) -> bytes:
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        end = offset + spec.numel * itemsize
        header[spec.name] = {
            "dtype": DTYPES[dtype_name(dtype)],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(fh, tensor: torch.Tensor) -> None:
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise RuntimeError("writing safetensors needs a little-endian host")
    fh.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))


def _shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def _clear_weights(model_dir: Path) -> None:
    for pattern in ("model*.safetensors", "model.safetensors.index.json"):
        for old in model_dir.glob(pattern):
            old.unlink()


def _stream_weights(
    dirs: Sequence[Path],
    specs: Sequence[TensorSpec],
    values: Callable[[TensorSpec], Sequence[torch.Tensor]],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> None:
    """Write the same layout to every dir, one tensor at a time (one per dir)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    names = _shard_names(len(shards))
    for d in dirs:
        _clear_weights(d)
    for shard_name, shard in zip(names, shards):
        header = _header(shard, dtype)
        handles = [open(d / shard_name, "wb") for d in dirs]
        try:
            for fh in handles:
                fh.write(header)
            for spec in shard:
                tensors = values(spec)
                for fh, t in zip(handles, tensors):
                    assert t.dtype == dtype and tuple(t.shape) == spec.shape, spec.name
                    _write_tensor(fh, t)
                del tensors
        finally:
            for fh in handles:
                fh.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.numel for s in specs) * itemsize},
            "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard},
        }
        for d in dirs:
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- config & tokenizer

# Special tokens first, at fixed ids (0..3) whatever the vocabulary size.
_SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
END_OF_TEXT, END_OF_TURN = "<|endoftext|>", "<|im_end|>"
# The byte-level BPE is trained on this small English text (shipped in the package).
TOKENIZER_TEXT = Path(__file__).with_name("english.txt")
MIN_VOCAB = len(_SPECIAL_TOKENS) + 256  # special tokens + the 256 byte symbols
# Qwen-style chat template: one <|im_start|>role ... <|im_end|> block per turn.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _check_vocab(vocab: int) -> None:
    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab must be at least {MIN_VOCAB} (4 special tokens + 256 bytes), not {vocab}")


def _token_id(token: str) -> int:
    return _SPECIAL_TOKENS.index(token)


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab: int) -> str:
    """A byte-level BPE of exactly `vocab` ids, trained on TOKENIZER_TEXT (deterministic).

    The trainer stops when the text has no pair left to merge (about 1100 tokens); the
    remaining ids up to `vocab` are unused `<|extra_k|>` entries, so the tokenizer and the
    model's embedding table have the same size, as in real checkpoints.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab(vocab)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    data = json.loads(tok.to_str())
    table = data["model"]["vocab"]
    for k in range(vocab - len(table)):
        table[f"<|extra_{k}|>"] = len(table)
    assert sorted(table.values()) == list(range(vocab))
    assert all(table[t] == k for k, t in enumerate(_SPECIAL_TOKENS))
    return json.dumps(data, ensure_ascii=False)


def _write_tokenizer(model_dir: Path, vocab: int, *, instruct: bool) -> None:
    """The Instruct's tokenizer ends a turn with <|im_end|> and has a chat template; the Base's
    ends documents with <|endoftext|> and has none (same vocabulary, as in real pairs)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab)),
        bos_token=None,
        eos_token=END_OF_TURN if instruct else END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"] if not instruct else ["<|im_start|>"],
        model_max_length=8192 if instruct else 4096,
    )
    if instruct:
        fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(model_dir))


def _build_config(
    *,
    arch: str,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int,
    experts: int,
    moe_intermediate: int,
    tie: bool,
    dtype: torch.dtype,
):
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=_token_id(END_OF_TEXT),
        eos_token_id=_token_id(END_OF_TURN),
        pad_token_id=_token_id(END_OF_TEXT),
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
        cfg.architectures = ["LlamaForCausalLM"]
    elif arch == "qwen3":
        cfg = Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        cfg.architectures = ["Qwen3ForCausalLM"]
    else:
        cfg = Qwen3MoeConfig(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            num_experts=experts,
            moe_intermediate_size=moe_intermediate,
            num_experts_per_tok=min(2, experts),
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
        cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.dtype = dtype
    return cfg


# --------------------------------------------------------------------------- public API


def write_pair(
    out_dir: PathLike,
    *,
    arch: str = "qwen3",
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = 512,
    experts: int = 4,
    moe_intermediate: int = 32,
    tie_embeddings: Optional[bool] = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    delta_scale: float = 0.02,
    spectrum: str = "decay",
    moe_layout: str = "per_expert",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    distinct_files: bool = True,
    config_format: str = "transformers5",
) -> Tuple[Path, Path]:
    """Write a synthetic Base/Instruct pair under `out_dir`; return (base_dir, instruct_dir).

    `tie_embeddings=None` uses the architecture's usual choice (qwen3 tied, llama
    and qwen3_moe untied); tied checkpoints have no ``lm_head.weight``.
    `spectrum` shapes the singular values of each matrix delta: "decay" (default,
    ~1/sqrt(i) over rank min(m, n, 128) plus a small full-rank tail), "lowrank"
    (rank <= 8, ~1/sqrt(i), no tail) or "flat" (i.i.d. Gaussian).
    Files in the two directories are overwritten (old weight files are removed).

    The files around the weights differ as in real Base/Instruct pairs (Qwen3-8B-Base
    vs Qwen3-8B): same vocabulary (a byte-level BPE of `vocab` ids), but the Base has
    eos ``<|endoftext|>``, no chat template and a plain generation config; the Instruct has eos ``<|im_end|>``, twice the
    ``max_position_embeddings``, a chat template and a generation config with two stop
    ids and sampling defaults. `distinct_files=False` gives the Base the Instruct's
    files instead. The weights are the same either way. `config_format` (CONFIG_FORMATS)
    says which transformers wrote config.json and tokenizer_config.json.
    """
    _check_arch(arch)
    if config_format not in CONFIG_FORMATS:
        raise ValueError(f"config_format must be one of {CONFIG_FORMATS}, not {config_format!r}")
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, not {spectrum!r}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype_name(dtype) not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
    if min(layers, hidden, intermediate, heads, kv_heads, head_dim, vocab) < 1:
        raise ValueError("all sizes must be positive")
    if heads % kv_heads:
        raise ValueError("heads must be a multiple of kv_heads")
    _check_vocab(vocab)
    if arch == "qwen3_moe" and min(experts, moe_intermediate) < 1:
        raise ValueError("experts and moe_intermediate must be positive")
    tie = _default_tie(arch) if tie_embeddings is None else bool(tie_embeddings)

    out = Path(out_dir)
    base_dir, instruct_dir = out / "base", out / "instruct"
    for d in (base_dir, instruct_dir):
        d.mkdir(parents=True, exist_ok=True)

    cfg = _build_config(
        arch=arch, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=vocab, experts=experts,
        moe_intermediate=moe_intermediate, tie=tie, dtype=dtype,
    )  # fmt: skip
    specs = tensor_specs(
        arch=arch, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=vocab, experts=experts,
        moe_intermediate=moe_intermediate, tie_embeddings=tie, moe_layout=moe_layout,
    )  # fmt: skip

    def values(spec: TensorSpec):
        return _tensor_values(spec, seed=seed, delta_scale=delta_scale, spectrum=spectrum, dtype=dtype)

    _stream_weights((base_dir, instruct_dir), specs, values, dtype, max_shard_bytes)

    _write_files(base_dir, instruct_dir, cfg, vocab, distinct=distinct_files)
    if config_format == "transformers4":
        for d in (base_dir, instruct_dir):
            _as_transformers4(d)
    return base_dir, instruct_dir


def _write_files(base_dir: Path, instruct_dir: Path, cfg, vocab: int, *, distinct: bool) -> None:
    """config.json, generation_config.json and tokenizer of both models (see write_pair)."""
    import copy

    from transformers import GenerationConfig

    end_of_text, end_of_turn = _token_id(END_OF_TEXT), _token_id(END_OF_TURN)
    instruct_cfg = copy.deepcopy(cfg)
    instruct_cfg.eos_token_id = end_of_turn
    instruct_cfg.max_position_embeddings = 2 * cfg.max_position_embeddings
    instruct_cfg.save_pretrained(str(instruct_dir))
    GenerationConfig(
        bos_token_id=end_of_text, eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text,
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20,
    ).save_pretrained(str(instruct_dir))  # fmt: skip
    _write_tokenizer(instruct_dir, vocab, instruct=True)
    if not distinct:  # the Base gets the Instruct's files
        for f in instruct_dir.iterdir():
            if f.suffix in (".json", ".jinja") and not f.name.startswith("model"):  # not the weight index
                shutil.copyfile(f, base_dir / f.name)
        return
    base_cfg = copy.deepcopy(cfg)
    base_cfg.eos_token_id = end_of_text
    base_cfg.save_pretrained(str(base_dir))
    GenerationConfig(bos_token_id=end_of_text, eos_token_id=end_of_text).save_pretrained(str(base_dir))
    _write_tokenizer(base_dir, vocab, instruct=False)
    (base_dir / "chat_template.jinja").unlink(missing_ok=True)  # left by an earlier distinct_files=False


def _as_transformers4(model_dir: Path) -> None:
    """Rewrite config.json and tokenizer_config.json as transformers 4 wrote them."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = config["model_type"]
    rope = config.pop("rope_parameters", None) or {}
    config.pop("layer_types", None)
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.51.3"
    if arch == "llama":  # Llama-3.1: rope theta 500000 with llama3 scaling
        config.update(rope_theta=500000.0, rope_scaling={
            "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 1024, "rope_type": "llama3",
        }, pretraining_tp=1)  # fmt: skip
    else:
        config.update(rope_theta=rope.get("rope_theta", 1000000.0), rope_scaling=None, max_window_layers=28)
    if arch == "qwen3_moe":
        config["num_experts"] = config.pop("num_local_experts")
    (model_dir / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")

    tokenizer = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = model_dir / "chat_template.jinja"
    old = {
        "add_prefix_space": False, "additional_special_tokens": tokenizer.get("extra_special_tokens", []),
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": tokenizer["eos_token"],
        "errors": "replace", "model_max_length": tokenizer["model_max_length"], "pad_token": tokenizer["pad_token"],
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": tokenizer["unk_token"],
    }  # fmt: skip
    if template.is_file():  # transformers 4 kept the chat template in tokenizer_config.json
        old["chat_template"] = template.read_text()
        template.unlink()
    (model_dir / "tokenizer_config.json").write_text(json.dumps(dict(sorted(old.items())), indent=2) + "\n")


def write_timber_yaml(
    path: PathLike,
    base_dir: PathLike,
    instruct_dir: PathLike,
    *,
    method: str = "timber",
    lambda_: Optional[float] = 0.2,
    dtype: Optional[str] = None,
    out_dtype: Optional[str] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a mergekit YAML merging `instruct_dir` onto `base_dir` with `method`.

    ``lambda`` goes under top-level ``parameters`` for every method but
    ``timber_l`` (pass ``lambda_=None`` to leave it out). `extra` is merged into
    the top level (its ``parameters``, if any, into the parameters). Paths are
    written absolute. Returns the YAML path.
    """
    import yaml

    config: Dict[str, Any] = {
        "merge_method": method,
        "base_model": os.path.abspath(os.fspath(base_dir)),
        "models": [{"model": os.path.abspath(os.fspath(instruct_dir))}],
    }
    params: Dict[str, Any] = {}
    if method != "timber_l" and lambda_ is not None:
        params["lambda"] = float(lambda_)
    if dtype is not None:
        config["dtype"] = str(dtype)
    if out_dtype is not None:
        config["out_dtype"] = str(out_dtype)
    extra = dict(extra or {})
    params.update(extra.pop("parameters", None) or {})
    config.update(extra)
    if params:
        config["parameters"] = params
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    return path


def _parse_tie(value: str) -> Optional[bool]:
    v = value.strip().lower()
    if v in ("auto", "default", "none"):
        return None
    if v in ("1", "true", "yes", "tied"):
        return True
    if v in ("0", "false", "no", "untied"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/auto, got {value!r}")


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/make_pair.py",
        description="Write a synthetic Base/Instruct model pair (OUT/base, OUT/instruct) "
        "that mergekit can merge; prints the two directories.",
    )
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a real model's shape")
    parser.add_argument("--arch", choices=ARCHES)
    for flag in ("layers", "hidden", "intermediate", "heads", "kv-heads", "head-dim", "vocab",
                 "experts", "moe-intermediate", "seed"):  # fmt: skip
        parser.add_argument(f"--{flag}", type=int)
    parser.add_argument("--tie-embeddings", type=_parse_tie, metavar="{true,false,auto}")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--delta-scale", type=float)
    parser.add_argument("--spectrum", choices=SPECTRA)
    parser.add_argument("--moe-layout", choices=MOE_LAYOUTS)
    parser.add_argument("--config-format", choices=CONFIG_FORMATS, help="which transformers wrote the configs")
    parser.add_argument(
        "--yaml", metavar="PATH", help="also write a mergekit YAML (see --method, --lambda) there"
    )
    parser.add_argument("--method", default="timber", help="merge_method for --yaml (default timber)")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.2, help="lambda for --yaml")
    args = parser.parse_args(None if argv is None else list(argv))

    kwargs: Dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    for key in ("arch", "layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim",
                "vocab", "experts", "moe_intermediate", "seed", "delta_scale", "spectrum",
                "moe_layout", "config_format"):  # fmt: skip
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.tie_embeddings is not None:
        kwargs["tie_embeddings"] = args.tie_embeddings
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    try:
        base_dir, instruct_dir = write_pair(args.out_dir, **kwargs)
    except ValueError as error:  # a size or choice that cannot make a pair: one line
        parser.error(str(error))
    print(base_dir)
    print(instruct_dir)
    if args.yaml:
        write_timber_yaml(args.yaml, base_dir, instruct_dir, method=args.method, lambda_=args.lambda_)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
