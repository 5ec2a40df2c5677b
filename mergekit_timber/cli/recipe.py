"""`mergekit-timber recipe BASE INSTRUCT`: print a ready mergekit YAML for a pair.

No network: a local directory must exist and hold a config.json; anything else must read
as a Hub id (org/name) and is written as given, for mergekit to fetch at merge time.
"""

from pathlib import Path
from typing import Optional

import click

from mergekit_timber.errors import TIMBER_METHODS


def model_ref(ref: str, role: str) -> str:
    """How the YAML names `ref`: a local model directory as `./dir` or absolute, else a Hub id.

    A bare relative path (`pair/base`) is written `./pair/base`: mergekit's card step (in a
    non-Timber step of a chain) would otherwise ask the Hub about it.
    """
    from mergekit_timber.checkpoint import resolve_model
    from mergekit_timber.errors import TimberInputError

    # The merge's own rule (a directory, else a Hub id); a Hub id is not fetched here.
    resolve_model(ref, role, fetch=lambda: ref)
    path = Path(ref).expanduser()
    if not path.is_dir():
        return ref  # a Hub id
    if not (path / "config.json").is_file():
        raise TimberInputError(f"{role} {ref!r} is a directory without config.json, not a model")
    if ref.startswith("~"):
        return str(path.resolve())
    return ref if path.is_absolute() or ref.startswith(("./", "../")) else "./" + ref


def render(base: str, instruct: str, method: str, lam) -> str:
    import yaml

    config = {"merge_method": method, "base_model": base, "models": [{"model": instruct}]}
    if lam is not None:
        config["parameters"] = {"lambda": lam}
    header = (
        f"# {method}: refine {instruct} with its Base model (arXiv 2509.23595).\n"
        "# Save as timber.yml and run: mergekit-yaml timber.yml OUT/   (add --cuda on a GPU)\n"
    )
    class Indented(yaml.SafeDumper):  # "models:\n  - model: ..." as mergekit's examples write it
        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)

    return header + yaml.dump(config, Dumper=Indented, sort_keys=False, default_flow_style=False)


def checked_lambda(method: str, lam: Optional[float]) -> Optional[float]:
    """The lambda the recipe writes, checked by the method's own ParameterSpec (one rule:
    range, and timber_l refusing it); None for timber_l."""
    from mergekit import merge_methods

    import mergekit_timber  # noqa: F401  registers the methods

    spec = next(p for p in merge_methods.get(method).spec.parameters if p.name == "lambda")
    if lam is None:
        return spec.default
    spec.validate(lam)  # raises a one-line TimberConfigError
    return lam


@click.command("recipe")
@click.argument("base")
@click.argument("instruct")
@click.option("--method", type=click.Choice(TIMBER_METHODS), default="timber", show_default=True)
@click.option(
    "--lambda", "lam", type=float, default=None,
    help="Scale of the spectral tail, 0 to 1 (timber only) [default: the method's default, see mergekit-timber --help].",
)  # fmt: skip
def recipe(base: str, instruct: str, method: str, lam: Optional[float]) -> None:
    """Print a ready YAML merging INSTRUCT with its Base BASE (local dirs or Hub ids).

    \b
    mergekit-timber recipe Qwen/Qwen3-0.6B-Base Qwen/Qwen3-0.6B --lambda 0.8 > timber.yml
    mergekit-yaml timber.yml out/
    """
    base_ref, instruct_ref = model_ref(base, "base model"), model_ref(instruct, "instruct model")
    click.echo(render(base_ref, instruct_ref, method, checked_lambda(method, lam)), nl=False)
