"""Makes the unmodified mergekit CLIs see `timber` and `timber_l`.

mergekit 0.1.5 has no plugin discovery. The ``mergekit_timber_hook.pth`` file that ships
with the wheel imports this module at interpreter start. It installs a meta-path finder
that, right after mergekit imports one of the modules in ``FOLLOW_UP``, imports our
module paired with it. Importing ``mergekit_timber.method.adapter`` registers the methods (the
one rule, as mergekit's own registry registers in its module body); importing
``mergekit_timber.integration.patches`` checks mergekit and puts the seam in place
(mergekit_timber/integration/patches.py says what it changes and why).

No failure of ours may break ``import mergekit``: a follow-up that raises becomes a
warning (and mergekit_timber.integration.patches itself never raises: on a mergekit it cannot use,
it only makes Timber merges stop with one line).

Nothing here imports torch or mergekit (nor importlib.abc, which alone costs ~25 ms):
the cost at interpreter start is one small module and one finder.
Set ``MERGEKIT_TIMBER_NO_HOOK=1`` to keep the .pth file from doing anything.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings

# mergekit module -> our module to import as soon as it has been executed.
FOLLOW_UP = {
    "mergekit.merge_methods": "mergekit_timber.method.adapter",
    "mergekit.merge": "mergekit_timber.integration.patches",
}


def _import_quietly(name: str) -> None:
    # A failure must never break `import mergekit`: report it and go on.
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any failure becomes a warning
        warnings.warn(
            f"mergekit-timber: could not load {name} (the timber methods may be missing): {error!r}",
            RuntimeWarning,
            stacklevel=2,
        )


class _ThenImport:
    """Wraps a mergekit module's real loader and imports our follow-up after it ran."""

    def __init__(self, loader, follow_up: str):
        self._loader = loader
        self._follow_up = follow_up

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # Importing our module while it is itself being imported (it imports mergekit)
        # is a no-op returning the partial module; it finishes its own work.
        _import_quietly(self._follow_up)

    def __getattr__(self, name):  # resource readers and the like
        return getattr(self._loader, name)


class _Finder:
    """Answers only for the mergekit modules in FOLLOW_UP; all others pass through."""

    def find_spec(self, fullname, path=None, target=None):
        follow_up = FOLLOW_UP.get(fullname)
        if follow_up is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ThenImport(spec.loader, follow_up)
        return spec


def ensure(target: str) -> None:
    """Import the follow-up of `target` if `target` is loaded (e.g. before the finder was)."""
    if target in sys.modules:
        _import_quietly(FOLLOW_UP[target])


def install() -> None:
    """Import our follow-ups of mergekit modules already loaded; watch for the rest."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for target in FOLLOW_UP:
        ensure(target)


install()
