"""`mergekit-timber sweep CONFIG OUT --lambdas ...`: several lambdas from one pass."""

from pathlib import Path

import click


def _merge_options(f):
    # mergekit's own merge flags (--cuda, --device, --out-shard-size, ...), imported
    # lazily so `mergekit-timber --help` stays fast.
    from mergekit.options import add_merge_options

    return add_merge_options(f)


@click.command("sweep")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--lambdas", default="0,0.2,0.5,0.8", show_default=True,
    help="Comma-separated lambdas; each gives OUT/lambda-X/. Replaces every lambda in CONFIG.",
)
@_merge_options
def sweep(merge_options, config: Path, out: Path, lambdas: str) -> None:
    """Timber at several lambdas with one decomposition per tensor.

    Each OUT/lambda-X/ is the model `mergekit-yaml` writes for that lambda alone,
    with its own model card and a mergekit_config.yml that reproduces it. A re-run
    replaces the model in each OUT/lambda-X/ as mergekit-yaml does (other files stay).
    """
    from mergekit_timber.tools.sweep import parse_lambdas, run_sweep

    merge_options.apply_global_options()
    values = parse_lambdas(lambdas)  # a TimberError prints as one line (mergekit_timber.cli)
    outs = run_sweep(config, out, values, merge_options)
    for lam, path in zip(values, outs):
        click.echo(f"lambda={lam:g}\t{path}")
