"""What mergekit-timber changes in mergekit, why, and how it is undone.

Timber's output is the Instruct model with refined weights, a drop-in for it. mergekit
0.1.5 takes the output's config.json, tokenizer, generation config and tagalong files
from `base_model`, writes into the output directory as it goes and has no hook for any
of it. So, right after `mergekit.merge` has executed (mergekit_timber/integration/_hook.py imports
this module then, before `mergekit-yaml` and `mergekit-multi` bind `run_merge`), three
functions of `mergekit.merge` are replaced by wrappers with the same signature:

| replaced | a Timber merge gets | every other merge gets |
|---|---|---|
| `run_merge` | mergekit_timber.integration.seam.run_timber_merge (preflight, staged output, drop-in files, card) | mergekit's function, same arguments |
| `_model_out_config` | the Instruct model as the donor of config.json (a Timber merge reaching mergekit's `run_merge` without the seam stops here, before any file) | mergekit's function, same arguments |
| `_get_donor_model` | the Instruct model as the donor of tokenizer and tagalong files | mergekit's function, same arguments |

Two more are changed by the modules that need them, during a Timber merge only:
`TensorWriter.save_tensor` is wrapped (mergekit_timber.integration.hub_layout, when the first
Timber merge of the process starts) and acts only for the output folders a Timber merge
registered; block-FP8 models get a
dequantizing loader in `LoaderCache.loaders` for the time of one merge
(mergekit_timber.integration.quantized), taken out again after it.

Before replacing anything, mergekit_timber.integration.guard checks every mergekit name the plugin
relies on. If one is missing or changed, nothing above is replaced: `run_merge` is only
wrapped by a pass-through that stops Timber merges with one line (the guard's finding)
and hands every call to mergekit untouched. `undo()` puts mergekit's own functions back
(modules that bound `run_merge` before keep the wrapper, which forwards to mergekit).
Nothing here may raise into `import mergekit.merge`.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable, Dict

from mergekit_timber.integration import guard
from mergekit_timber.errors import TimberError, install_excepthook, is_timber_method, running_cli

_SEAM = None  # mergekit_timber.integration.seam once installed (imported only when the guard passes)
_ORIGINALS: Dict[str, Callable] = {}  # where -> mergekit's own function, while replaced


def _wrapper(where: str):
    """Mark `wrapper` as replacing `where`: same name and signature, original in __wrapped__."""

    def decorate(wrapper):
        wrapper = functools.wraps(guard.lookup(where))(wrapper)
        wrapper._timber_seam = True
        return wrapper

    return decorate


def _names_timber(config) -> bool:
    """Whether a config asks for a Timber method (never raises: any doubt is not Timber)."""
    try:
        return is_timber_method(getattr(config, "merge_method", None))
    except Exception:  # noqa: BLE001 - a non-Timber merge must reach mergekit whatever happens
        return False


def _wrappers() -> Dict[str, Callable]:
    """The three replacements (built from mergekit's functions of this process)."""
    seam = _SEAM

    @_wrapper("mergekit.merge.run_merge")
    def run_merge(merge_config, out_path, options, config_source=None):
        if not _names_timber(merge_config):
            return guard.lookup("mergekit.merge.run_merge")(
                merge_config, out_path, options=options, config_source=config_source
            )
        return seam.run_timber_merge(merge_config, out_path, options, config_source)

    @_wrapper("mergekit.merge._model_out_config")
    def _model_out_config(config, arch_info, trust_remote_code=False):
        if not _names_timber(config):
            return guard.lookup("mergekit.merge._model_out_config")(config, arch_info, trust_remote_code=trust_remote_code)
        if not seam.staging() and sys._getframe(1).f_code is guard.lookup("mergekit.merge.run_merge").__code__:
            # mergekit's run_merge reached without the seam (a mergekit that calls it
            # another way): it would write in place, with no check; stop before any file.
            raise TimberError(
                f"{config.merge_method}: mergekit's run_merge was called without mergekit-timber's seam "
                "(this mergekit does not reach mergekit.merge.run_merge as 0.1.5 does); stopped before "
                f"writing anything; mergekit-timber is verified with mergekit {guard.VERIFIED_MERGEKIT[-1]}"
            )
        donor = seam.with_instruct_as_donor(config)
        out = guard.lookup("mergekit.merge._model_out_config")(donor, arch_info, trust_remote_code=trust_remote_code)
        from mergekit_timber.integration import quantized

        return quantized.dequantized_config(out, config)  # a block-FP8 Instruct's output is bf16

    @_wrapper("mergekit.merge._get_donor_model")
    def _get_donor_model(merge_config, options):
        if _names_timber(merge_config):
            merge_config = seam.with_instruct_as_donor(merge_config)
        return guard.lookup("mergekit.merge._get_donor_model")(merge_config, options=options)

    return {
        "mergekit.merge.run_merge": run_merge,
        "mergekit.merge._model_out_config": _model_out_config,
        "mergekit.merge._get_donor_model": _get_donor_model,
    }


def _refusing_run_merge() -> Dict[str, Callable]:
    """Only for a mergekit the guard refused: Timber merges stop, all else passes through."""
    try:
        mergekit_run_merge = guard.lookup("mergekit.merge.run_merge")  # ours unwrapped, mergekit's as is
    except (ImportError, AttributeError):
        return {}
    if not callable(mergekit_run_merge):
        return {}

    @functools.wraps(mergekit_run_merge)
    def run_merge(*args, **kwargs):
        config = args[0] if args else kwargs.get("merge_config")
        if _names_timber(config):
            raise TimberError(guard.verdict().refusal())
        return mergekit_run_merge(*args, **kwargs)

    run_merge._timber_seam = True
    return {"mergekit.merge.run_merge": run_merge}


def _replace(replacements: Dict[str, Callable]) -> None:
    for where, wrapper in replacements.items():
        module_name, name = where.rsplit(".", 1)
        module = importlib.import_module(module_name)
        _ORIGINALS.setdefault(where, getattr(wrapper, "__wrapped__"))
        setattr(module, name, wrapper)


def undo() -> None:
    """Put mergekit's own functions back (the plugin then only registers its methods)."""
    global _SEAM
    while _ORIGINALS:
        where, function = _ORIGINALS.popitem()
        module_name, name = where.rsplit(".", 1)
        setattr(importlib.import_module(module_name), name, function)
    _SEAM = None


def install() -> guard.Verdict:
    """Check mergekit, then replace the three functions, or only guard run_merge. Never raises."""
    global _SEAM
    undo()
    problems = guard.check()
    if not problems:
        try:
            from mergekit_timber.integration import seam

            _SEAM = seam
            _replace(_wrappers())
        except Exception as error:  # noqa: BLE001 - our own failure must not break mergekit
            undo()
            problems = [f"installing the seam failed ({type(error).__name__}: {error})"]
    verdict = guard.record(problems)
    if problems:
        try:
            _replace(_refusing_run_merge())
        except Exception:  # noqa: BLE001 - then mergekit stays exactly as it is
            undo()
    try:
        if running_cli():
            # One line per Timber error, in mergekit's CLIs only (not in every importing process).
            install_excepthook()
    except Exception:  # noqa: BLE001
        pass
    return verdict


install()
