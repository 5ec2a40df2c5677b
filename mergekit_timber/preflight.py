"""Checks a Timber merge before its first tensor: every bad input stops it with one line.

`check(merge_config, options, source=None)` runs for `merge_method: timber` and
`timber_l` (any other method returns at once) and raises a one-line `TimberError`:

- config keys: mergekit's pydantic models drop unknown keys (a top-level
  `paramaters:` vanishes), so the raw YAML `source` is checked when given (mergekit-yaml
  passes it to run_merge as `config_source`); every key under `parameters:` (global,
  per module, per slice, per model, per filter entry) must be a Timber parameter read
  in that place: parameters under the base model's entry are never read;
- parameter values: each scalar (filters and gradients included) goes through the
  method's own strict validators (method._parameters); `null` is named too;
- models: each exists locally or as a Hub id (a local-looking path that does not exist
  is reported as such); every safetensors header parses (file and model named);
- the Base/Instruct pair: tensor sets, shapes and dtypes agree and lm_head is tied
  (or not) in both, so no output tensor pairs unrelated tensors.

`explain_config_error` turns mergekit's pydantic error for a Timber config (e.g.
`lambda: null`) into the same one-line errors.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit_timber import quantized
from mergekit_timber.errors import TimberConfigError, TimberError, TimberInputError, add_explainer

TIMBER_METHODS = ("timber", "timber_l")


# ----------------------------------------------------------------------------- config


def _spec(method: str):
    import mergekit_timber.method  # noqa: F401 - registers the methods
    from mergekit import merge_methods

    return merge_methods.get(method).spec


def _closest(word: str, known) -> str:
    match = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _fields(model) -> List[str]:
    return list(model.model_fields)


def _unknown_keys(method: str, mapping: Any, known: List[str], where: str) -> None:
    if not isinstance(mapping, dict):
        return
    for key in mapping:
        if key not in known:
            raise TimberConfigError(
                f"{method}: unknown key {key!r} {where}{_closest(key, known)} "
                f"(known there: {', '.join(known)})"
            )


def _check_structure(method: str, doc: Dict[str, Any]) -> None:
    """Keys mergekit's models would silently drop (top-level `paramaters:` and such)."""
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        MergeConfiguration,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )

    # `name:` names a document of a mergekit-multi recipe.
    _unknown_keys(method, doc, _fields(MergeConfiguration) + ["name"], "at the top level of the config")
    for i, entry in enumerate(_as_list(doc.get("models"))):
        _unknown_keys(method, entry, _fields(InputModelDefinition), f"in models[{i}]")
    for where, module in _modules(doc):
        if where:
            _unknown_keys(method, module, _fields(OutputModuleDefinition), f"in {where}")
        for i, entry in enumerate(_as_list(module.get("models"))):
            _unknown_keys(method, entry, _fields(InputModelDefinition), f"in {where}models[{i}]")
        for i, out in enumerate(_as_list(module.get("slices"))):
            _unknown_keys(method, out, _fields(OutputSliceDefinition), f"in {where}slices[{i}]")
            for k, src in enumerate(_as_list(out.get("sources") if isinstance(out, dict) else None)):
                _unknown_keys(
                    method, src, _fields(InputSliceDefinition), f"in {where}slices[{i}].sources[{k}]"
                )


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _modules(doc: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(label prefix, module-like mapping): the document itself, then each module."""
    yield "", doc
    modules = doc.get("modules")
    if isinstance(modules, dict):
        for name, module in modules.items():
            if isinstance(module, dict):
                yield f"modules.{name}.", module


def _same_model(a: Any, b: Any) -> bool:
    from mergekit.common import ModelReference

    if a is None or b is None:
        return False
    try:
        return ModelReference.model_validate(a) == ModelReference.model_validate(b)
    except Exception:  # malformed references are mergekit's to report
        return a == b


def _parameter_places(doc: Dict[str, Any]) -> Iterator[Tuple[str, Any, bool]]:
    """(where, parameters mapping, belongs to the base model's entry) for every place."""
    base = doc.get("base_model")
    for prefix, module in _modules(doc):
        yield f"{prefix}parameters", module.get("parameters"), False
        for i, entry in enumerate(_as_list(module.get("models"))):
            if isinstance(entry, dict):
                yield (
                    f"{prefix}models[{i}] ({entry.get('model')}) parameters",
                    entry.get("parameters"),
                    _same_model(entry.get("model"), base),
                )
        for i, out in enumerate(_as_list(module.get("slices"))):
            if not isinstance(out, dict):
                continue
            yield f"{prefix}slices[{i}] parameters", out.get("parameters"), False
            slice_base = out.get("base_model") or base
            for k, src in enumerate(_as_list(out.get("sources"))):
                if isinstance(src, dict):
                    yield (
                        f"{prefix}slices[{i}].sources[{k}] ({src.get('model')}) parameters",
                        src.get("parameters"),
                        _same_model(src.get("model"), slice_base),
                    )


def _check_value(method: str, spec, value: Any, where: str) -> None:
    """One parameter setting: a scalar, a gradient list, or filter entries."""
    name = spec.name
    if value is None:
        raise TimberConfigError(f"{method}: parameter {name} has no value (null) in {where}")
    if isinstance(value, dict):
        _unknown_keys(method, value, ["filter", "value"], f"in the {name} filter entry in {where}")
        if "value" not in value:
            raise TimberConfigError(f"{method}: parameter {name}: a filter entry in {where} has no value")
        if not isinstance(value.get("filter", ""), (str, type(None))):
            raise TimberConfigError(
                f"{method}: parameter {name}: filter must be a string in {where}; got {value['filter']!r}"
            )
        return _check_value(method, spec, value["value"], where)
    if isinstance(value, list):
        if not value:
            return
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                _check_value(method, spec, entry, where)
            return
        for v in value:  # a gradient: scalars only
            if isinstance(v, (dict, list)):
                raise TimberConfigError(
                    f"{method}: parameter {name} in {where}: a list holds either numbers "
                    f"(a gradient) or filter entries, not {v!r}"
                )
            _check_value(method, spec, v, where)
        return
    try:
        spec.validate(value)
    except TimberError as exc:
        raise TimberConfigError(f"{exc} (in {where})") from None
    except Exception as exc:  # pydantic's multi-line error: keep its first message
        errors = getattr(exc, "errors", lambda: [])()
        reason = errors[0]["msg"] if errors else str(exc).splitlines()[0]
        raise TimberConfigError(
            f"{method}: parameter {name} in {where}: invalid value {value!r}: {reason}"
        ) from None


def check_document(doc: Dict[str, Any]) -> None:
    """Keys, places and values of a Timber config given as a plain mapping."""
    method = doc.get("merge_method")
    if method not in TIMBER_METHODS:
        return
    specs = {p.name: p for p in _spec(method).parameters}
    _check_structure(method, doc)
    for where, params, base_entry in _parameter_places(doc):
        if params is None:
            continue
        if not isinstance(params, dict):
            raise TimberConfigError(f"{method}: {where}: expected a mapping of parameters; got {params!r}")
        for key, value in params.items():
            if key not in specs:
                raise TimberConfigError(
                    f"{method}: unknown parameter {key!r} in {where}{_closest(key, specs)} "
                    f"(known: {', '.join(specs)})"
                )
            if base_entry:
                raise TimberConfigError(
                    f"{method}: parameter {key} under the base model's entry ({where}) is never "
                    "read: set it under the instruct model's entry or in the top-level parameters:"
                )
            _check_value(method, specs[key], value, where)


def _document(merge_config, source: Optional[str]) -> Dict[str, Any]:
    if source:
        import yaml

        try:
            doc = yaml.safe_load(source)
        except yaml.YAMLError:
            doc = None
        if isinstance(doc, dict) and doc.get("merge_method") == merge_config.merge_method:
            return doc
    return merge_config.model_dump(mode="json", exclude_none=True, warnings=False)


def explain_config_error(error: BaseException, trace) -> Optional[TimberError]:
    """A one-line error for pydantic's failure to read a Timber config, else None.

    mergekit-yaml validates the YAML into a MergeConfiguration before any plugin code
    runs; `lambda: null` fails there with a 20-line pydantic error. The document is the
    `obj` (model_validate) or `data` (__init__) of pydantic's frame in the traceback.
    """
    if type(error).__name__ != "ValidationError" or getattr(error, "title", None) != "MergeConfiguration":
        return None
    doc = None
    while trace is not None:
        local = trace.tb_frame.f_locals
        for key in ("obj", "data"):
            if isinstance(local.get(key), dict) and "merge_method" in local[key]:
                doc = local[key]
        trace = trace.tb_next
    if doc is None or doc.get("merge_method") not in TIMBER_METHODS:
        return None
    try:
        check_document(doc)
    except TimberError as exc:
        return exc
    return None


# ----------------------------------------------------------------------------- models


def _local_dir(ref, role: str, options) -> Optional[Path]:
    """The model's local directory (a Hub id is fetched as mergekit would); None for LoRA."""
    from mergekit_timber.checkpoint import resolve_model

    def fetch() -> str:  # as mergekit fetches it
        return ref.local_path(cache_dir=options.transformers_cache, ignore_lora=True)

    local = resolve_model(ref.model.path, role, fetch)
    return None if ref.lora else local


def _open(directory: Path, role: str):
    """The model's Checkpoint (every header parsed), or None when it has no safetensors."""
    from mergekit_timber.checkpoint import Checkpoint

    has_index = (directory / "model.safetensors.index.json").is_file()
    if not has_index and not any(directory.glob("*.safetensors")):
        if any(directory.glob("*.bin")):
            return None  # pickled weights: mergekit reads them; no header to check
        raise TimberInputError(f"{role} {directory}: no *.safetensors (or *.bin) weights found")
    checkpoint = Checkpoint(directory, role)
    for name in checkpoint.names():
        checkpoint.info(name)  # opens every shard: a garbled header fails here
    return checkpoint


def _pair(merge_config) -> Optional[Tuple[Any, Any]]:
    """(base, instruct) when the config names exactly those two; else None."""
    base = merge_config.base_model
    others = [m for m in merge_config.referenced_models() if m != base]
    if base is None or len(others) != 1:
        return None  # TimberMerge.validate_inputs reports it
    return base, others[0]


def _architecture_weights(merge_config, options) -> List[Any]:
    """The configured architecture's weights (name, aliases, tied names, optional)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.architecture.base import ConfiguredModelArchitecture

    try:
        arch = get_architecture_info(merge_config, options)
        config = merge_config.base_model.config(trust_remote_code=options.trust_remote_code)
        return ConfiguredModelArchitecture(info=arch, config=config).all_weights()
    except Exception:  # mergekit reports unknown architectures itself; still check lm_head
        from mergekit.architecture import WeightInfo

        return [WeightInfo(name="lm_head.weight", optional=True, tied_names=("model.embed_tokens.weight",))]


def _tied(config: dict, names: set, weight) -> bool:
    """Whether the model takes `weight` (lm_head) from its tied input embedding."""
    own = any(n in names for n in (weight.name, *(weight.aliases or ())))
    return not own or bool(config.get("tie_word_embeddings", False))


def _check_pair(merge_config, options, base: Tuple[str, Any], instruct: Tuple[str, Any]) -> None:
    (base_label, b), (inst_label, i) = base, instruct
    names_b, names_i = set(b.names()), set(i.names())
    weights = _architecture_weights(merge_config, options)

    tied_pairs = set()
    for weight in weights:
        if not weight.tied_names:
            continue
        tied_b, tied_i = _tied(b.config(), names_b, weight), _tied(i.config(), names_i, weight)
        tied_pairs.update((weight.name, *(weight.aliases or ())))
        if tied_b != tied_i:
            untied, tied = (base_label, inst_label) if tied_i else (inst_label, base_label)
            raise TimberInputError(
                f"{weight.name}: the {untied} has its own {weight.name} but the {tied} ties it "
                f"to {weight.tied_names[0]} (tie_word_embeddings / no {weight.name}); Timber "
                f"would pair one model's {weight.name} with the other's {weight.tied_names[0]}: "
                "use a Base and Instruct with the same tie_word_embeddings"
            )

    for name in sorted((names_b ^ names_i) - tied_pairs):
        has, lacks = (base_label, inst_label) if name in names_b else (inst_label, base_label)
        more = len((names_b ^ names_i) - tied_pairs) - 1
        raise TimberInputError(
            f"{name}: tensor present in the {has} but missing from the {lacks}"
            + (f" ({more} more tensors differ)" if more else "")
        )

    from mergekit.architecture.conversion import get_checkpoint_conversion_mapping

    model_type = b.config().get("model_type")
    if not get_checkpoint_conversion_mapping(model_type):  # else mergekit converts layouts
        for weight in weights:
            wanted = (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))
            if not weight.optional and not any(n in names_b for n in wanted):
                raise TimberInputError(
                    f"{weight.name}: required tensor missing from both models "
                    f"({base_label} and {inst_label})"
                )

    vocab = {w.name for w in weights if w.vocabulary_axis is not None}
    resized = merge_config.tokenizer_source is not None or merge_config.tokenizer is not None
    for name in sorted(names_b & names_i):
        (shape_b, dtype_b), (shape_i, dtype_i) = b.info(name), i.info(name)
        if shape_b != shape_i and not (resized and name in vocab):
            raise TimberInputError(
                f"{name}: shape {shape_b} in the {base_label} but {shape_i} in the {inst_label}"
            )
        if dtype_b != dtype_i and merge_config.dtype is None:
            raise TimberInputError(
                f"{name}: dtype {dtype_b} in the {base_label} but {dtype_i} in the {inst_label}; "
                "set dtype: in the config to merge both in one dtype"
            )


def check(merge_config, options, source: Optional[str] = None) -> None:
    """Raise a one-line TimberError for anything that would spoil a Timber merge."""
    if merge_config.merge_method not in TIMBER_METHODS:
        return
    check_document(_document(merge_config, source))
    pair = _pair(merge_config)
    roles = {}
    if pair:
        roles = {pair[0]: "base model", pair[1]: "instruct model"}
    dirs = {
        ref: _local_dir(ref, roles.get(ref, "model"), options)
        for ref in merge_config.referenced_models()
    }
    checkpoints = {}
    try:
        for ref, directory in dirs.items():
            if directory is not None:
                role = roles.get(ref, "model")
                checkpoints[ref] = (f"{role} ({directory})", _open(directory, role))
        checkpoints = quantized.check_inputs(merge_config, dirs, checkpoints)  # issue 20: refuse or view quantized
        if pair and all(checkpoints.get(ref, (None, None))[1] is not None for ref in pair):
            _check_pair(merge_config, options, checkpoints[pair[0]], checkpoints[pair[1]])
    finally:
        for _, checkpoint in checkpoints.values():
            if checkpoint is not None:
                checkpoint.close()


add_explainer(explain_config_error)
