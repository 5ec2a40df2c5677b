"""mergekit-timber: the Timber method (arXiv 2509.23595) as mergekit merge methods.

Importing this package is cheap (no torch, no mergekit): it arranges for `timber` and
`timber_l` to be registered with mergekit as soon as mergekit's method registry is
imported, or registers them right away if it already is.
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


def register() -> None:
    """Register `timber` and `timber_l` with mergekit now (idempotent)."""
    from mergekit_timber._hook import register_now

    register_now()


from mergekit_timber import _hook  # noqa: E402

_hook.activate()
