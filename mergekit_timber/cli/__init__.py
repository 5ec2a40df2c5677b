"""The `mergekit-timber` command: analysis, lambda sweeps and Pass@k tools.

Subcommands are imported only when run: `mergekit-timber --help` must not pay for
importing torch, transformers and mergekit.
"""

import importlib

import click

from mergekit_timber.errors import ERROR_PREFIX
from mergekit_timber.method import parameters

# name -> (module:attribute, one-line help shown by `mergekit-timber --help`)
COMMANDS = {
    "analyze": (
        "mergekit_timber.cli.analyze:analyze",
        "Per-tensor eRank, K, energy kept and realized edit of a pair, with plots.",
    ),
    "sweep": (
        "mergekit_timber.cli.sweep:sweep",
        "Timber at several lambdas with one decomposition per tensor.",
    ),
    "dequantize": (
        "mergekit_timber.cli.dequantize:dequantize",
        "Write a block-FP8 or MXFP4 checkpoint as bf16 (shard by shard), for merging.",
    ),
    "recipe": (
        "mergekit_timber.cli.recipe:recipe",
        "Print a ready Timber YAML for a Base/Instruct pair (local dirs or Hub ids).",
    ),
    "search": (
        "mergekit_timber.cli.search:search",
        "Choose lambda by Pass@k: one sweep, lm-eval per model as Ray tasks (extra [search]).",
    ),
    "passk": (
        "mergekit_timber.cli.passk:passk",
        "Pass@k curves with bootstrap intervals from per-sample records.",
    ),
}


class OneLineError(click.ClickException):
    """A subcommand's error, printed as every other one-line error of mergekit-timber."""

    def show(self, file=None) -> None:
        click.echo(f"{ERROR_PREFIX}{self.format_message()}", file=file, err=file is None)


class LazyGroup(click.Group):
    def invoke(self, ctx):
        # click prints a ClickException as "Error: ..."; ours all read "mergekit-timber: error: ...".
        # Usage errors keep click's form (the usage line and the option at fault).
        try:
            return super().invoke(ctx)
        except (click.UsageError, OneLineError):
            raise
        except click.ClickException as error:
            one_line = OneLineError(error.format_message())
            one_line.exit_code = error.exit_code
            raise one_line from None

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-timber")
def main() -> None:
    """Tools around Timber merges; the merge itself runs with mergekit's own CLIs.

    mergekit-timber adds two merge methods to mergekit (mergekit-yaml, mergekit-multi,
    run_merge), for an Instruct model and its own Base (arXiv 2509.23595):

    \b
      timber     keep the top ceil(eRank) singular directions of each W_I - W_B,
                 scale the rest by lambda
      timber_l   the same with the rest dropped (lambda = 0; takes no lambda)

    {parameters}

    \b
    A minimal recipe (`mergekit-timber recipe BASE INSTRUCT` prints one):
      merge_method: timber
      base_model: Qwen/Qwen3-0.6B-Base
      models:
        - model: Qwen/Qwen3-0.6B
      parameters:
        lambda: 0.2
    then: mergekit-yaml timber.yml out/   (the output is a drop-in Instruct model)
    """
    from mergekit_timber.errors import install_excepthook

    install_excepthook()  # bad input prints as one line (MERGEKIT_TIMBER_TRACEBACK=1: tracebacks)


# The Parameters paragraph comes from the one definition of the parameters.
main.help = main.help.replace("{parameters}", parameters.help_block().replace("\n", "\n    ").replace("\n    \n", "\n\n"))
