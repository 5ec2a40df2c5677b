"""What a mergekit recipe says to Timber: is it a Timber merge, which is its Base, its Instruct.

A recipe names its Base as `base_model:` at the top, or per slice (`slices:` entries, also
inside `modules:`), as mergekit's planner reads it (a slice's own base_model wins).
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional

from mergekit_timber.errors import TimberInputError, is_timber_method


def timber_method(config):
    """The TimberMerge a config names (`timber`, `timber_l`, a sweep's own), else None."""
    from mergekit.merge_methods import registry

    from mergekit_timber.method.adapter import TimberMerge

    method = registry._METHODS.get(getattr(config, "merge_method", None) or "")
    return method if isinstance(method, TimberMerge) else None


def is_timber(config) -> bool:
    return is_timber_method(getattr(config, "merge_method", None))


def _slices(config) -> Iterator[Any]:
    yield from config.slices or ()
    for module in (config.modules or {}).values():
        yield from module.slices or ()


def base_model(config) -> Optional[Any]:
    """The one Base model the recipe names (top level or per slice); None when it names none.

    Several different Base models (one slice's differs from another's) stop with one line:
    the output is a drop-in for one Instruct model refined with its one Base.
    """
    slice_bases = [s.base_model or config.base_model for s in _slices(config)]
    found: List[Any] = []
    for ref in ([config.base_model] if not slice_bases else slice_bases):
        if ref is not None and ref not in found:
            found.append(ref)
    if len(found) > 1:
        raise TimberInputError(
            f"{config.merge_method}: the slices name different base models "
            f"({', '.join(str(r) for r in found)}); Timber refines one Instruct model with its one Base"
        )
    return found[0] if found else None


def instruct_model(config):
    """The one model besides the Base: where config, tokenizer and the rest come from."""
    refs = sorted(config.referenced_models(), key=str)
    base = base_model(config)
    # The method's own check and one-line errors (no base, not exactly one other model).
    timber_method(config).validate_inputs(refs, base)
    (instruct,) = (ref for ref in refs if ref != base)
    return instruct


def with_instruct_as_donor(config):
    """The config with base_model set to the Instruct model (mergekit's donor of files)."""
    return config.model_copy(update={"base_model": instruct_model(config)})
