"""The package's three parts and the directions of their imports.

mergekit_timber/method (kernel, layout, parameters, adapter) and mergekit_timber/integration
(the hook, the seam and its checks) are the product; mergekit_timber/tools (analysis,
sweep, search, passk) are built on it. Tools import the product, never the reverse, and
`analyze` runs without mergekit's merge machinery.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

from pairs.synthetic import write_pair

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_timber"


def imported_modules(path: Path):
    """Every mergekit_timber module a file imports (at any depth of the file)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_the_product_never_imports_a_tool_or_the_cli():
    wrong = [
        (str(path.relative_to(PACKAGE)), module)
        for part in ("method", "integration")
        for path in (PACKAGE / part).glob("*.py")
        for module in imported_modules(path)
        if module.startswith(("mergekit_timber.tools", "mergekit_timber.cli"))
    ]
    assert not wrong, wrong


def test_the_kernel_and_parameters_need_no_mergekit():
    """Only the adapter speaks to mergekit at import: the maths and the parameters never;
    layout asks it lazily, for a merge's model (architecture_of_model, vocabulary_names)."""
    for name in ("kernel.py", "parameters.py", "layout.py"):
        path = PACKAGE / "method" / name
        everywhere = [m for m in imported_modules(path) if m.split(".")[0] == "mergekit"]
        at_top = [
            m for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
            for m in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
            if m.split(".")[0] == "mergekit"
        ]
        assert not (at_top if name == "layout.py" else everywhere), (name, everywhere)


def _modules_after(code: str, tmp_path: Path) -> set:
    out = tmp_path / "modules.json"
    wrapper = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n" + code
    )
    subprocess.run([sys.executable, "-c", wrapper], check=False, capture_output=True, text=True, timeout=600)
    return set(json.loads(out.read_text()))


def test_importing_the_merge_method_imports_no_tool(tmp_path):
    """What mergekit-yaml loads (the registry, the merge, our adapter and seam): no tool."""
    modules = _modules_after("import mergekit.merge\nfrom mergekit.merge_methods import registry", tmp_path)
    assert {"mergekit_timber.method.adapter", "mergekit_timber.integration.seam"} <= modules
    assert not [m for m in modules if m.startswith(("mergekit_timber.tools", "mergekit_timber.cli"))]


def test_analyze_runs_without_mergekits_merge_machinery(tmp_path):
    base, instruct = write_pair(tmp_path / "pair", arch="qwen3", layers=1)
    code = (
        "from mergekit_timber.cli import main\n"
        f"main(['analyze', {str(base)!r}, {str(instruct)!r}, '-o', {str(tmp_path / 'an')!r}])"
    )
    modules = _modules_after(code, tmp_path)
    assert "mergekit_timber.tools.analysis" in modules and (tmp_path / "an" / "erank.csv").is_file()
    machinery = {"mergekit.merge", "mergekit.merge_methods", "mergekit.merge_methods.registry",
                 "mergekit.plan", "mergekit_timber.method.adapter", "mergekit_timber.integration.seam"}
    assert not machinery & modules, sorted(machinery & modules)


def test_expert_layouts_come_from_transformers_where_it_has_them():
    """One table per concept: transformers' conversion mapping gives the stacked layout of
    the per-expert checkpoints; our own table holds only the model types it does not cover."""
    from mergekit_timber.method import layout

    for model_type in ("qwen3_moe", "mixtral", "deepseek_v3", "jamba", "lfm2_moe"):
        assert layout.converted_layout(model_type) == layout._STACKED_EXPERTS, model_type
    covered = [t for t in layout.LAYOUTS if layout.converted_layout(t)]
    assert not covered, covered
    assert layout.converted_layout("llama") == () and layout.converted_layout(None) == ()
    split = layout.split("model.layers.0.mlp.experts.gate_up_proj", (4, 32, 16),
                         layout.Architecture("qwen3_moe", hidden_size=16))
    assert split.experts.parts == ("gate_proj", "up_proj") and split.experts.fused_axis == 1
