"""Checks a Timber merge before its first tensor: refuses what is wrong, and only that.

`check(merge_config, options, source=None)` runs for `merge_method: timber` and
`timber_l` (any other method returns at once) and raises a one-line `TimberError`:

- config keys: mergekit's pydantic models drop unknown keys (a top-level
  `paramaters:` vanishes), so the raw YAML `source` is checked when given (mergekit-yaml
  passes it to run_merge as `config_source`) against mergekit's own field names. Under
  `parameters:` (global, per module, per slice, per model) the vocabulary is mergekit's
  too: the parameter names of every registered method. Another method's parameter
  (`weight`, `density`, ...) is a warning, as mergekit ignores it for Timber; a name no
  method knows is an error naming the closest; Timber's own under the base model's entry
  (never read) is an error;
- parameter values: one validation. A setting's shape (value, gradient, filter entries)
  is mergekit's `ParameterSetting`; each value goes through the method's own
  `ParameterSpec.validate` (mergekit_timber.method.adapter), exactly as mergekit resolves it per
  tensor. Preflight only adds what neither reports in one line: `null`, unknown keys in a
  filter entry;
- models: each exists locally or as a Hub id (a local-looking path that does not exist
  is reported as such); every safetensors header parses (file and model named);
- the Base/Instruct pair, for the tensors mergekit will read (the architecture's weights,
  their aliases and tied names): tensor sets and shapes agree, and lm_head is tied (or
  not) in both as transformers reads the configs. Mixed dtypes without `dtype:` are a
  warning: mergekit promotes both to a common dtype, as for any method.

The Base is `base_model:` or the slices' own `base_model:` (mergekit_timber.integration.recipe).
`explain_config_error` turns mergekit's pydantic error for a Timber config (e.g.
`lambda: null`) into the same one-line errors.
"""

from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit_timber.integration import quantized
from mergekit_timber.errors import TimberConfigError, TimberError, TimberInputError, add_explainer
from mergekit_timber.errors import TIMBER_METHODS
from mergekit_timber.integration.recipe import base_model
from mergekit_timber.checkpoint import MERGE_DTYPES, local_dir
from mergekit_timber.method.parameters import ENERGY, RANK_RATIO, check_cutoffs

LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config


def _spec(method: str):
    import mergekit_timber.method.adapter  # noqa: F401 - registers the methods
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


@functools.lru_cache(maxsize=None)
def _setting_parser():
    from mergekit.config import ParameterSetting
    from pydantic import TypeAdapter

    return TypeAdapter(ParameterSetting)


def _check_value(method: str, spec, value: Any, where: str) -> None:
    """One parameter setting, read as mergekit reads it, each value through the spec."""
    from mergekit.config import ConditionalParameter

    name = spec.name
    if value is None:
        raise TimberConfigError(f"{method}: parameter {name} has no value (null) in {where}")
    entries = value if isinstance(value, list) and value and all(isinstance(v, dict) for v in value) else [value]
    for entry in entries:
        # mergekit's ConditionalParameter drops keys it does not know (a misspelt `value:`).
        if isinstance(entry, dict):
            _unknown_keys(method, entry, _fields(ConditionalParameter), f"in the {name} filter entry in {where}")
            if "value" not in entry:
                raise TimberConfigError(f"{method}: parameter {name}: a filter entry in {where} has no value")
            if entry["value"] is None:
                raise TimberConfigError(f"{method}: parameter {name} has no value (null) in a filter entry in {where}")
    try:
        setting = _setting_parser().validate_python(value)
    except Exception as exc:  # pydantic's multi-line union error: say what mergekit reads instead
        errors = getattr(exc, "errors", lambda: [])()
        reason = errors[0]["msg"] if errors else str(exc).splitlines()[0]
        raise TimberConfigError(
            f"{method}: parameter {name} in {where}: {value!r} is not a setting mergekit reads "
            f"(a value, a list of values (a gradient), or filter entries each with a value:): {reason}"
        ) from None
    for scalar in _scalars(setting):
        try:
            spec.validate(scalar)
        except TimberError as exc:
            raise TimberConfigError(f"{exc} (in {where})") from None
        except Exception as exc:  # pydantic's multi-line error: keep its first message
            errors = getattr(exc, "errors", lambda: [])()
            reason = errors[0]["msg"] if errors else str(exc).splitlines()[0]
            raise TimberConfigError(
                f"{method}: parameter {name} in {where}: invalid value {scalar!r}: {reason}"
            ) from None


def _scalars(setting: Any) -> Iterator[Any]:
    """Every value a parsed setting holds: as mergekit's evaluate_setting reaches them."""
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        yield from _scalars(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _scalars(item)
    else:
        yield setting


def parameter_vocabulary() -> Dict[str, List[str]]:
    """Parameter name -> the registered methods that declare it (mergekit's vocabulary)."""
    import mergekit_timber.method.adapter  # noqa: F401 - registers the methods
    from mergekit import merge_methods

    names: Dict[str, List[str]] = {}
    for method in merge_methods.registered_methods():
        for parameter in method.spec.parameters:
            names.setdefault(parameter.name, []).append(method.spec.name)
    return names


def check_document(doc: Dict[str, Any]) -> None:
    """Keys, places and values of a Timber config given as a plain mapping."""
    method = doc.get("merge_method")
    if method not in TIMBER_METHODS:
        return
    specs = {p.name: p for p in _spec(method).parameters}
    vocabulary = parameter_vocabulary()
    ignored: Dict[str, List[str]] = {}
    _check_structure(method, doc)
    _check_dtypes(method, doc)
    for where, params, base_entry in _parameter_places(doc):
        if params is None:
            continue
        if not isinstance(params, dict):
            raise TimberConfigError(f"{method}: {where}: expected a mapping of parameters; got {params!r}")
        for key, value in params.items():
            if key not in specs and key in vocabulary:
                ignored.setdefault(key, []).append(where)
                continue
            if key not in specs:
                closest = _closest(key, specs) or _closest(key, vocabulary)
                raise TimberConfigError(
                    f"{method}: unknown parameter {key!r} in {where}{closest} "
                    f"(known: {', '.join(specs)}); no merge method has a parameter of that name"
                )
            if base_entry:
                raise TimberConfigError(
                    f"{method}: parameter {key} under the base model's entry ({where}) is never "
                    "read: set it under the instruct model's entry or in the top-level parameters:"
                )
            _check_value(method, specs[key], value, where)
    _check_cutoffs(method, doc)
    for key, places in ignored.items():
        owners = [m for m in vocabulary[key] if m != method]
        LOG.warning(
            "%s: parameter %r (in %s) is a parameter of %s; %s ignores it (its parameters: %s)",
            method, key, ", ".join(places), ", ".join(owners[:4]) + (", ..." if len(owners) > 4 else ""),
            method, ", ".join(specs),
        )


def _for_every_tensor(value: Any) -> bool:
    """A setting that reaches every tensor: a value or gradient, or filter entries with a
    catch-all (an entry without `filter:`, as mergekit's evaluate_setting reads it)."""
    entries = value if isinstance(value, list) and value and all(isinstance(v, dict) for v in value) else None
    return entries is None or any(not entry.get("filter") for entry in entries)


def _check_cutoffs(method: str, doc: Dict[str, Any]) -> None:
    """rank_ratio with energy, refused before the merge (the method refuses it per tensor):
    both set for every tensor in one place, or one in the top-level parameters and the
    other in a place below them."""
    cutoffs = (RANK_RATIO.name, ENERGY.name)
    top: Dict[str, Any] = {}
    for where, params, base_entry in _parameter_places(doc):
        if not isinstance(params, dict) or base_entry:
            continue
        here = {k: params[k] for k in cutoffs if params.get(k) is not None and _for_every_tensor(params[k])}
        found = {**top, **here} if where != "parameters" else here
        if len(found) == 2:
            check_cutoffs(found[RANK_RATIO.name], found[ENERGY.name], where, method)
        if where == "parameters":
            top = here


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




def _check_dtypes(method: str, doc: Dict[str, Any]) -> None:
    """`dtype:`/`out_dtype:` that mergekit would refuse mid-merge ("Unimplemented dtype")."""
    from mergekit_timber.integration import guard

    dtype_from_name = guard.lookup("mergekit.common.dtype_from_name")
    for key in ("dtype", "out_dtype"):
        value = doc.get(key)
        if value is None:
            continue
        try:
            dtype_from_name(value)
        except Exception:  # noqa: BLE001 - mergekit raises RuntimeError; any failure is the same answer
            closest = difflib.get_close_matches(str(value), list(MERGE_DTYPES), n=1)
            hint = f"did you mean {closest[0]!r}? " if closest else ""
            raise TimberConfigError(
                f"{method}: {key}: {value!r} is not a dtype mergekit knows; {hint}"
                "use bfloat16, float16 or float32"
            ) from None


def _recipe_file(trace) -> str:
    """The recipe's path as the mergekit CLI got it (its `config_file`), else a description."""
    found = "the YAML recipe"
    while trace is not None:
        value = trace.tb_frame.f_locals.get("config_file")
        if isinstance(value, str):
            found = value
        trace = trace.tb_next
    return found


def explain_unreadable_recipe(error: BaseException, trace) -> Optional[TimberError]:
    """One line for a recipe mergekit cannot read at all: a YAML syntax error, an empty file.

    Whatever its method (there is none to tell yet): mergekit's own answer is a traceback.
    """
    import yaml

    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        return TimberConfigError(f"{_recipe_file(trace)}: not valid YAML{where}: {problem}; fix the syntax there")
    if type(error).__name__ == "ValidationError" and getattr(error, "title", None) == "MergeConfiguration":
        try:
            problems = error.errors()
        except Exception:  # noqa: BLE001
            return None
        if len(problems) == 1 and problems[0].get("input", ...) is None and not problems[0].get("loc"):
            return TimberConfigError(
                f"{_recipe_file(trace)}: the YAML file is empty (or only comments): nothing to merge; "
                "`mergekit-timber recipe BASE INSTRUCT` prints a Timber recipe"
            )
    return None


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
        return str(local_dir(ref, options))

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
    base = base_model(merge_config)
    others = [m for m in merge_config.referenced_models() if m != base]
    if base is None or len(others) != 1:
        return None  # TimberMerge.validate_inputs reports it
    return base, others[0]


def architecture_weights(merge_config, options, base) -> Optional[List[Any]]:
    """The configured architecture's weights (name, aliases, tied names, optional), as
    mergekit plans them; None when mergekit knows no architecture for the pair."""
    from mergekit.architecture import get_architecture_info
    from mergekit.architecture.base import ConfiguredModelArchitecture

    try:
        arch = get_architecture_info(merge_config, options)
        config = base.config(trust_remote_code=options.trust_remote_code)
        return ConfiguredModelArchitecture(info=arch, config=config).all_weights()
    except Exception:  # noqa: BLE001 - mergekit reports unknown architectures itself
        return None


def ties_embeddings(ref, options, raw: Dict[str, Any]) -> bool:
    """tie_word_embeddings as transformers reads it for `ref`'s model.

    transformers takes the config class's default when the key is absent (True for
    Gemma, False for Llama and Qwen), and composite configs forward a `text_config`
    setting to the top level; a config without the attribute ties nothing, unless its
    text config (a sub-model with its own config) does.
    """
    try:
        config = ref.config(trust_remote_code=options.trust_remote_code)
        tie = getattr(config, "tie_word_embeddings", None)
        if tie is None:
            tie = getattr(config.get_text_config(decoder=True), "tie_word_embeddings", None)
        return bool(tie)
    except Exception:  # noqa: BLE001 - no config class here: read the file as transformers' base would
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
        return bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _fallback_weights() -> List[Any]:
    from mergekit.architecture import WeightInfo

    return [WeightInfo(name="lm_head.weight", optional=True, tied_names=("model.embed_tokens.weight",))]


def _check_pair(merge_config, options, base: Tuple[str, Any], instruct: Tuple[str, Any], refs=None) -> None:
    (base_label, b), (inst_label, i) = base, instruct
    base_ref, inst_ref = refs if refs else (None, None)
    names_b, names_i = set(b.names()), set(i.names())
    weights = architecture_weights(merge_config, options, base_ref) if base_ref is not None else None
    known_architecture = weights is not None
    weights = weights if known_architecture else _fallback_weights()

    # The names mergekit reads: each weight's name, aliases and tied names. Others (a
    # tensor the architecture does not list) are never read: a difference there is harmless.
    from mergekit.architecture.conversion import get_checkpoint_conversion_mapping

    model_type = b.config().get("model_type")
    converted = bool(get_checkpoint_conversion_mapping(model_type))  # mergekit converts layouts
    read = {n for w in weights for n in (w.name, *(w.aliases or ()), *(w.tied_names or ()))}
    stored = names_b | names_i
    if not known_architecture or converted:
        read = stored  # which names mergekit reads is not known here: all of them

    tied_pairs = set()
    for weight in weights:
        own_names = (weight.name, *(weight.aliases or ()))
        if not weight.tied_names or not any(n in stored for n in own_names):
            continue  # nothing tied, or mergekit skips the optional weight (no model has it)
        tied_pairs.update(own_names)

        def tied(ref, checkpoint, names) -> bool:
            own = any(n in names for n in own_names)
            return not own or ties_embeddings(ref, options, checkpoint.config())

        tied_b, tied_i = tied(base_ref, b, names_b), tied(inst_ref, i, names_i)
        if tied_b != tied_i:
            untied, tied_side = (base_label, inst_label) if tied_i else (inst_label, base_label)
            raise TimberInputError(
                f"{weight.name}: the {untied} has its own {weight.name} but the {tied_side} ties it "
                f"to {weight.tied_names[0]} (tie_word_embeddings / no {weight.name}); Timber "
                f"would pair one model's {weight.name} with the other's {weight.tied_names[0]}: "
                "use a Base and Instruct with the same tie_word_embeddings"
            )

    differ = sorted(((names_b ^ names_i) & read) - tied_pairs)
    for name in differ:
        has, lacks = (base_label, inst_label) if name in names_b else (inst_label, base_label)
        raise TimberInputError(
            f"{name}: tensor present in the {has} but missing from the {lacks}"
            + (f" ({len(differ) - 1} more tensors differ)" if len(differ) > 1 else "")
        )

    if known_architecture and not converted:
        for weight in weights:
            wanted = (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))
            if not weight.optional and not any(n in names_b for n in wanted):
                raise TimberInputError(
                    f"{weight.name}: required tensor missing from both models "
                    f"({base_label} and {inst_label})"
                )

    vocab = {w.name for w in weights if w.vocabulary_axis is not None}
    resized = merge_config.tokenizer_source is not None or merge_config.tokenizer is not None
    mixed = []
    for name in sorted(names_b & names_i & read):
        (shape_b, dtype_b), (shape_i, dtype_i) = b.info(name), i.info(name)
        if shape_b != shape_i and not (resized and name in vocab):
            raise TimberInputError(
                f"{name}: shape {shape_b} in the {base_label} but {shape_i} in the {inst_label}"
            )
        if dtype_b != dtype_i and merge_config.dtype is None:
            mixed.append((name, dtype_b, dtype_i))
    if mixed:
        name, dtype_b, dtype_i = mixed[0]
        more = f" ({len(mixed) - 1} more tensors differ)" if len(mixed) > 1 else ""
        LOG.warning(
            "%s: dtype %s in the %s but %s in the %s%s; mergekit promotes both to %s, and the merged "
            "tensors are written in it unless out_dtype: is set: set dtype: to merge in another dtype",
            name, dtype_b, base_label, dtype_i, inst_label, more, _promoted(dtype_b, dtype_i),
        )


def _promoted(dtype_a: str, dtype_b: str) -> str:
    """torch.promote_types of two safetensors dtype names (what mergekit's align_dtype uses)."""
    import torch

    names = {tag: getattr(torch, name) for name, tag in MERGE_DTYPES.items()}
    if dtype_a in names and dtype_b in names:
        return str(torch.promote_types(names[dtype_a], names[dtype_b])).removeprefix("torch.")
    return "a common dtype"


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
                if not (directory / "config.json").is_file():  # mergekit: "Unrecognized model in ..."
                    raise TimberInputError(
                        f"{role} {directory}: no config.json; a model folder holds the config.json its "
                        "weights were saved with: copy the model's config.json there"
                    )
                checkpoints[ref] = (f"{role} ({directory})", _open(directory, role))
        checkpoints = quantized.check_inputs(merge_config, dirs, checkpoints)  # issue 20: refuse or view quantized
        if pair and all(checkpoints.get(ref, (None, None))[1] is not None for ref in pair):
            _check_pair(merge_config, options, checkpoints[pair[0]], checkpoints[pair[1]], refs=pair)
    finally:
        for _, checkpoint in checkpoints.values():
            if checkpoint is not None:
                checkpoint.close()


add_explainer(explain_config_error)
add_explainer(explain_unreadable_recipe)
