"""The `mergekit-timber` command: analysis, lambda sweeps and Pass@k tools."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-timber")
def main() -> None:
    """Tools around Timber merges (the merge itself runs with `mergekit-yaml`)."""


def _add_commands() -> None:
    from mergekit_timber.cli.passk import passk
    from mergekit_timber.cli.sweep import sweep

    main.add_command(passk)
    main.add_command(sweep)
    from mergekit_timber.cli.analyze import analyze
    main.add_command(analyze)


_add_commands()
