"""The .pth registration hook: lazy, idempotent, harmless when it fails."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def py(code, **env):
    import os

    full = dict(os.environ)
    full.pop("MERGEKIT_TIMBER_NO_HOOK", None)
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    out = py("import sys; print(sorted(m for m in ('torch', 'mergekit', 'mergekit_timber.integration._hook') if m in sys.modules))")
    assert out.stdout.strip() == "['mergekit_timber.integration._hook']"


def test_plain_mergekit_import_sees_the_methods():
    out = py("from mergekit import merge_methods as m; print(sorted(x.spec.name for x in m.registered_methods() if 'timber' in x.spec.name))")
    assert out.stdout.strip() == "['timber', 'timber_l']"


def test_environment_variable_turns_the_hook_off():
    code = (
        "import sys; assert 'mergekit_timber' not in sys.modules\n"
        "from mergekit import merge_methods as m\n"
        "print(any('timber' in x.spec.name for x in m.registered_methods()))"
    )
    assert py(code, MERGEKIT_TIMBER_NO_HOOK="1").stdout.strip() == "False"
    # An explicit import still registers (the Python API path).
    code = "import mergekit_timber\nfrom mergekit import merge_methods as m\nprint(m.get('timber').spec.name)"
    assert py(code, MERGEKIT_TIMBER_NO_HOOK="1").stdout.strip() == "timber"


def test_registering_is_idempotent():
    code = (
        "import mergekit_timber\nfrom mergekit import merge_methods as m\n"
        "import importlib, mergekit_timber.method.adapter as t; importlib.reload(t); t._register(); t._register()\n"
        "print([x.spec.name for x in m.registered_methods()].count('timber'))"
    )
    assert py(code).stdout.strip() == "1"


def test_a_failing_registration_is_a_warning_not_a_broken_import():
    code = (
        "import sys, types\n"
        "class Boom:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mergekit_timber.method.adapter': raise RuntimeError('boom')\n"
        "import mergekit_timber.integration._hook\n"
        "sys.meta_path.insert(0, Boom())\n"
        "import mergekit.merge_methods as m\n"
        "print('imported', m.get('linear').spec.name)"
    )
    out = py(code)
    assert "imported linear" in out.stdout
    assert "could not load mergekit_timber.method.adapter" in out.stderr and "boom" in out.stderr


def test_wheel_ships_the_pth_file(tmp_path):
    pytest.importorskip("hatchling")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("mergekit_timber-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mergekit_timber_hook.pth" in names
    assert "mergekit_timber/integration/_hook.py" in names
    pth = zipfile.ZipFile(wheel).read("mergekit_timber_hook.pth").decode()
    assert pth.startswith("import ") and "MERGEKIT_TIMBER_NO_HOOK" in pth


@pytest.mark.parametrize(
    "first",
    ["mergekit_timber.method.adapter", "mergekit_timber.tools.sweep",
     "mergekit_timber.tools.analysis", "mergekit_timber.method.kernel", "mergekit_timber"],
)
def test_any_import_order_registers_once_without_warning(first):
    # Importing one of our modules that itself imports mergekit fires the hook while
    # that module is half-initialised: registration must complete, not deadlock or warn.
    code = (
        "import warnings; warnings.simplefilter('error', RuntimeWarning)\n"
        f"import {first}\n"
        "from mergekit import merge_methods as m\n"
        "print([x.spec.name for x in m.registered_methods()].count('timber'))"
    )
    assert py(code).stdout.strip() == "1"


def test_no_import_cycle_in_the_package():
    # Each module imports only modules defined before it in this order (no cycle).
    import ast

    package = ROOT / "mergekit_timber"
    graph = {}
    for file in package.rglob("*.py"):
        name = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergekit_timber"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("mergekit_timber"))
        graph[name] = {d for d in deps if d != name}
    graph = {k: {d for d in v if d in graph and d != "mergekit_timber"} for k, v in graph.items()}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_cli_help_is_fast_to_import():
    code = (
        "import sys\nfrom mergekit_timber.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'mergekit' in sys.modules)"
    )
    out = py(code).stdout
    assert "analyze" in out and "sweep" in out and "passk" in out
    assert out.strip().splitlines()[-1] == "False False"


# --------------------------------------------------------------------------- the guard


def _mergekit_names_used():
    """Every mergekit name a module of the package imports, or reads from a mergekit module."""
    import ast
    import importlib.util

    def is_module(name):
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    used = {}
    for file in sorted((ROOT / "mergekit_timber").rglob("*.py")):
        tree = ast.parse(file.read_text())
        modules = {}  # local alias -> mergekit module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mergekit":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if is_module(full):
                        modules[alias.asname or alias.name] = full
                    else:
                        used.setdefault(full, file.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "mergekit" and alias.asname:
                        modules[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                used.setdefault(f"{modules[node.value.id]}.{node.attr}", file.name)
    return used


def test_every_mergekit_name_the_package_touches_is_in_the_guard_table():
    from mergekit_timber.integration import guard

    used = _mergekit_names_used()
    assert "mergekit.merge_methods.registry._METHODS" in used and "mergekit.card.CARD_TEMPLATE" in used
    missing = {name: where for name, where in used.items() if name not in guard.BY_NAME}
    assert not missing, f"add these to mergekit_timber.integration.guard.RELIED_ON: {missing}"


def test_the_installed_mergekit_passes_the_guard_and_is_patched():
    import mergekit.merge as merge

    from mergekit_timber.integration import guard

    assert guard.check() == []
    assert guard.verdict().problems == () and guard.verdict().verified
    for entry in guard.RELIED_ON:
        if entry.kind == "patched":
            assert getattr(getattr(merge, entry.name), "_timber_seam", False), entry.where
            assert guard.lookup(entry.where).__module__ == "mergekit.merge"


@pytest.mark.parametrize(
    "entry,problem",
    [
        (("mergekit.merge.run_merge", "patched", ("merge_config", "out_path")), "has parameters (merge_config, out_path, options, config_source), not (merge_config, out_path)"),
        (("mergekit.merge._copy_tokenizer", "called", ("merge_config", "tokenizer")), "takes no parameter 'tokenizer'"),
        (("mergekit.merge._no_such_function", "called", ()), "mergekit.merge._no_such_function is missing"),
        (("mergekit.no_such_module.thing", "class", ()), "mergekit.no_such_module cannot be imported"),
        (("mergekit.card.CARD_TEMPLATE", "template", ("name",)), "mergekit.card.CARD_TEMPLATE has the fields"),
        (("mergekit.io.tasks.LoaderCache", "class", (), ("no_such_attribute",)), "has no attribute 'no_such_attribute'"),
    ],
)
def test_the_guard_names_what_changed(entry, problem):
    from mergekit_timber.integration import guard

    relied = guard.Relied(*entry)
    guard.BY_NAME[relied.where], saved = relied, guard.BY_NAME.get(relied.where)
    try:
        assert problem in guard.problem_with(relied)
    finally:
        if saved is None:
            del guard.BY_NAME[relied.where]
        else:
            guard.BY_NAME[relied.where] = saved


def test_undo_puts_mergekit_back_and_install_patches_again():
    code = (
        "import mergekit.merge as m, mergekit_timber.integration.patches as p\n"
        "seam = lambda: [getattr(getattr(m, n), '_timber_seam', False) for n in ('run_merge', '_model_out_config', '_get_donor_model')]\n"
        "print(seam()); p.undo(); print(seam(), m.run_merge.__module__); p.install(); print(seam())"
    )
    lines = py(code).stdout.strip().splitlines()
    assert lines == ["[True, True, True]", "[False, False, False] mergekit.merge", "[True, True, True]"]
