"""Tools built on the method: analysis (eRank per matrix, plots), sweep (several lambdas
in one pass), search (lambda by Pass@k with lm-eval and Ray) and passk (Pass@k curves).

They import the method and its integration; nothing in those imports a tool. Plots and
Pass@k need the `[tools]` extra (matplotlib, numpy).
"""

# Each tool dependency the product does not need, by the extra that installs it (pyproject.toml).
EXTRAS = {
    "tools": (("matplotlib", "matplotlib"), ("tqdm", "tqdm")),
    "search": (("ray", "ray"), ("lm-eval", "lm_eval")),
}


def require(command: str, *extras: str) -> None:
    """One line naming the extra to install when a dependency of `command` is missing."""
    import importlib

    from mergekit_timber.errors import TimberError

    for extra in extras:
        missing = []
        for name, module in EXTRAS[extra]:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(name)
        if missing:
            raise TimberError(
                f"mergekit-timber {command} needs {' and '.join(missing)}: pip install 'mergekit-timber[{extra}]'"
            )
