"""Small quantized checkpoints written the way the published ones are (tests, benchmark).

- block-FP8 (DeepSeek-V3 / Kimi-K2): each decoder linear `weight` as float8_e4m3fn with a
  float32 `weight_scale_inv` of 128x128 blocks (edge blocks partial), amax / 448 per block,
  `quantization_config: {quant_method: fp8, weight_block_size: [128, 128], ...}`;
- MXFP4 (gpt-oss): experts as uint8 `*_blocks` (E, R, G, 16) and `*_scales` (E, R, G);
- GPTQ: int32 `qweight`, `qzeros`, fp16 `scales`, int32 `g_idx`.
"""

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit_timber.checkpoint import Checkpoint

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
FP8_MAX = 448.0


def quantize_block_fp8(weight: torch.Tensor, block=(128, 128)):
    """(codes float8_e4m3fn, scale_inv float32): one scale per block, edges partial."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    w = weight.to(torch.float32)
    scale = torch.empty(grid, dtype=torch.float32)
    code = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            s = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            code[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / s).to(
                torch.float8_e4m3fn
            )
    return code, scale


def reference_fp8(code: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """DeepSeek-V3's weight_dequant written plainly: float32 code x its block's scale (float32)."""
    rows, cols = code.shape
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return code.to(torch.float32) * full


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    return ".layers." in name and name.endswith("proj.weight") and tensor.ndim == 2


def write_block_fp8(src: Path, dst: Path, *, scales_apart: bool = True) -> Path:
    """`src` (a bf16 model) as a block-FP8 checkpoint at `dst`, two shards and an index.

    With `scales_apart`, the scales of one weight live in the other shard (allowed by the
    index; readers must not assume a scale sits beside its weight)."""
    dst.mkdir(parents=True, exist_ok=True)
    with Checkpoint(src, "model") as checkpoint:
        tensors = {name: checkpoint.tensor(name) for name in checkpoint.names()}
    shard1, shard2 = {}, {}
    names = sorted(tensors)
    for k, name in enumerate(names):
        t = tensors[name]
        home = shard1 if k % 2 == 0 else shard2
        if is_quantized_linear(name, t):
            code, scale = quantize_block_fp8(t)
            home[name] = code
            other = shard2 if home is shard1 else shard1
            (other if scales_apart and name.endswith("q_proj.weight") else home)[name + "_scale_inv"] = scale
        else:
            home[name] = t.contiguous()
    files = {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2}
    weight_map = {}
    for file, shard in files.items():
        save_file(shard, str(dst / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(FP8_CONFIG)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _copy_other_files(src, dst)
    return dst


def _copy_other_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and the like: everything but weights and config.json."""
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".index.json")) and item.name != "config.json":
            shutil.copyfile(item, dst / item.name)


def quantize_mxfp4(weight: torch.Tensor):
    """gpt-oss packing of an (E, R, C) expert weight (C a multiple of 32): blocks, scales (uint8)."""
    from mergekit_timber.integration.quantized import FP4_VALUES

    experts, rows, cols = weight.shape
    groups = cols // 32
    w = weight.to(torch.float32).reshape(experts, rows, groups, 32)
    exponent = torch.floor(torch.log2(w.abs().amax(-1).clamp(min=2**-100) / 6.0)).clamp(-127, 127) + 1
    scaled = w / torch.exp2(exponent)[..., None]
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # nearest FP4 value
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def write_mxfp4(dst: Path, *, seed: int, config: bool = True) -> Path:
    """A tiny gpt-oss checkpoint as gpt-oss ships: experts in MXFP4, everything else bf16.

    transformers holds gate_up_proj as (E, H, 2I) and down_proj as (E, I, H); the checkpoint
    stores each transposed, in blocks of 32 values: (E, out, in / 32, 16) uint8 + (E, out, in / 32)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    cfg = GptOssConfig(
        num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, num_local_experts=2, num_experts_per_tok=1, vocab_size=128, layer_types=["full_attention"],
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.transpose(1, 2) + 0.05 * torch.randn(t.transpose(1, 2).shape))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config_dict = cfg.to_dict()
    if config:
        kept = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
        config_dict["quantization_config"] = {"modules_to_not_convert": kept, "quant_method": "mxfp4"}
    (dst / "config.json").write_text(json.dumps(config_dict, indent=2))
    return dst


def write_gptq(dst: Path, *, seed: int, hidden=256, group=128, config: bool = True) -> Path:
    """A GPTQ (4-bit, AutoGPTQ layout) checkpoint of one llama layer's q_proj, the rest in fp16."""
    g = torch.Generator().manual_seed(seed)
    dst.mkdir(parents=True, exist_ok=True)
    prefix = "model.layers.0.self_attn.q_proj"
    tensors = {
        "model.embed_tokens.weight": torch.randn(128, hidden, generator=g).to(torch.float16),
        f"{prefix}.qweight": torch.randint(-(2**31), 2**31 - 1, (hidden // 8, hidden), generator=g, dtype=torch.int32),
        f"{prefix}.qzeros": torch.randint(-(2**31), 2**31 - 1, (hidden // group, hidden // 8), generator=g, dtype=torch.int32),
        f"{prefix}.scales": (torch.rand(hidden // group, hidden, generator=g) * 0.01).to(torch.float16),
        f"{prefix}.g_idx": (torch.arange(hidden) // group).to(torch.int32),
        "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
    }
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "torch_dtype": "float16"}
    if config:
        cfg["quantization_config"] = {"bits": 4, "group_size": group, "desc_act": False, "sym": True, "quant_method": "gptq"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
