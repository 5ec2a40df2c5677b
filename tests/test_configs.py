"""The recipes in configs/: valid mergekit configurations that plan, with the paper's lambdas.

Every document of every YAML is validated with mergekit's MergeConfiguration; the Hub
ids are then swapped for tiny local models of the same architecture and the merge is
planned with mergekit's MergePlanner (as mergekit.merge.run_merge does) without
running it. The planned tasks are checked: the method, the lambda every tensor gets
and the output dtype.
"""

import re
from pathlib import Path

import pytest
import yaml

import mergekit_timber  # noqa: F401 - registers timber / timber_l with mergekit
from pairs.synthetic import write_pair

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yml")) + sorted(CONFIGS.glob("*.yaml"))

LAMBDAS = (0.0, 0.2, 0.5, 0.8)
TABLE5_FILE = Path(__file__).resolve().parent / "data" / "paper_table5.md"


def read_table5(path=TABLE5_FILE):
    """{base Hub id: (Instruct, lambda=0, 0.2, 0.5, 0.8)} and {base Hub id: bold lambdas}
    from the copy of the paper's Table 5 (a markdown table, best of a row in bold)."""
    scores, bold = {}, {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not re.fullmatch(r"\**\d+\.\d+\**", cells[1]):
            continue
        base = cells[0].split(" -> ")[0]
        base = ("meta-llama/" if base.startswith("Llama") else "Qwen/") + base
        scores[base] = tuple(float(c.strip("*")) for c in cells[1:])
        bold[base] = {lam for lam, c in zip(LAMBDAS, cells[2:]) if c.startswith("**")}
    return scores, bold


TABLE5, TABLE5_BOLD = read_table5()

PAPER_RECIPES = {
    "llama-3.2-1b.yml": ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
    "llama-3.2-3b.yml": ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
    "llama-3.1-8b.yml": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"),
    "qwen3-0.6b.yml": ("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B"),
    "qwen3-8b.yml": ("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B"),
    "qwen3-14b.yml": ("Qwen/Qwen3-14B-Base", "Qwen/Qwen3-14B"),
    "qwen3-30b-a3b.yml": ("Qwen/Qwen3-30B-A3B-Base", "Qwen/Qwen3-30B-A3B"),
}

# Every Hub id the recipes use -> (tiny architecture, role). Llama -> llama,
# Qwen3 dense -> qwen3, Qwen3-30B-A3B -> qwen3_moe; a domain model -> another pair's instruct.
TINY = {
    **{base: ("llama" if "llama" in base else "qwen3_moe" if "A3B" in base else "qwen3", "base")
       for base, _ in PAPER_RECIPES.values()},
    **{inst: ("llama" if "llama" in inst else "qwen3_moe" if "A3B" in inst else "qwen3", "instruct")
       for _, inst in PAPER_RECIPES.values()},
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": ("llama", "domain"),
}


def best_lambda(row):
    """The lambda of the best average; a tie goes to the first (smaller) lambda."""
    scores = row[1:]
    return LAMBDAS[scores.index(max(scores))]


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for seed, arch in enumerate(("llama", "qwen3", "qwen3_moe")):
        base, instruct = write_pair(root / arch, arch=arch, layers=2, seed=seed)
        models[(arch, "base")], models[(arch, "instruct")] = base, instruct
    models[("llama", "domain")] = write_pair(root / "domain", arch="llama", layers=2, seed=9)[1]
    return models


def swap_hub_ids(value, tiny):
    if isinstance(value, dict):
        return {k: swap_hub_ids(v, tiny) for k, v in value.items()}
    if isinstance(value, list):
        return [swap_hub_ids(v, tiny) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        assert value in TINY, f"recipe uses Hub id {value!r}: add it to TINY in this test"
        return str(tiny[TINY[value]])
    return value


def plan(config, out_path):
    """mergekit.merge.run_merge up to the plan: architecture, loaders, output config, planner."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    options = MergeOptions(quiet=True)
    arch_info = get_architecture_info(config, options)
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
    cfg_out = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    for model in config.referenced_models():
        loader_cache.get(model)
    return MergePlanner(config, arch_info, options=options, out_model_config=cfg_out).plan_to_disk(
        out_path=str(out_path)
    )


def planned_tensors(tasks):
    """{tensor name: (merge method, resolved parameters of the non-base model, save dtype)}."""
    from mergekit.io.tasks import SaveTensor

    out = {}
    for task in tasks:
        if not isinstance(task, SaveTensor):
            continue
        merge = task.tensor_task
        params = {}
        for model, values in merge.input_parameters.items():
            if model != merge.base_model:
                params = dict(values)
        out[task.tensor_name] = (merge.method_name, params, task.dtype)
    return out


def output_names(model_dir):
    """Tensor names mergekit 0.1.5 writes for a model: experts read per expert (the Hub
    layout of the tiny MoE pair) come out stacked, mlp.experts.{gate_up_proj,down_proj}."""
    from helpers import load_dir

    names = set()
    for name in load_dir(model_dir):
        expert = re.fullmatch(r"(.*\.experts)\.\d+\.(gate|up|down)_proj\.weight", name)
        if expert:
            name = f"{expert.group(1)}.{'down_proj' if expert.group(2) == 'down' else 'gate_up_proj'}"
        names.add(name)
    return names


def test_the_recipes_are_all_there():
    names = {p.name for p in RECIPES}
    assert set(PAPER_RECIPES) <= names
    assert {"per-module-lambda.yml", "chain-timber-then-ties.yml"} <= names
    readme = (CONFIGS / "README.md").read_text()
    for name in names:
        assert name in readme, f"{name} is not listed in configs/README.md"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_document_validates(path):
    from mergekit.config import MergeConfiguration

    docs = documents(path)
    assert docs
    for doc in docs:
        doc = dict(doc)
        doc.pop("name", None)  # mergekit-multi's key, not part of a MergeConfiguration
        MergeConfiguration.model_validate(doc)


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipe_uses_the_best_lambda_of_table_5(name):
    (doc,) = documents(CONFIGS / name)
    base, instruct = PAPER_RECIPES[name]
    assert doc["base_model"] == base
    assert [m["model"] for m in doc["models"]] == [instruct]
    best = best_lambda(TABLE5[base])
    if best == 0.0:
        assert doc["merge_method"] == "timber_l"  # Timber-L is lambda = 0
        assert "lambda" not in (doc.get("parameters") or {})
    else:
        assert doc["merge_method"] == "timber"
        assert doc["parameters"]["lambda"] == best
    text = (CONFIGS / name).read_text()
    assert "Table 5" in text
    for score in TABLE5[base]:
        assert f"{score:.2f}" in text, f"{name}: Table 5 row not quoted ({score})"
    assert doc["dtype"] == doc["out_dtype"] == "bfloat16"


def test_table_5_copy_reads_whole_and_its_bold_marks_the_best_lambda():
    assert set(TABLE5) == {base for base, _ in PAPER_RECIPES.values()}
    for base, row in TABLE5.items():
        assert len(row) == 5, base
        assert best_lambda(row) in TABLE5_BOLD[base], base
        assert TABLE5_BOLD[base] == {lam for lam, v in zip(LAMBDAS, row[1:]) if v == max(row[1:])}, base


def test_30b_a3b_tie_is_documented():
    row = TABLE5["Qwen/Qwen3-30B-A3B-Base"]
    assert row[3] == row[4] == max(row[1:])  # 0.5 and 0.8 tie
    text = (CONFIGS / "qwen3-30b-a3b.yml").read_text()
    assert "tie" in text and "0.8" in text


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES) + ["per-module-lambda.yml"])
def test_recipe_plans_on_tiny_models(name, tiny, tmp_path):
    from mergekit.config import MergeConfiguration

    (doc,) = documents(CONFIGS / name)
    config = MergeConfiguration.model_validate(swap_hub_ids(doc, tiny))
    tensors = planned_tensors(plan(config, tmp_path / "out"))

    arch = TINY[doc["base_model"]][0]
    assert set(tensors) == output_names(tiny[(arch, "instruct")])
    for tensor, (method, params, dtype) in tensors.items():
        assert method == doc["merge_method"], tensor
        assert dtype == doc["out_dtype"]
        if method == "timber_l":
            assert params.get("lambda") is None
        elif name == "per-module-lambda.yml":
            want = 0.5 if "self_attn" in tensor else 0.2
            assert params["lambda"] == want, tensor
        else:
            assert params["lambda"] == doc["parameters"]["lambda"], tensor
    if arch == "qwen3_moe":  # one merge task per stacked expert tensor, split per expert by Timber
        assert "model.layers.1.mlp.experts.gate_up_proj" in tensors


def test_chain_is_a_mergekit_multi_recipe_that_plans(tiny, tmp_path):
    from mergekit.scripts.multimerge import load_config

    path = CONFIGS / "chain-timber-then-ties.yml"
    docs = documents(path)
    assert len(docs) == 2 and "name" in docs[0] and "name" not in docs[1]
    assert docs[0]["merge_method"] == "timber" and docs[1]["merge_method"] == "ties"
    assert docs[0]["name"] in [m["model"] for m in docs[1]["models"]]
    best = best_lambda(TABLE5[docs[0]["base_model"]])
    assert docs[0]["parameters"]["lambda"] == best

    swapped = [swap_hub_ids(d, tiny) for d in docs]
    inter = tmp_path / "intermediate"
    configs, dependencies = load_config(yaml.safe_dump_all(swapped), str(inter))
    name = docs[0]["name"]
    assert set(configs) == {name, None} and dependencies[None] == {name}
    # The intermediate merge would be written to intermediate/<name>: a model of the
    # same architecture stands in for it so that the final merge can be planned.
    inter.mkdir()
    (inter / name).symlink_to(tiny[("llama", "instruct")], target_is_directory=True)
    first = planned_tensors(plan(configs[name], tmp_path / "out1"))
    assert {m for m, _, _ in first.values()} == {"timber"}
    assert all(p["lambda"] == best for _, p, _ in first.values())
    final = planned_tensors(plan(configs[None], tmp_path / "out2"))
    assert {m for m, _, _ in final.values()} == {"ties"}
    referenced = {str(m.model.path) for m in configs[None].referenced_models()}
    assert str(inter / name) in referenced
    assert str(tiny[("llama", "domain")]) in referenced
    assert set(final) == set(first)
