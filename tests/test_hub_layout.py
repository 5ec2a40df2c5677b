"""A Timber output keeps the Instruct checkpoint's tensor names and layout (issue 19):
per-expert stays per-expert, stacked stays stacked, in every writer (mergekit-yaml,
--out-shard-size, sweep, each step of mergekit-multi), and other merges are untouched."""

import filecmp
import json

import pytest
import torch

from helpers import load_dir, run_cli, write_yaml
from mergekit_timber.checkpoint import Checkpoint
from pairs.synthetic import write_pair

NO_HOOK = {"MERGEKIT_TIMBER_NO_HOOK": "1", "PYTHONHASHSEED": "0"}


def stored(model_dir) -> dict:
    with Checkpoint(model_dir, "model") as checkpoint:
        return {name: checkpoint.info(name) for name in checkpoint.names()}


def timber(base, instruct, lam=0.2, **extra):
    return {"merge_method": "timber", "base_model": str(base), "models": [{"model": str(instruct)}],
            "parameters": {"lambda": lam}, **extra}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The same qwen3_moe pair stored per expert (as on the Hub) and stacked."""
    root = tmp_path_factory.mktemp("moe")
    return {
        layout: write_pair(root / layout, arch="qwen3_moe", layers=2, seed=5, moe_layout=layout)
        for layout in ("per_expert", "stacked")
    }


@pytest.fixture(scope="module")
def merged(moe, tmp_path_factory):
    """The Timber output of each layout of the pair (mergekit-yaml)."""
    root = tmp_path_factory.mktemp("merged")
    outs = {}
    for layout, (base, instruct) in moe.items():
        outs[layout] = root / layout
        run_cli("mergekit-yaml", write_yaml(root / f"{layout}.yml", timber(base, instruct)), outs[layout])
    return outs


def per_expert_view(tensors: dict) -> dict:
    """Stacked experts as per-expert tensors (gate rows first), to compare layouts."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = t[e, :half]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = t[e, half:]
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e]
        else:
            out[name] = t
    return out


def test_output_follows_the_instruct_layout(moe, merged):
    """Per-expert on disk gives per-expert names, stacked on disk stays stacked; the
    values are the same merge either way."""
    outs = merged
    for layout, (_, instruct) in moe.items():
        assert stored(outs[layout]) == stored(instruct)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in stored(outs["per_expert"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored(outs["stacked"])
    got, want = per_expert_view(load_dir(outs["stacked"])), load_dir(outs["per_expert"])
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_out_shard_size_holds_with_per_expert_names(moe, merged, tmp_path):
    base, instruct = moe["per_expert"]
    cfg = write_yaml(tmp_path / "t.yml", timber(base, instruct))
    whole, sharded = merged["per_expert"], tmp_path / "sharded"
    limit = 50_000
    run_cli("mergekit-yaml", cfg, sharded, "--out-shard-size", str(limit))
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored(instruct)) and set(index["weight_map"].values()) == set(files)
    for name in files:
        with Checkpoint(sharded, "model") as checkpoint:
            sizes = [
                torch.Size(shape).numel() * 2  # bfloat16
                for tensor, shape in ((t, checkpoint.info(t)[0]) for t, f in index["weight_map"].items() if f == name)
            ]
        assert sum(sizes) <= limit or len(sizes) == 1, (name, sum(sizes))
    assert stored(sharded) == stored(instruct)
    got, want = load_dir(sharded), load_dir(whole)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_every_sweep_output_has_the_instruct_names(tmp_path):
    """Mixtral: the experts are renamed and split back in the extra outputs too."""
    from test_architectures import build_pair

    _, base, instruct = build_pair("mixtral", tmp_path)
    cfg = write_yaml(tmp_path / "s.yml", timber(base, instruct))
    out = tmp_path / "sweep"
    run_cli("mergekit-timber", "sweep", cfg, out, "--lambdas", "0.2,0.5")
    for lam in ("0.2", "0.5"):  # the first written through mergekit, the other by the sweep's writer
        assert stored(out / f"lambda-{lam}") == stored(instruct)
    single = tmp_path / "single"
    run_cli("mergekit-yaml", out / "lambda-0.5" / "mergekit_config.yml", single)
    got, want = load_dir(out / "lambda-0.5"), load_dir(single)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_multi_chain_writes_and_reads_the_instruct_layout(moe, tmp_path):
    """Each Timber step writes per-expert names; the next step reads them as mergekit
    reads any Hub checkpoint: the same as running that step alone without the plugin."""
    base, instruct = moe["per_expert"]
    steps = [
        dict(name="refined", **timber(base, instruct)),
        {"merge_method": "linear", "models": [
            {"model": "refined", "parameters": {"weight": 0.5}},
            {"model": str(instruct), "parameters": {"weight": 0.5}}], "dtype": "bfloat16"},
    ]
    import yaml

    cfg = tmp_path / "multi.yml"
    cfg.write_text(yaml.safe_dump_all(steps, sort_keys=False))
    inter, final = tmp_path / "inter", tmp_path / "final"
    run_cli("mergekit-multi", cfg, "--intermediate-dir", inter, "--out-path", final)
    assert stored(inter / "refined") == stored(instruct)
    alone = dict(steps[1], models=[dict(steps[1]["models"][0], model=str(inter / "refined")), steps[1]["models"][1]])
    direct = tmp_path / "direct"
    run_cli("mergekit-yaml", write_yaml(tmp_path / "alone.yml", alone), direct, env=NO_HOOK)
    got, want = load_dir(final), load_dir(direct)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_other_merges_of_a_moe_pair_stay_byte_identical(moe, tmp_path):
    base, instruct = moe["per_expert"]
    config = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(instruct), "parameters": {"weight": 0.7, "density": 0.6}}]}
    cfg = write_yaml(tmp_path / "c.yml", config)
    outs = {}
    for label, env in (("with", {"PYTHONHASHSEED": "0"}), ("without", NO_HOOK)):
        outs[label] = tmp_path / label / "out"
        run_cli("mergekit-yaml", cfg, outs[label], env=env)
    names = sorted(p.name for p in outs["with"].iterdir())
    assert names == sorted(p.name for p in outs["without"].iterdir()) and "model.safetensors" in names
    _, mismatch, errors = filecmp.cmpfiles(outs["with"], outs["without"], names, shallow=False)
    assert not mismatch and not errors, mismatch
    # mergekit's own layout (stacked) for a non-Timber merge: nothing of the plugin's.
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored(outs["with"])


# --------------------------------------------------------------------------- the reversal


def test_fused_on_disk_is_written_once_all_its_parts_arrived():
    """hrm_text stores mlp.gate_up_proj.weight, which transformers splits on load: the
    reverse fuses mergekit's gate_proj and up_proj back, written with the second part."""
    from mergekit_timber.integration.hub_layout import InstructLayout

    fused = "model.layers.0.mlp.gate_up_proj.weight"
    layout = InstructLayout({fused: (8, 3), "model.layers.0.attn.o_proj.weight": (3, 3)}, "hrm_text")
    gate, up = torch.arange(12.0).reshape(4, 3), -torch.arange(12.0).reshape(4, 3)
    pending = {}
    assert layout.revert("model.layers.0.mlp.up_proj.weight", up, pending) == []
    assert pending
    ((name, value),) = layout.revert("model.layers.0.mlp.gate_proj.weight", gate, pending)
    assert name == fused and torch.equal(value, torch.cat([gate, up])) and not pending
    # a renaming alone, and a name the checkpoint stores as it is
    ((name, _),) = layout.revert("model.layers.0.self_attn.o_proj.weight", gate[:3], pending)
    assert name == "model.layers.0.attn.o_proj.weight"


def test_a_reversal_the_instruct_does_not_store_stops_with_one_line():
    from mergekit_timber.errors import TimberOutputError
    from mergekit_timber.integration.hub_layout import InstructLayout

    layout = InstructLayout({"model.layers.0.mlp.experts.0.gate_proj.weight": (3, 4)}, "qwen3_moe", source="inst")
    stack = torch.zeros(2, 6, 4)
    with pytest.raises(TimberOutputError) as error:
        layout.revert("model.layers.0.mlp.experts.gate_up_proj", stack, {})
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.layers.0.mlp.experts.gate_up_proj: ")
    assert "does not store" in message  # expert 1 is not in this checkpoint
    layout = InstructLayout({f"model.layers.0.mlp.experts.{e}.{p}.weight": (2, 4)
                             for e in (0, 1) for p in ("gate_proj", "up_proj")}, "qwen3_moe", source="inst")
    with pytest.raises(TimberOutputError, match=r"shape \[3, 4\] where the Instruct checkpoint stores \[2, 4\]"):
        layout.revert("model.layers.0.mlp.experts.gate_up_proj", stack, {})
    # a sliced merge renumbers layers: layer 5 of the output is layer 0's layout
    pieces = layout.revert("model.layers.5.mlp.experts.gate_up_proj", torch.zeros(2, 4, 4), {})
    assert [n for n, _ in pieces][0] == "model.layers.5.mlp.experts.0.gate_proj.weight"


def test_writers_of_other_directories_are_mergekit_s(tmp_path):
    from mergekit.io.tensor_writer import TensorWriter
    from mergekit_timber.integration import hub_layout

    _, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=1, seed=1)
    stack = torch.randn(4, 64, 64).to(torch.bfloat16)  # [E, 2I, H] of the synthetic pair's defaults
    name = "model.layers.0.mlp.experts.gate_up_proj"
    registered, other = tmp_path / "registered", tmp_path / "other"
    with hub_layout.written_like_instruct(instruct, [registered]):
        for directory in (registered, other):
            writer = TensorWriter(str(directory))
            writer.save_tensor(name, stack)
            writer.finalize()
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in hub_layout.written(registered)
    assert list(stored(other)) == [name]
    assert set(stored(registered)) == {f"model.layers.0.mlp.experts.{e}.{p}.weight"
                                       for e in range(4) for p in ("gate_proj", "up_proj")}
    assert not hub_layout._TARGETS  # nothing left registered


def test_a_reverse_op_that_asks_the_model_gets_the_instruct_s_stored_shape():
    """qwen3_vl_moe's reverse Transpose(check_dims) transposes only where the shape differs
    from the parameter's: here the parameter is the Instruct's stored tensor, so a tensor in
    the transformers layout [E, 2I, H] goes back to the stored [E, H, 2I]."""
    from mergekit_timber.integration.hub_layout import InstructLayout

    layout = InstructLayout({"model.language_model.layers.0.mlp.experts.gate_up_proj": (4, 8, 6)}, "qwen3_vl_moe")
    merged = torch.arange(4 * 6 * 8.0).reshape(4, 6, 8)
    name = "model.language_model.layers.5.mlp.experts.gate_up_proj"  # a sliced merge renumbered it
    ((piece, value),) = layout.revert(name, merged, {})
    assert piece == name and torch.equal(value, merged.transpose(1, 2))
    # already as stored: written as it is
    ((piece, value),) = layout.revert(name, merged.transpose(1, 2).contiguous(), {})
    assert value.shape == (4, 8, 6)


def test_pickled_shards_hold_each_piece_once(tmp_path):
    """--no-safe-serialization: a pickled shard would store the whole storage of every view,
    so pieces of a split tensor are written as their own tensors."""
    from mergekit.io.tensor_writer import TensorWriter
    from mergekit_timber.integration import hub_layout

    _, instruct = write_pair(tmp_path / "pair", arch="qwen3_moe", layers=1, seed=1)
    down = torch.randn(4, 64, 32).to(torch.bfloat16)  # [E, H, I]
    out = tmp_path / "out"
    with hub_layout.written_like_instruct(instruct, [out]):
        writer = TensorWriter(str(out), max_shard_size=down[0].numel() * 2, safe_serialization=False)
        writer.save_tensor("model.layers.0.mlp.experts.down_proj", down)  # one expert per shard
        writer.finalize()
    shards = sorted(out.glob("*.bin"))
    assert len(shards) == 4
    assert sum(s.stat().st_size for s in shards) < 2 * down.numel() * 2  # not 4 copies of the stack
    got = {k: v for s in shards for k, v in torch.load(s, weights_only=True).items()}
    assert sorted(got) == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4)]
    assert all(torch.equal(got[f"model.layers.0.mlp.experts.{e}.down_proj.weight"], down[e]) for e in range(4))
