"""Every architecture with public Base/Instruct pairs, built with transformers itself.

For each: a tiny model from transformers' own config and model class is saved as
Base, perturbed into an Instruct (a delta with a decaying spectrum per matrix, so that
eRank means something), merged by the unmodified ``mergekit-yaml`` with ``timber``,
and the output is compared with an oracle that decomposes the linear maps the
forward pass uses: ``forward_maps`` below slices each parameter as the model class's
forward does (read from transformers 5's modeling_<type>.py), independently of
mergekit_timber.method.layout. The output must also store exactly the Instruct checkpoint's
tensor names, shapes and dtypes (transformers' save_pretrained writes the Hub layout:
per-expert Qwen3-MoE, GLM-4-MoE and Mixtral experts, Mixtral's block_sparse_moe, stacked
Llama 4 and Granite experts), load with no missing or unexpected keys and run a finite
forward pass.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers as T

from helpers import load_dir, run_cli, write_yaml
from mergekit_timber.checkpoint import Checkpoint
from oracle import timber_matrix, with_spectrum

LAM = 0.2
DTYPE = torch.bfloat16
BF16_TOLERANCE = 1e-3  # share of bf16 elements allowed to round the other way
SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _llama4():
    text = dict(SMALL, intermediate_size=48, intermediate_size_mlp=64, num_local_experts=4,
                num_experts_per_tok=1, interleave_moe_layer_step=1)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                  projector_output_dim=32)
    return T.Llama4Config(text_config=text, vision_config=vision)


# name -> (config factory, model class, the fused-expert layout its forward uses)
ARCHITECTURES = {
    "llama": (lambda: T.LlamaConfig(**SMALL, intermediate_size=64), T.LlamaForCausalLM),
    "mistral": (lambda: T.MistralConfig(**SMALL, intermediate_size=64), T.MistralForCausalLM),
    "qwen2": (lambda: T.Qwen2Config(**SMALL, intermediate_size=64), T.Qwen2ForCausalLM),  # q/k/v biases
    "qwen3": (lambda: T.Qwen3Config(**SMALL, intermediate_size=64), T.Qwen3ForCausalLM),
    "qwen3_moe": (
        lambda: T.Qwen3MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=24,
                                 num_experts=4, num_experts_per_tok=2),
        T.Qwen3MoeForCausalLM,
    ),
    "mixtral": (
        lambda: T.MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        T.MixtralForCausalLM,
    ),
    "llama4": (_llama4, T.Llama4ForConditionalGeneration),
    "gemma2": (lambda: T.Gemma2Config(**SMALL, intermediate_size=64), T.Gemma2ForCausalLM),
    "gemma3": (lambda: T.Gemma3TextConfig(**SMALL, intermediate_size=64), T.Gemma3ForCausalLM),
    "phi3": (lambda: T.Phi3Config(**SMALL, intermediate_size=64, pad_token_id=0), T.Phi3ForCausalLM),
    "olmo2": (lambda: T.Olmo2Config(**SMALL, intermediate_size=64), T.Olmo2ForCausalLM),
    "granite": (lambda: T.GraniteConfig(**SMALL, intermediate_size=64), T.GraniteForCausalLM),
    "glm4_moe": (
        lambda: T.Glm4MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=4,
                                n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                n_group=1, topk_group=1),
        T.Glm4MoeForCausalLM,
    ),
    "granitemoehybrid": (
        lambda: T.GraniteMoeHybridConfig(
            **{k: v for k, v in SMALL.items() if k != "head_dim"}, intermediate_size=24,
            shared_intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
            mamba_n_groups=1, mamba_expand=2),
        T.GraniteMoeHybridForCausalLM,
    ),
}

# Fused expert tensors, as each forward slices them (parameter names of the model):
#   [E, 2I, H]: linear(x, W[e]).chunk(2, dim=-1) -> gate = W[e][:I], up = W[e][I:]
#     (Qwen3MoeExperts, MixtralExperts, Glm4MoeExperts, GraniteMoeHybridExperts)
#   [E, H, 2I]: bmm(x, W).chunk(2, dim=-1) -> gate = W[e][:, :I], up = W[e][:, I:]
#     (Llama4TextExperts)
FUSED_ON_COLUMNS = {"llama4"}


def forward_maps(arch: str, name: str, t: torch.Tensor) -> dict:
    """The 2-D linear maps the forward applies, from one model parameter."""
    if name.endswith("experts.gate_up_proj"):
        maps = {}
        for e in range(t.shape[0]):
            w = t[e] if arch not in FUSED_ON_COLUMNS else t[e].T  # rows = gate|up outputs
            half = w.shape[0] // 2
            maps[f"{name}[{e}].gate"], maps[f"{name}[{e}].up"] = w[:half], w[half:]
        return maps
    if name.endswith("experts.down_proj"):
        return {f"{name}[{e}]": t[e] for e in range(t.shape[0])}
    if t.ndim > 2:  # a convolution kernel (Mamba conv1d): [out, in * k], as the authors read it
        return {name: t.reshape(t.shape[0], -1)}
    return {name: t}


def refined(name: str, t: torch.Tensor) -> bool:
    """Timber's selection (SPEC): floating matrices; vectors and biases are the instruct's."""
    return t.is_floating_point() and t.ndim >= 2 and not name.endswith("bias")


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Base -> Instruct: per matrix slice a delta with singular values 0.08 * 0.8^i."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim < 2:
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.dtype))
                continue
            flat = p.data.reshape(-1, p.shape[-2], p.shape[-1])
            m, n = flat.shape[-2:]
            spectrum = 0.08 * 0.8 ** torch.arange(min(m, n), dtype=torch.float64)
            for s in flat:
                s.add_(with_spectrum(m, n, spectrum, g).to(p.dtype))
            p.data.copy_(flat.reshape(p.shape))


def build_pair(arch: str, root):
    make_config, cls = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = cls(make_config()).to(DTYPE).eval()
    base, instruct = root / "base", root / "instruct"
    model.save_pretrained(base)
    perturb(model, seed=1)
    model.save_pretrained(instruct)
    return cls, base, instruct


def stored(model_dir) -> dict:
    """{name: (shape, dtype)} of a checkpoint as stored, from its safetensors headers."""
    with Checkpoint(model_dir, "model") as checkpoint:
        return {name: checkpoint.info(name) for name in checkpoint.names()}


def assert_stored_tensors_match_oracle(base_dir, instruct_dir, out_dir) -> None:
    """Tensor by tensor as stored: a stored matrix (per-expert ones included) is the
    oracle on the stored Base/Instruct matrices; 1-D tensors are the Instruct's. Stacked
    and fused stored tensors are checked per forward map on the loaded model (below)."""
    base, instruct, got = (load_dir(d) for d in (base_dir, instruct_dir, out_dir))
    for name, wi in instruct.items():
        if not refined(name, wi):
            assert torch.equal(got[name], wi), name
        elif wi.ndim == 2:
            want = timber_matrix(base[name], wi, LAM)[0].to(DTYPE)
            differ = float((got[name] != want).float().mean())
            assert differ <= BF16_TOLERANCE, f"{name}: {differ:.2%} of elements differ from the oracle"


def load(cls, path):
    model, info = cls.from_pretrained(path, dtype=DTYPE, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_timber_splits_what_the_forward_uses(arch, tmp_path):
    cls, base_dir, instruct_dir = build_pair(arch, tmp_path)
    cfg = write_yaml(tmp_path / "timber.yml", {
        "merge_method": "timber", "base_model": str(base_dir),
        "models": [{"model": str(instruct_dir)}], "parameters": {"lambda": LAM},
    })
    out = tmp_path / "out"
    run_cli("mergekit-yaml", cfg, out)

    # Drop-in by its weights too: exactly the Instruct checkpoint's names, shapes and dtypes
    # (per-expert where it is per-expert, stacked where stacked, renamed back).
    assert stored(out) == stored(instruct_dir)
    assert {t.dtype for t in load_dir(out).values() if t.is_floating_point()} == {DTYPE}
    assert_stored_tensors_match_oracle(base_dir, instruct_dir, out)
    merged, info = load(cls, out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.arange(2 * 5).reshape(2, 5) % merged.config.get_text_config().vocab_size
    # A text-only forward of Llama4ForConditionalGeneration fails in transformers 5.24
    # (its output dataclass reads image_outputs the text model does not return): run
    # its text decoder, the Llama4ForCausalLM it wraps.
    text_model = merged.language_model if arch == "llama4" else merged
    with torch.no_grad():
        logits = text_model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits.float()).all()

    base, instruct = (load(cls, d)[0].state_dict() for d in (base_dir, instruct_dir))
    got = merged.state_dict()
    assert set(got) == set(instruct)
    changed = 0
    for name, wi in instruct.items():
        if not refined(name, wi):
            assert torch.equal(got[name], wi), name
            continue
        b_maps, i_maps, o_maps = (forward_maps(arch, name, t[name]) for t in (base, instruct, got))
        for label, wi_m in i_maps.items():
            want = timber_matrix(b_maps[label], wi_m, LAM)[0].to(DTYPE)
            differ = float((o_maps[label] != want).float().mean())
            assert differ <= BF16_TOLERANCE, f"{label}: {differ:.2%} of elements differ from the oracle"
            changed += int(not torch.equal(o_maps[label], wi_m))
    assert changed > 0  # Timber did edit the model


def test_unknown_layout_stops_with_one_line_naming_tensor_and_shape():
    from mergekit_timber.method import layout
    from mergekit_timber.errors import TimberInputError

    arch = layout.Architecture(model_type="jetmoe", hidden_size=32)
    name = "model.layers.0.mlp.input_linear.weight"
    with pytest.raises(TimberInputError) as err:
        layout.split(name, (4, 48, 32), arch)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: shape [4, 48, 32]: no known layout for a 3-D tensor in jetmoe")
    # The same name in an architecture whose layout is known splits as its forward does.
    with pytest.raises(TimberInputError, match=r"experts\.gate_up_proj: shape \[4, 48, 32\]"):
        layout.split("m.experts.gate_up_proj", (4, 48, 32), layout.Architecture("llama4", hidden_size=32))


def test_unknown_layout_stops_the_merge(tmp_path):
    """Through mergekit-yaml: a stacked-expert architecture Timber has no layout for."""
    config = T.JetMoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2,
                            kv_channels=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = T.JetMoeForCausalLM(config).to(DTYPE)
    model.save_pretrained(tmp_path / "base")
    perturb(model, seed=1)
    model.save_pretrained(tmp_path / "instruct")
    cfg = write_yaml(tmp_path / "timber.yml", {
        "merge_method": "timber", "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "instruct")}],
    })
    proc = run_cli("mergekit-yaml", cfg, tmp_path / "out", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "no known layout" in line]
    assert len(lines) == 1 and "shape [" in lines[0] and "in jetmoe" in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("layout_name,shape", [
    ("_GATE_UP_ROWS", (3, 8, 5)), ("_GATE_UP_COLS", (3, 5, 8)), ("_GATE_UP_COLS_INTERLEAVED", (3, 5, 8)),
    ("_DOWN_ROWS", (3, 5, 4)),
])
def test_split_and_restore_are_inverse_and_slice_like_the_forward(layout_name, shape):
    from mergekit_timber.method import layout

    experts = getattr(layout, layout_name)
    split = layout.Split(True, experts.describe(), experts)
    t = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    stack = split.matrices(t)
    assert torch.equal(split.restore(stack, t), t)
    labels = split.labels(shape)
    assert len(labels) == stack.shape[0]
    for j, (part, e) in enumerate(labels):
        if experts.fused_axis is None:
            want = t[e]
        else:
            k = experts.parts.index(part)
            idx = slice(k, None, 2) if experts.interleaved else slice(k * 4, (k + 1) * 4)
            want = t[e][idx] if experts.fused_axis == 1 else t[e][:, idx]
        assert torch.equal(stack[j], want), (part, e)


@pytest.mark.parametrize("arch", ["llama4", "granitemoehybrid", "qwen3_moe", "mixtral", "glm4_moe", "llama"])
def test_analyze_uses_the_same_split(arch, tmp_path):
    """analyze reads checkpoints as stored (per-expert Hub tensors, Granite's input_linear,
    Llama 4's [E, H, 2I]) and gives one row per linear map of the forward, as the merge;
    every row is labelled with the Instruct checkpoint's own tensor name and expert."""
    from mergekit_timber.tools import analysis as an
    from oracle import erank

    cls, base_dir, instruct_dir = build_pair(arch, tmp_path)
    base, instruct = (load(cls, d)[0].state_dict() for d in (base_dir, instruct_dir))
    b, i = an.Checkpoint(base_dir, "base"), an.Checkpoint(instruct_dir, "instruct")
    try:
        rows = an.analyze_pair(b, i, lam=LAM).rows
        no_vocab = an.analyze_pair(b, i, lam=LAM, refine_embeddings=False).rows
        on_disk = set(i.names())
    finally:
        b.close()
        i.close()
    want = sorted(
        erank(torch.linalg.svdvals(i_m.double() - b_m.double()))
        for name, wi in instruct.items()
        # a tied lm_head is the embedding: one tensor on disk, one row
        if refined(name, wi) and (not name.endswith("lm_head.weight") or name in on_disk)
        for b_m, i_m in zip(forward_maps(arch, name, base[name]).values(),
                            forward_maps(arch, name, wi).values())
    )
    assert sorted(r["erank_delta"] for r in rows) == pytest.approx(want, rel=1e-6)
    for r in rows:
        assert r["tensor"] in on_disk, r["tensor"]
        per_expert = re.search(r"\.experts\.(\d+)\.", r["tensor"])
        if per_expert:  # Qwen3-MoE experts.{e}.gate_proj, Mixtral block_sparse_moe.experts.{e}.w1
            assert r["expert"] == int(per_expert.group(1)) and an.matrix_label(r) == r["tensor"], r
    experts = {r["tensor"] for r in rows if r["expert"] is not None}
    assert experts or arch == "llama"
    vocab = {r["tensor"] for r in rows} - {r["tensor"] for r in no_vocab}
    assert vocab and all("embed" in n or "lm_head" in n for n in vocab), vocab
