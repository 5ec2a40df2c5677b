"""Registers `timber` and `timber_l` with mergekit's method registry (idempotent)."""

from __future__ import annotations

import sys
import threading

from mergekit_timber.errors import TimberError

# mergekit and the method module are imported inside the functions: importing this
# module must not itself fire the import hook (that would be a circular import).
METHOD_NAMES = ("timber", "timber_l")
# Re-entrant: importing the method module may itself complete a registration.
_lock = threading.RLock()


def build_methods() -> tuple:
    import mergekit_timber
    from mergekit_timber.method import TimberMerge

    version = mergekit_timber.__version__
    return (
        TimberMerge("timber", tail_removed=False, version=version),
        TimberMerge("timber_l", tail_removed=True, version=version),
    )


def register_methods() -> None:
    from mergekit import merge_methods

    with _lock:
        methods = build_methods()  # may register (nested) while importing the method
        known = {m.spec.name for m in merge_methods.registered_methods()}
        for method in methods:
            if method.spec.name not in known:
                merge_methods.register(method)
        _install_excepthook()


def _install_excepthook() -> None:
    """Print our own input errors as one line instead of a traceback.

    Only exceptions of mergekit-timber's classes (or chained from them) are touched;
    anything else goes to the previous hook unchanged. MERGEKIT_TIMBER_TRACEBACK=1
    keeps full tracebacks.
    """
    previous = sys.excepthook
    if getattr(previous, "_mergekit_timber", False):
        return

    def hook(kind, error, trace):
        import os

        cause = error
        while cause is not None and not isinstance(cause, TimberError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or os.environ.get("MERGEKIT_TIMBER_TRACEBACK"):
            return previous(kind, error, trace)
        print(f"mergekit-timber: error: {cause}", file=sys.stderr)

    hook._mergekit_timber = True
    sys.excepthook = hook
