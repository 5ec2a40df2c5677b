"""Tests for pairs.synthetic: local Base/Instruct pairs for tests and demos."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mergekit_timber.checkpoint import Checkpoint
from pairs import synthetic
from pairs.synthetic import tensor_specs, write_pair, write_timber_yaml

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"  # where `pairs` lives
ARCHES = ("llama", "qwen3", "qwen3_moe")


def read_weights(model_dir):
    """{name: float32 tensor} and {name: safetensors dtype} over all shards."""
    with Checkpoint(model_dir, "model") as checkpoint:
        names = checkpoint.names()
        return {n: checkpoint.tensor(n) for n in names}, {n: checkpoint.info(n)[1] for n in names}


def shapes(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {arch: write_pair(root / arch, arch=arch) for arch in ARCHES}


@pytest.mark.parametrize("arch", ARCHES)
def test_loads_in_transformers_with_matching_keys(pairs, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    for model_dir in pairs[arch]:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
        assert not any(info.values()), info  # no missing / unexpected / mismatched keys
        assert model.dtype == torch.bfloat16
        reference = AutoModelForCausalLM.from_config(model.config)
        assert shapes(model.state_dict()) == shapes(reference.state_dict())

    # The files hold exactly what save_pretrained writes for this architecture.
    model.save_pretrained(tmp_path / "resaved")
    ours, our_dtypes = read_weights(model_dir)
    theirs, their_dtypes = read_weights(tmp_path / "resaved")
    assert shapes(ours) == shapes(theirs)
    assert our_dtypes == their_dtypes
    assert set(ours) == {s.name for s in tensor_specs(arch=arch)}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token_id == model.config.eos_token_id


def test_moe_tensor_names_and_layouts(pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    base, _ = pairs["qwen3_moe"]
    tensors, _ = read_weights(base)
    E, H, I = 4, 64, 32
    for e in range(E):
        assert tuple(tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"].shape) == (I, H)
        assert tuple(tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].shape) == (I, H)
        assert tuple(tensors[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].shape) == (H, I)
    assert tuple(tensors["model.layers.1.mlp.gate.weight"].shape) == (E, H)

    stacked_base, _ = write_pair(tmp_path / "stacked", arch="qwen3_moe", moe_layout="stacked")
    stacked, _ = read_weights(stacked_base)
    gate_up = stacked["model.layers.1.mlp.experts.gate_up_proj"]
    down = stacked["model.layers.1.mlp.experts.down_proj"]
    assert tuple(gate_up.shape) == (E, 2 * I, H) and tuple(down.shape) == (E, H, I)
    # Same values in both layouts; gate rows come first in gate_up_proj.
    assert torch.equal(gate_up[2, :I], tensors["model.layers.1.mlp.experts.2.gate_proj.weight"])
    assert torch.equal(gate_up[2, I:], tensors["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert torch.equal(down[3], tensors["model.layers.1.mlp.experts.3.down_proj.weight"])
    a = AutoModelForCausalLM.from_pretrained(base).state_dict()
    b = AutoModelForCausalLM.from_pretrained(stacked_base).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings(pairs, tmp_path):
    qwen3, _ = read_weights(pairs["qwen3"][0])
    assert "lm_head.weight" not in qwen3
    assert json.loads((pairs["qwen3"][0] / "config.json").read_text())["tie_word_embeddings"]
    for arch in ("llama", "qwen3_moe"):
        tensors, _ = read_weights(pairs[arch][0])
        assert "lm_head.weight" in tensors
        assert not json.loads((pairs[arch][0] / "config.json").read_text())["tie_word_embeddings"]
    untied, _ = write_pair(tmp_path / "untied", arch="qwen3", tie_embeddings=False)
    assert "lm_head.weight" in read_weights(untied)[0]
    tied, _ = write_pair(tmp_path / "tied", arch="llama", tie_embeddings=True)
    assert "lm_head.weight" not in read_weights(tied)[0]


@pytest.mark.parametrize("arch", ARCHES)
def test_every_tensor_moves_by_about_delta_scale(pairs, arch):
    base, _ = read_weights(pairs[arch][0])
    instruct, _ = read_weights(pairs[arch][1])
    assert base.keys() == instruct.keys()
    for name, b in base.items():
        delta = instruct[name].float() - b.float()
        assert delta.abs().max() > 0, name
        ratio = float(delta.norm() / b.float().norm())
        assert 0.01 < ratio < 0.04, (name, ratio)  # 0.02 up to bf16 rounding
        if b.dim() >= 2:
            assert abs(float(b.float().std()) - 0.02) < 0.01, name
        else:
            assert abs(float(b.float().mean()) - 1.0) < 0.05, name


def test_float32_and_exact_scale(tmp_path):
    base, instruct = write_pair(tmp_path, arch="llama", dtype=torch.float32, delta_scale=0.05)
    b, b_dtypes = read_weights(base)
    i, _ = read_weights(instruct)
    assert set(b_dtypes.values()) == {"F32"}
    assert json.loads((base / "config.json").read_text())["dtype"] == "float32"
    for name in b:
        ratio = float((i[name] - b[name]).norm() / b[name].norm())
        assert abs(ratio - 0.05) < 1e-3, (name, ratio)


def test_bfloat16_is_the_default(pairs):
    _, dtypes = read_weights(pairs["qwen3"][1])
    assert set(dtypes.values()) == {"BF16"}
    assert json.loads((pairs["qwen3"][1] / "config.json").read_text())["dtype"] == "bfloat16"


def test_deterministic_by_seed(pairs, tmp_path):
    again, _ = write_pair(tmp_path / "again", arch="qwen3")
    other, _ = write_pair(tmp_path / "other", arch="qwen3", seed=1)
    original = (pairs["qwen3"][0] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == original
    assert (other / "model.safetensors").read_bytes() != original
    a, _ = read_weights(pairs["qwen3"][1])
    b, _ = read_weights(tmp_path / "again" / "instruct")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spectra():
    g = torch.Generator().manual_seed(0)
    decay = torch.linalg.svdvals(synthetic._make_delta((96, 80), g, "decay"))
    assert decay[0] > 3 * decay[40]  # decays
    lowrank = torch.linalg.svdvals(synthetic._make_delta((96, 80), g, "lowrank"))
    assert lowrank[synthetic.LOWRANK_RANK_CAP] < 1e-4 * lowrank[0]
    flat = torch.linalg.svdvals(synthetic._make_delta((96, 80), g, "flat"))
    assert flat[0] < 3 * flat[40]


def test_sharded_checkpoint_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    base, _ = write_pair(tmp_path, arch="llama", layers=1, max_shard_bytes=100_000)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == {s.name for s in tensor_specs(arch="llama", layers=1)}
    _, info = AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)
    assert not any(info.values()), info
    # Rewriting as one file leaves no stale shards behind.
    write_pair(tmp_path, arch="llama", layers=1)
    assert not list(base.glob("model-*")) and not (base / "model.safetensors.index.json").exists()


def test_timber_yaml(tmp_path):
    import yaml

    path = write_timber_yaml(tmp_path / "t.yaml", "b", "i")
    assert yaml.safe_load(path.read_text()) == {
        "merge_method": "timber",
        "base_model": os.path.abspath("b"),
        "models": [{"model": os.path.abspath("i")}],
        "parameters": {"lambda": 0.2},
    }
    cfg = yaml.safe_load(
        write_timber_yaml(
            tmp_path / "l.yaml", "b", "i", method="timber_l", dtype="float32", out_dtype="bfloat16"
        ).read_text()
    )
    assert "parameters" not in cfg and cfg["dtype"] == "float32" and cfg["out_dtype"] == "bfloat16"
    cfg = yaml.safe_load(
        write_timber_yaml(tmp_path / "x.yaml", "b", "i", lambda_=0.5, extra={"parameters": {"k": 1}})
        .read_text()
    )
    assert cfg["parameters"] == {"lambda": 0.5, "k": 1}


def test_cli(tmp_path, capsys):
    assert synthetic.main([str(tmp_path / "cli"), "--arch", "llama", "--layers", "1",
                           "--dtype", "float32", "--yaml", str(tmp_path / "m.yaml")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.split()
    assert lines == [str(tmp_path / "cli" / "base"), str(tmp_path / "cli" / "instruct")]
    config = json.loads((tmp_path / "cli" / "base" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["dtype"] == "float32"
    assert "merge_method: timber" in (tmp_path / "m.yaml").read_text()


def test_qwen3_0_6b_shape_specs():
    specs = tensor_specs(**synthetic.QWEN3_0_6B_SHAPE)
    by_name = {s.name: s.shape for s in specs}
    assert "lm_head.weight" not in by_name
    assert by_name["model.embed_tokens.weight"] == (151936, 1024)
    assert by_name["model.layers.27.self_attn.q_proj.weight"] == (2048, 1024)
    assert by_name["model.layers.27.self_attn.k_proj.weight"] == (1024, 1024)
    assert by_name["model.layers.27.mlp.down_proj.weight"] == (1024, 3072)
    assert len(specs) == 1 + 28 * 11 + 1
    assert 590e6 < sum(s.numel for s in specs) < 600e6  # Qwen3-0.6B: 596M stored parameters


@pytest.mark.parametrize("arch", ARCHES)
def test_mergekit_linear_merge(pairs, arch, tmp_path):
    """mergekit reads the pair (per-expert MoE layout included) and writes a loadable model."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM

    base, instruct = pairs[arch]
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(base), "parameters": {"weight": 0.5}},
                {"model": str(instruct), "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        }
    )
    out = tmp_path / "merged"
    run_merge(config, str(out), options=MergeOptions(quiet=True))
    merged, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    i = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32).state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, (b[name] + i[name]) / 2, atol=1e-6, rtol=0)
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"


def test_base_and_instruct_files_differ_as_in_real_pairs(pairs):
    """Same vocabulary; only the Instruct chats (template, <|im_end|> eos, sampling defaults)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    base, instruct = pairs["qwen3"]
    b_tok, i_tok = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(instruct)
    assert b_tok.get_vocab() == i_tok.get_vocab()
    assert (b_tok.eos_token, i_tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert b_tok.chat_template is None and not (base / "chat_template.jinja").exists()
    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompt = i_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    b_cfg, i_cfg = AutoConfig.from_pretrained(base), AutoConfig.from_pretrained(instruct)
    assert (b_cfg.eos_token_id, i_cfg.eos_token_id) == (b_tok.eos_token_id, i_tok.eos_token_id) == (1, 3)
    b_gen, i_gen = GenerationConfig.from_pretrained(base), GenerationConfig.from_pretrained(instruct)
    assert b_gen.eos_token_id == 1 and i_gen.eos_token_id == [3, 1] and i_gen.do_sample and not b_gen.do_sample
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (base / name).read_bytes() != (instruct / name).read_bytes(), name


def test_tokenizer_encodes_plain_english(pairs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pairs["llama"][1])
    text = "What is 2+3? Hello, world! Timber refines an instruct model; café, naïve, 100%."
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids and len(ids) < len(text.encode()) / 2  # merges, not bytes only
    assert tok.decode(ids) == text
    assert len(tok("What is 2+3?").input_ids) <= 8


def test_tokenizer_is_the_same_in_every_process(tmp_path):
    """Trained at build time, so it must not depend on hashing seeds or threads."""
    import hashlib
    import subprocess
    import sys

    code = f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import hashlib; from pairs import synthetic as s; print(hashlib.sha256(s._tokenizer_json(600).encode()).hexdigest())"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONHASHSEED=str(k), RAYON_NUM_THREADS=str(k + 1))).stdout
        for k in range(2)
    }  # fmt: skip
    assert runs == {hashlib.sha256(synthetic._tokenizer_json(600).encode()).hexdigest() + "\n"}


def test_vocab_sizes(tmp_path):
    from transformers import AutoTokenizer

    base, _ = write_pair(tmp_path / "big", arch="llama", layers=1, hidden=16, intermediate=16, heads=2,
                         kv_heads=1, head_dim=8, vocab=3000)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(base)
    assert len(tok) == 3000 and tok.convert_ids_to_tokens(2999).startswith("<|extra_")
    with pytest.raises(ValueError, match="vocab must be at least 260"):
        write_pair(tmp_path / "small", vocab=100)
    assert not (tmp_path / "small").exists()


def test_same_files_on_request(tmp_path):
    base, instruct = write_pair(tmp_path, arch="llama", layers=1, distinct_files=False)
    names = sorted(p.name for p in instruct.iterdir() if p.suffix != ".safetensors")
    assert names == sorted(p.name for p in base.iterdir() if p.suffix != ".safetensors")
    assert all((base / n).read_bytes() == (instruct / n).read_bytes() for n in names)
    write_pair(tmp_path, arch="llama", layers=1)  # back to distinct: no stale template in Base
    assert not (base / "chat_template.jinja").exists()


def test_cli_refuses_a_too_small_vocab_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        synthetic.main([str(tmp_path / "p"), "--vocab", "100"])
    assert exit_.value.code == 2 and "error: vocab must be at least 260" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
