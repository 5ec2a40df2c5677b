"""mergekit-timber: the Timber method (arXiv 2509.23595) as mergekit merge methods.

Importing this package is cheap (no torch, no mergekit): it makes sure that `timber` and
`timber_l` are registered with mergekit as soon as mergekit's method registry is
imported (or right away if it already is). See mergekit_timber/integration/_hook.py.
"""

PAPER_URL = "https://arxiv.org/abs/2509.23595"
DISTRIBUTION = "mergekit-timber"


def __getattr__(name: str):
    # Looked up lazily: reading package metadata at every interpreter start costs time.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(DISTRIBUTION)
        except PackageNotFoundError:  # a source tree that is not installed
            return "0.0.0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from mergekit_timber.integration import _hook  # noqa: E402,F401 - installs the import hook
