"""A newcomer finds the methods: `mergekit-timber --help`, `mergekit-timber recipe`, and a
"did you mean" for a misspelt method name in mergekit's CLIs (nothing else changes)."""

import re
import sys

import pytest
import yaml

from helpers import run_cli, write_yaml
from pairs.synthetic import write_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("discovery") / "pair", arch="qwen3", layers=1)


def test_help_names_methods_parameters_and_a_recipe():
    from mergekit.merge_methods import registry

    import mergekit_timber.method.adapter  # noqa: F401 - registers the methods

    text = run_cli("mergekit-timber", "--help").stdout
    for name in ("timber", "timber_l", "recipe", "analyze", "sweep", "passk"):
        assert re.search(rf"\b{name}\b", text), name
    # Every parameter mergekit knows for timber is in the help, with its default and words.
    for spec in registry._METHODS["timber"].spec.parameters:
        line = re.search(rf"^\s+{spec.name}\s+(.*)$", text, re.M)
        assert line, spec.name
        default = "unset" if spec.default is None else str(spec.default).lower()
        assert f"default {default}" in line.group(1), (spec.name, line.group(1))
        words = " ".join(text[line.start():].split())
        assert " ".join(spec.description.split()) in words, spec.name
    # The recipe shown is a valid mergekit config.
    block = text[text.index("merge_method:") :].split("then:")[0]
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load(block.replace("\n    ", "\n")))
    assert config.merge_method == "timber"


def test_recipe_for_a_local_pair_merges(pair, tmp_path):
    base, instruct = pair
    rel = tmp_path / "models"
    rel.symlink_to(base.parent, target_is_directory=True)
    text = run_cli("mergekit-timber", "recipe", "models/base", "models/instruct", "--lambda", "0.5", cwd=tmp_path).stdout
    assert yaml.safe_load(text) == {
        "merge_method": "timber",
        "base_model": "./models/base",  # ./ keeps mergekit's card step off the Hub
        "models": [{"model": "./models/instruct"}],
        "parameters": {"lambda": 0.5},
    }
    write_yaml(tmp_path / "timber.yml", text)
    run_cli("mergekit-yaml", "timber.yml", "out", cwd=tmp_path)
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "chat_template.jinja").exists()


def test_recipe_hub_ids_and_defaults(pair):
    text = run_cli("mergekit-timber", "recipe", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B").stdout
    assert yaml.safe_load(text) == {
        "merge_method": "timber",
        "base_model": "Qwen/Qwen3-0.6B-Base",
        "models": [{"model": "Qwen/Qwen3-0.6B"}],
        "parameters": {"lambda": 0.2},
    }
    base, instruct = pair
    text = run_cli("mergekit-timber", "recipe", base, instruct, "--method", "timber_l").stdout
    assert yaml.safe_load(text) == {"merge_method": "timber_l", "base_model": str(base), "models": [{"model": str(instruct)}]}


@pytest.mark.parametrize(
    "args, message",
    [
        (("./nowhere", "Qwen/Qwen3-0.6B"), "base model './nowhere': no such directory ("),
        (("a/b/c", "Qwen/Qwen3-0.6B"), "base model 'a/b/c': no such directory ("),
        (("Qwen/a", "Qwen/b", "--method", "timber_l", "--lambda", "0.3"), "timber_l: parameter lambda is not accepted"),
        (("Qwen/a", "Qwen/b", "--lambda", "1.5"), "timber: lambda must lie in [0, 1]; got 1.5"),
    ],
)
def test_recipe_refuses_bad_input_in_one_line(args, message):
    proc = run_cli("mergekit-timber", "recipe", *args, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]], proc.stderr  # one line
    assert proc.stderr.startswith("mergekit-timber: error: " + message), proc.stderr


def test_recipe_refuses_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("mergekit-timber", "recipe", tmp_path / "empty", "Qwen/b", check=False)
    assert proc.returncode == 1 and "is a directory without config.json" in proc.stderr and "Traceback" not in proc.stderr


def _config(pair, method):
    base, instruct = pair
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(instruct)}]}


@pytest.mark.parametrize("cli, name, want", [("mergekit-yaml", "timbre", "timber"), ("mergekit-multi", "Timber-L", "timber_l")])
def test_misspelt_timber_gets_did_you_mean(pair, tmp_path, cli, name, want):
    if cli == "mergekit-yaml":
        args = (write_yaml(tmp_path / "t.yml", _config(pair, name)), tmp_path / "out")
    else:
        args = (write_yaml(tmp_path / "t.yml", dict(name="refined", **_config(pair, name))), "--intermediate-dir", tmp_path / "out")
    proc = run_cli(cli, *args, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mergekit-timber: error: unknown merge_method {name!r}; did you mean {want!r}? "
        "(mergekit-timber adds timber and timber_l; `mergekit-timber --help` shows a recipe)"
    )
    assert not list((tmp_path / "out").glob("**/*.safetensors"))


@pytest.mark.parametrize("name", ["tie", "foo"])
def test_other_unknown_methods_keep_mergekit_s_traceback(pair, tmp_path, name):
    """A name closer to a mergekit method (or to nothing) reads exactly as without the plugin."""
    cfg = write_yaml(tmp_path / "t.yml", _config(pair, name))
    ours = run_cli("mergekit-yaml", cfg, tmp_path / "a", check=False)
    plain = run_cli("mergekit-yaml", cfg, tmp_path / "b", check=False, env={"MERGEKIT_TIMBER_NO_HOOK": "1"})
    assert ours.returncode == plain.returncode == 1 and "Traceback" in ours.stderr
    assert ours.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1] == f"RuntimeError: Unimplemented merge method {name}"


def test_traceback_flag_and_python_api_keep_the_exception(pair, tmp_path):
    cfg = write_yaml(tmp_path / "t.yml", _config(pair, "timbre"))
    proc = run_cli("mergekit-yaml", cfg, tmp_path / "out", check=False, env={"MERGEKIT_TIMBER_TRACEBACK": "1"})
    assert "Traceback" in proc.stderr and proc.stderr.strip().endswith("Unimplemented merge method timbre")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    with pytest.raises(RuntimeError, match="^Unimplemented merge method timbre$"):
        run_merge(MergeConfiguration.model_validate(_config(pair, "timbre")), str(tmp_path / "api"), options=MergeOptions(quiet=True))


def test_parameter_table_command_renders_the_registered_parameters():
    """`python -m mergekit_timber.tools.params_table` (the README's table) and mergekit's
    specs come from one definition: same names, defaults and words."""
    from mergekit.merge_methods import registry

    import mergekit_timber.method.adapter  # noqa: F401 - registers the methods

    text = run_cli(sys.executable, "-m", "mergekit_timber.tools.params_table").stdout
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    specs = registry._METHODS["timber"].spec.parameters
    assert [row[0].strip("|` ") for row in rows] == [spec.name for spec in specs]
    for row, spec in zip(rows, specs):
        default = "unset" if spec.default is None else str(spec.default).lower()
        assert row[2].strip("`") == default
        assert row[3].rstrip(" |").replace("`", "") == spec.description
    assert [s.name for s in registry._METHODS["timber_l"].spec.parameters] == [spec.name for spec in specs]
