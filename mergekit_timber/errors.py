"""Exceptions raised for bad input, each carrying one self-explaining line.

TimberConfigError deliberately does not derive from ValueError: pydantic wraps a
ValueError raised inside a validator into a multi-line ValidationError, while any
other exception passes through with our message intact.
"""


class TimberError(Exception):
    """Bad input to a Timber merge; the message is one line naming the tensor or key."""


class TimberConfigError(TimberError):
    """A parameter in the YAML (or API call) is invalid."""


class TimberInputError(TimberError, ValueError):
    """The models or tensors given to the merge are unusable."""


class NonFiniteInput(TimberInputError):
    """An input tensor holds NaN/Inf as the merge method received it (mergekit_timber.integration.finite
    tells whether the model's file or the recipe's `dtype:` cast put it there)."""

    def __init__(self, message: str, *, tensor: str, which: str, count: int, dtype: str):
        super().__init__(message)
        self.tensor, self.which, self.count, self.dtype = tensor, which, count, dtype


class TimberOutputError(TimberError):
    """The output directory cannot be written as asked, or a write or copy step failed."""


# How every one-line error of mergekit-timber starts (the excepthook, the CLI's own errors).
ERROR_PREFIX = "mergekit-timber: error: "

# The console scripts whose uncaught TimberErrors print as one line.
CLI_PROGRAMS = ("mergekit-yaml", "mergekit-multi", "mergekit-timber")
CLI_MODULES = ("mergekit.scripts.run_yaml", "mergekit.scripts.multimerge", "mergekit_timber.cli")


def running_cli() -> bool:
    """True in a process started as one of CLI_PROGRAMS (or `python -m` of its module)."""
    import os
    import sys

    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    program = program.removesuffix(".exe").removesuffix("-script.py")
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return program in CLI_PROGRAMS or getattr(spec, "name", None) in CLI_MODULES


# Functions (error, traceback) -> TimberError or None that put into one line errors
# raised outside our code for a Timber merge (preflight: mergekit's config parsing).
_EXPLAINERS: list = []


def add_explainer(explain) -> None:
    if explain not in _EXPLAINERS:
        _EXPLAINERS.append(explain)


# The merge methods this package registers (the one definition), the prefix of the name a
# sweep's own instance is registered under, and mergekit 0.1.5's message for a name it does
# not know (mergekit.merge_methods.registry.get); if that text changes, the hint is just not given.
TIMBER_METHODS = ("timber", "timber_l")
SWEEP_METHOD_PREFIX = "timber-sweep-"
_UNKNOWN_METHOD = "Unimplemented merge method "


def is_timber_method(name) -> bool:
    """Whether a merge_method name is one of ours: the one answer to "is this a Timber merge?"."""
    return isinstance(name, str) and (name in TIMBER_METHODS or name.startswith(SWEEP_METHOD_PREFIX))


def explain_unknown_method(error, trace):
    """`merge_method: timbre` -> one line with "did you mean 'timber'?".

    Only when mergekit rejects a method name whose closest registered method is one of
    ours; any other unknown name (`tie`, `foo`) keeps mergekit's traceback untouched.
    """
    import difflib

    message = str(error)
    if not isinstance(error, RuntimeError) or not message.startswith(_UNKNOWN_METHOD):
        return None
    name = message[len(_UNKNOWN_METHOD) :].strip()
    try:
        from mergekit import merge_methods

        known = [method.spec.name for method in merge_methods.registered_methods()]
    except Exception:  # pragma: no cover - the registry moved: fall back to ours only
        known = list(TIMBER_METHODS)
    closest = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
    if not closest or closest[0] not in TIMBER_METHODS:
        return None
    return TimberConfigError(
        f"unknown merge_method {name!r}; did you mean {closest[0]!r}? "
        f"(mergekit-timber adds {' and '.join(TIMBER_METHODS)}; `mergekit-timber --help` shows a recipe)"
    )


add_explainer(explain_unknown_method)


def install_excepthook() -> None:
    """Print our own input errors as one line instead of a traceback.

    Only exceptions of mergekit-timber's classes (or chained from them) are touched;
    anything else goes to the previous hook unchanged. MERGEKIT_TIMBER_TRACEBACK=1
    keeps full tracebacks.
    """
    import sys

    previous = sys.excepthook
    if getattr(previous, "_mergekit_timber", False):
        return

    def hook(kind, error, trace):
        from mergekit_timber.flags import flag

        cause = error
        while cause is not None and not isinstance(cause, TimberError):
            cause = cause.__cause__ or cause.__context__
        for explain in _EXPLAINERS if cause is None else ():
            cause = explain(error, trace)
            if cause is not None:
                break
        if cause is None or flag("MERGEKIT_TIMBER_TRACEBACK"):
            return previous(kind, error, trace)
        print(f"{ERROR_PREFIX}{cause}", file=sys.stderr)

    hook._mergekit_timber = True
    sys.excepthook = hook
