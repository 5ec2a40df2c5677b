"""`mergekit-timber analyze` on tiny local pairs, checked against an independent float64 SVD.

Every number of erank.csv is recomputed here from torch.linalg.svdvals and the oracle
(tests/oracle.py: full SVD, U S' V^T), matrix by matrix (one per expert and per
projection for MoE), including the realized edit after rounding the oracle's W_out to
bfloat16.
"""

import csv
import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

from helpers import load_dir, run_cli
from pairs.synthetic import write_pair
from oracle import erank, head_k, timber_matrix

PLOTS = ("erank_base_vs_instruct.png", "erank_ratio_hist.png", "k_per_layer.png")
FLOATS = (
    "erank_base", "erank_instruct", "erank_delta", "erank_ratio_base", "erank_ratio_instruct",
    "erank_ratio_delta", "k_ratio", "energy_kept", "delta_rel_norm", "edit_rel_norm",
    "realized_edit", "changed_fraction",
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: OpenMP threads only spin against each other (and other test runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze_pairs")
    return {
        "llama": write_pair(root / "llama", arch="llama", layers=2, seed=3),
        "moe": write_pair(root / "moe", arch="qwen3_moe", layers=2, seed=4, moe_layout="stacked"),
        "moe_hub": write_pair(root / "moe_hub", arch="qwen3_moe", layers=2, seed=4),
        "qwen3": write_pair(root / "qwen3", arch="qwen3", layers=2, seed=5),
        "llama_narrow": write_pair(root / "narrow", arch="llama", layers=2, hidden=32, seed=3),
        # the llama pair again (same seed: same values), in several shards with an index
        "llama_sharded": write_pair(root / "sharded", arch="llama", layers=2, seed=3, max_shard_bytes=40_000),
    }


def main():
    from mergekit_timber.cli import main as group

    return group


def invoke(*args):
    return CliRunner().invoke(main(), ["analyze", *map(str, args)])


def read_csv(path):
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            for key in ("expert", "layer", "rows", "cols", "rank", "k"):
                r[key] = int(r[key]) if r[key] != "" else None
            for key in FLOATS:
                r[key] = float(r[key]) if r[key] != "" else math.nan
            rows.append(r)
    return rows


# --------------------------------------------------------------------------- the oracle


def matrices(tensors):
    """{(layer, module, expert): 2-D matrix}, split and named independently of the package."""
    out = {}
    for name, t in tensors.items():
        if t.ndim < 2:
            continue
        layer = re.search(r"layers\.(\d+)\.", name)
        layer = int(layer.group(1)) if layer else None
        stem = re.sub(r"\.weight$", "", name)
        rest = stem.split(f"layers.{layer}.", 1)[1] if layer is not None else stem.removeprefix("model.")
        per_expert = re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+)", rest)
        stacked = re.fullmatch(r"mlp\.experts\.(gate_up_proj|down_proj)", rest)
        if per_expert:
            out[(layer, "experts." + per_expert.group(2), int(per_expert.group(1)))] = t
        elif stacked and t.ndim == 3:
            for e in range(t.shape[0]):
                if stacked.group(1) == "gate_up_proj":
                    half = t.shape[1] // 2
                    out[(layer, "experts.gate_proj", e)] = t[e, :half]
                    out[(layer, "experts.up_proj", e)] = t[e, half:]
                else:
                    out[(layer, "experts.down_proj", e)] = t[e]
        else:
            out[(layer, rest, None)] = t.reshape(t.shape[0], -1)
    return out


def oracle_row(wb, wi, lam, dtype=torch.bfloat16, rule="erank", value=None):
    wb64, wi64 = wb.double(), wi.double()
    sb, si = torch.linalg.svdvals(wb64), torch.linalg.svdvals(wi64)
    w_out, sd, k = timber_matrix(wb, wi, lam, rule, value)
    rank = min(wb.shape)
    edit = w_out - wi64
    stored = w_out.to(dtype).double() - wi64
    return {
        "rank": rank,
        "erank_base": erank(sb),
        "erank_instruct": erank(si),
        "erank_delta": erank(sd),
        "k": k,
        "energy_kept": float((sd[:k] ** 2).sum() / (sd**2).sum()),
        "delta_rel_norm": float((wi64 - wb64).norm() / wb64.norm()),
        "edit_rel_norm": float(edit.norm() / wi64.norm()),
        "realized_edit": float((stored * edit).sum() / (edit * edit).sum()),
        "changed": int((stored != 0).sum()),
    }


def assert_rows_match(rows, base_dir, instruct_dir, lam, dtype=torch.bfloat16, rule="erank", value=None):
    base, instruct = matrices(load_dir(base_dir)), matrices(load_dir(instruct_dir))
    got = {(r["layer"], r["module"], r["expert"]): r for r in rows}
    assert set(got) == set(instruct), sorted(set(got) ^ set(instruct), key=str)[:5]
    assert len(rows) == len(got)  # one row per matrix
    for key, wi in instruct.items():
        r, want = got[key], oracle_row(base[key], wi, lam, dtype, rule, value)
        where = f"{key}: {r}"
        assert (r["rows"], r["cols"], r["rank"]) == (*wi.shape, want["rank"]), where
        for name in ("erank_base", "erank_instruct", "erank_delta"):
            assert r[name] == pytest.approx(want[name], rel=1e-9), (name, where)
            assert r[name.replace("erank", "erank_ratio")] == pytest.approx(want[name] / want["rank"], rel=1e-9)
        assert r["k"] == want["k"], where
        assert r["k_ratio"] == pytest.approx(want["k"] / want["rank"])
        for name in ("energy_kept", "delta_rel_norm", "edit_rel_norm"):
            assert r[name] == pytest.approx(want[name], rel=1e-8, abs=1e-12), (name, where)
        # Rounding is a step function: W_out from the Gram route and from the full SVD
        # agree to ~1e-12, so at most a rare element may round the other way.
        numel = wi.numel()
        assert abs(r["changed_fraction"] * numel - want["changed"]) <= 1, where
        if want["edit_rel_norm"] < 1e-12:  # K = rank: nothing to edit (the SVD's residue aside)
            assert math.isnan(r["realized_edit"]) and r["edit_rel_norm"] == 0, where
        else:
            assert r["realized_edit"] == pytest.approx(want["realized_edit"], abs=2e-3), where
        assert r["out_dtype"] == str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- tests


def test_llama_csv_plots_and_table_match_the_oracle(pairs, tmp_path):
    base_dir, instruct_dir = pairs["llama"]
    out = tmp_path / "llama"
    result = invoke(base_dir, instruct_dir, "-o", out)
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "erank.csv")
    assert_rows_match(rows, base_dir, instruct_dir, lam=0.2)
    # parsed names
    by_tensor = {r["tensor"]: r for r in rows}
    q = by_tensor["model.layers.1.self_attn.q_proj.weight"]
    assert (q["layer"], q["module"], q["expert"]) == (1, "self_attn.q_proj", None)
    assert by_tensor["model.embed_tokens.weight"]["module"] == "embed_tokens"
    assert by_tensor["lm_head.weight"]["layer"] is None
    assert by_tensor["model.layers.0.mlp.down_proj.weight"]["module"] == "mlp.down_proj"
    assert rows[0]["tensor"] == "model.embed_tokens.weight"  # embeddings, layers, then the rest

    import matplotlib.image

    for png in PLOTS:
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, png
        assert float(image[..., :3].std()) > 0, f"{png} is blank"

    # the summary table
    text = result.stdout
    ratios = sorted(r["erank_ratio_base"] for r in rows)
    median = (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    assert f"matrices                    {len(rows)} " in text
    assert f"median eRank/rank Base      {median:.3f}" in text
    lowest = sorted(rows, key=lambda r: r["realized_edit"])[:5]
    table = text.split("Lowest realized edit (5):")[1]
    assert [line.split()[-1] for line in table.strip().splitlines()[1:]] == [r["tensor"] for r in lowest]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["matrices"] == len(rows) and summary["lambda"] == 0.2
    assert summary["median_erank_ratio_base"] == pytest.approx(median)


def test_realized_edit_is_what_the_merge_kernel_writes(pairs, tmp_path):
    """changed_fraction counts exactly the elements the kernel's bf16 output changes."""
    from mergekit_timber.method.adapter import refine_tensor

    base_dir, instruct_dir = pairs["llama"]
    out = tmp_path / "a"
    assert invoke(base_dir, instruct_dir, "-o", out, "--lambda", "0.5").exit_code == 0
    rows = {r["tensor"]: r for r in read_csv(out / "erank.csv")}
    base, instruct = load_dir(base_dir), load_dir(instruct_dir)
    for name, r in rows.items():
        merged = refine_tensor(name, base[name], instruct[name], 0.5)
        assert merged.dtype == torch.bfloat16
        changed = int((merged != instruct[name]).sum())
        assert changed == round(r["changed_fraction"] * merged.numel()), name


def test_moe_one_row_per_expert_and_projection(pairs, tmp_path):
    base_dir, instruct_dir = pairs["moe"]  # stacked experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    out = tmp_path / "moe"
    result = invoke(base_dir, instruct_dir, "-o", out, "--lambda", "0.5")
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "erank.csv")
    assert_rows_match(rows, base_dir, instruct_dir, lam=0.5)
    experts = [r for r in rows if r["expert"] is not None]
    assert {r["module"] for r in experts} == {"experts.gate_proj", "experts.up_proj", "experts.down_proj"}
    assert len(experts) == 2 * 4 * 3  # layers x experts x projections
    assert {r["tensor"] for r in experts if r["module"] == "experts.up_proj"} == {
        f"model.layers.{i}.mlp.experts.gate_up_proj" for i in (0, 1)
    }
    for png in PLOTS:
        assert (out / png).stat().st_size > 0

    # The table of lowest realized edits names expert matrices by expert (and projection).
    result = invoke(base_dir, instruct_dir, "-o", tmp_path / "experts", "--lambda", "0.5", "--filter", "experts")
    assert result.exit_code == 0, result.output
    rows = [r for r in read_csv(tmp_path / "experts" / "erank.csv") if not math.isnan(r["realized_edit"])]
    lowest = sorted(rows, key=lambda r: r["realized_edit"])[:5]
    assert all(r["expert"] is not None for r in lowest)

    def label(r):
        proj = r["module"].split(".")[-1]
        fused = r["tensor"].endswith("gate_up_proj")
        return f"{r['tensor']} [expert {r['expert']}" + (f", {proj}]" if fused else "]")

    table = result.stdout.split("Lowest realized edit (5):")[1].strip().splitlines()[1:]
    assert [line.split(None, 2)[2] for line in table] == [label(r) for r in lowest]


def rows_of(pair):
    from mergekit_timber.tools import analysis as an

    base, instruct = an.Checkpoint(pair[0], "base"), an.Checkpoint(pair[1], "instruct")
    try:
        rows = an.analyze_pair(base, instruct, lam=0.2).rows
    finally:
        base.close()
        instruct.close()
    return {(r["layer"], r["module"], r["expert"]): r for r in rows}


def test_moe_layouts_give_the_same_rows(pairs):
    """Stacked experts and the per-expert Hub layout hold the same values: same rows."""
    stacked, hub = rows_of(pairs["moe"]), rows_of(pairs["moe_hub"])
    assert set(stacked) == set(hub)
    for key, r in stacked.items():
        for col in FLOATS + ("k",):
            assert r[col] == pytest.approx(hub[key][col], rel=1e-9, nan_ok=True), (key, col)


def test_sharded_checkpoint_reads_like_a_single_file(pairs):
    sharded_dir = pairs["llama_sharded"][1]
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 2
    single, sharded = rows_of(pairs["llama"]), rows_of(pairs["llama_sharded"])
    assert single.keys() == sharded.keys()
    for key, r in single.items():
        assert {c: r[c] for c in FLOATS + ("k",)} == pytest.approx(
            {c: sharded[key][c] for c in FLOATS + ("k",)}, nan_ok=True
        ), key


def test_help_lists_the_csv_columns():
    from mergekit_timber.tools.analysis import COLUMNS

    result = invoke("--help")
    assert result.exit_code == 0
    for column in COLUMNS:
        assert f"  {column} " in result.stdout, column


def test_head_rules_and_out_dtype(pairs, tmp_path):
    base_dir, instruct_dir = pairs["qwen3"]  # tied embeddings: no lm_head
    out = tmp_path / "rr"
    result = invoke(base_dir, instruct_dir, "-o", out, "--rank-ratio", "0.5", "--lambda", "0",
                    "--out-dtype", "float16", "--filter", "mlp")
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "erank.csv")
    assert rows and all(".mlp." in r["tensor"] for r in rows)
    assert "ceil(0.5 * rank)" in result.stdout
    base, instruct = matrices(load_dir(base_dir)), matrices(load_dir(instruct_dir))
    for r in rows:
        key = (r["layer"], r["module"], r["expert"])
        want = oracle_row(base[key], instruct[key], 0.0, torch.float16, "rank_ratio", 0.5)
        assert r["k"] == want["k"] == math.ceil(0.5 * r["rank"])
        assert r["realized_edit"] == pytest.approx(want["realized_edit"], abs=2e-3)
        assert r["out_dtype"] == "float16"

    out = tmp_path / "energy"
    result = invoke(base_dir, instruct_dir, "-o", out, "--energy", "0.9", "--out-dtype", "float32",
                    "--filter", "self_attn.q_proj")
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "erank.csv")
    assert len(rows) == 2
    for r in rows:
        key = (r["layer"], r["module"], r["expert"])
        _, s, k = timber_matrix(base[key], instruct[key], 0.2, "energy", 0.9)
        assert r["k"] == k == head_k(s, "energy", 0.9)
        assert r["energy_kept"] >= 0.9
        assert r["realized_edit"] == pytest.approx(1.0, abs=1e-5)  # float32 keeps the edit
        assert r["changed_fraction"] > 0.9


def test_console_script_json(pairs, tmp_path):
    base_dir, instruct_dir = pairs["moe"]
    out = tmp_path / "json"
    proc = run_cli("mergekit-timber", "analyze", base_dir, instruct_dir, "-o", out,
                   "--format", "json", "--filter", "self_attn", "--lambda", "0.8",
                   env={"OMP_NUM_THREADS": "1"})
    doc = json.loads(proc.stdout)
    assert doc["summary"]["lambda"] == 0.8
    assert doc["summary"]["matrices"] == len(doc["rows"]) == 8
    assert all(r["module"].startswith("self_attn.") for r in doc["rows"])
    assert len(doc["summary"]["lowest_realized_edit"]) == 5
    csv_rows = read_csv(out / "erank.csv")
    for j, c in zip(doc["rows"], csv_rows):
        assert j["tensor"] == c["tensor"] and j["k"] == c["k"]
        assert j["realized_edit"] == pytest.approx(c["realized_edit"], rel=1e-12)
    assert set(doc["columns"]) == set(csv_rows[0])
    for png in PLOTS:
        assert (out / png).stat().st_size > 0


def _one_line_error(result):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mergekit-timber: error: "), result.stderr
    return lines[0]


def test_bad_inputs_give_one_line_errors(pairs, tmp_path, monkeypatch):
    base_dir, instruct_dir = pairs["llama"]
    line = _one_line_error(invoke(tmp_path / "missing", instruct_dir, "-o", tmp_path / "o"))
    assert "no such directory" in line and "missing" in line

    line = _one_line_error(invoke(base_dir, pairs["moe"][1], "-o", tmp_path / "o"))
    assert "LlamaForCausalLM" in line and "Qwen3MoeForCausalLM" in line

    line = _one_line_error(invoke(base_dir, pairs["llama_narrow"][1], "-o", tmp_path / "o"))
    assert "model.embed_tokens.weight" in line and "shape" in line

    line = _one_line_error(invoke(base_dir, instruct_dir, "-o", tmp_path / "o", "--filter", "nothing"))
    assert "no tensor" in line

    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(invoke(base_dir, empty, "-o", tmp_path / "o"))
    assert "safetensors" in line

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    line = _one_line_error(invoke("no-such-org/no-such-model", instruct_dir, "-o", tmp_path / "o"))
    assert "Hugging Face Hub" in line and "no-such-org/no-such-model" in line

    result = invoke(base_dir, instruct_dir, "-o", tmp_path / "o", "--energy", "0.9", "--rank-ratio", "0.5")
    assert result.exit_code == 2 and "at most one" in result.stderr
    assert not (tmp_path / "o").exists()
