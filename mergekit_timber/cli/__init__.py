"""The `mergekit-timber` command: analysis, lambda sweeps and Pass@k tools.

Subcommands are imported only when run: `mergekit-timber --help` must not pay for
importing torch, transformers and mergekit.
"""

import importlib

import click

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
    "passk": (
        "mergekit_timber.cli.passk:passk",
        "Pass@k curves with bootstrap intervals from per-sample records.",
    ),
}


class LazyGroup(click.Group):
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
    """Tools around Timber merges (the merge itself runs with `mergekit-yaml`)."""
    from mergekit_timber.errors import install_excepthook

    install_excepthook()  # bad input prints as one line (MERGEKIT_TIMBER_TRACEBACK=1: tracebacks)
