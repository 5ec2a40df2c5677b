"""Lazy, one-shot registration of the Timber methods with mergekit.

mergekit 0.1.5 has no plugin discovery. The ``mergekit_timber_hook.pth`` file that
ships with the wheel imports this package at interpreter start; importing it installs
a meta-path finder that waits for ``mergekit.merge_methods`` to be imported and
registers our methods right after it. Nothing here imports torch or mergekit (nor
importlib.abc, which alone costs ~25 ms): the cost at interpreter start is one
small module and one finder.

Set ``MERGEKIT_TIMBER_NO_HOOK=1`` to keep the .pth file from doing anything.
"""

from __future__ import annotations

import importlib.machinery
import sys
import _thread
import warnings

TARGET = "mergekit.merge_methods"
_lock = _thread.allocate_lock()  # not `threading`: it costs imports at start-up


def register_now() -> None:
    """Register our methods; safe to call any number of times."""
    from mergekit_timber.registration import register_methods

    register_methods()


def _register_quietly() -> None:
    # Importing mergekit_timber.method itself imports mergekit.merge_methods: then the
    # method module is still half-initialised here, and registers itself once complete.
    method = sys.modules.get("mergekit_timber.method")
    if method is not None and not getattr(method, "READY", False):
        return
    # A failure here must never break `import mergekit`: report it and go on.
    try:
        register_now()
    except Exception as error:  # noqa: BLE001 - any failure becomes a warning
        warnings.warn(
            f"mergekit-timber: could not register the timber methods: {error!r}",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterLoad:
    """Wraps mergekit.merge_methods' real loader and registers after it ran."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_quietly()

    def __getattr__(self, name):  # resource readers and the like
        return getattr(self._loader, name)


class _Finder:
    """Meta-path finder that only ever answers for mergekit.merge_methods, once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        uninstall()  # one shot: from now on the normal finders answer
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def _installed_finder():
    return next((f for f in sys.meta_path if isinstance(f, _Finder)), None)


def uninstall() -> None:
    with _lock:
        finder = _installed_finder()
        if finder is not None:
            sys.meta_path.remove(finder)


def activate() -> None:
    """Register now if mergekit's registry is loaded, else when it gets imported."""
    if TARGET in sys.modules:
        _register_quietly()
        return
    with _lock:
        if _installed_finder() is None:
            sys.meta_path.insert(0, _Finder())
