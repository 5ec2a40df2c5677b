"""`mergekit-timber recipe BASE INSTRUCT`: print a ready mergekit YAML for a pair.

No network: a local directory must exist and hold a config.json; anything else must read
as a Hub id (org/name) and is written as given, for mergekit to fetch at merge time.
"""

from pathlib import Path

import click

from mergekit_timber.errors import TIMBER_METHODS


def model_ref(ref: str, role: str) -> str:
    """How the YAML names `ref`: a local model directory as `./dir` or absolute, else a Hub id.

    A bare relative path (`pair/base`) is written `./pair/base`: mergekit's card step (in a
    non-Timber step of a chain) would otherwise ask the Hub about it.
    """
    from mergekit_timber.checkpoint import looks_like_hub_id
    from mergekit_timber.errors import TimberInputError

    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TimberInputError(f"{role} {ref!r} is a directory without config.json, not a model")
        if ref.startswith("~"):
            return str(path.resolve())
        return ref if path.is_absolute() or ref.startswith(("./", "../")) else "./" + ref
    if path.exists():
        raise TimberInputError(f"{role} {ref!r} is not a directory")
    if not looks_like_hub_id(ref):
        raise TimberInputError(f"{role} {ref!r}: no such directory (nor a Hub id: those read org/name)")
    return ref


def render(base: str, instruct: str, method: str, lam) -> str:
    import yaml

    config = {"merge_method": method, "base_model": base, "models": [{"model": instruct}]}
    if lam is not None:
        config["parameters"] = {"lambda": lam}
    header = (
        f"# {method}: refine {instruct} with its Base model (arXiv 2509.23595).\n"
        "# Save as timber.yml and run: mergekit-yaml timber.yml OUT/   (add --cuda on a GPU)\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


@click.command("recipe")
@click.argument("base")
@click.argument("instruct")
@click.option("--method", type=click.Choice(TIMBER_METHODS), default="timber", show_default=True)
@click.option(
    "--lambda", "lam", type=click.FloatRange(0, 1), default=None,
    help="Scale of the spectral tail (timber only) [default: 0.2, the authors' default].",
)  # fmt: skip
def recipe(base: str, instruct: str, method: str, lam) -> None:
    """Print a ready YAML merging INSTRUCT with its Base BASE (local dirs or Hub ids).

    \b
    mergekit-timber recipe Qwen/Qwen3-0.6B-Base Qwen/Qwen3-0.6B --lambda 0.8 > timber.yml
    mergekit-yaml timber.yml out/
    """
    if method == "timber_l" and lam is not None:
        raise click.BadParameter("timber_l takes no lambda (it removes the tail: lambda = 0)", param_hint="'--lambda'")
    if method == "timber" and lam is None:
        from mergekit_timber.method import DEFAULT_LAMBDA

        lam = DEFAULT_LAMBDA
    click.echo(render(model_ref(base, "base model"), model_ref(instruct, "instruct model"), method, lam), nl=False)
