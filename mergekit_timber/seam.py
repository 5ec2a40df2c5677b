"""The plugin's one seam into `mergekit.merge` (mergekit 0.1.5 only), for Timber merges only.

Timber's output is the Instruct model with refined weights, meant to be dropped in where
the Instruct model was. mergekit 0.1.5 takes the output's config.json, tokenizer,
generation config and tagalong files from `base_model`, writes into the output directory
as it goes, logs and ignores a failed tokenizer copy, and may query the Hub for a relative
local path in its card step. It offers no hook for any of this, so the import hook
(mergekit_timber/_hook.py) imports this module right after `mergekit.merge` has executed,
before `mergekit-yaml` and `mergekit-multi` bind `run_merge`, and it replaces three
functions of that module with wrappers that hand every non-Timber merge to the original
with the same arguments:

- `run_merge`: a `timber`/`timber_l` merge runs preflight, checks the output directory,
  merges into a staging directory (mergekit_timber.output_dir), copies the tokenizer and
  the generation config from the Instruct model (a failure stops the merge), writes our
  model card (no Hub queries for local paths) and publishes the directory at the end;
- `_model_out_config`: config.json is the Instruct model's, with mergekit's own edits
  (dtype, layer counts of slices, vocabulary size set by a `tokenizer:` step);
- `_get_donor_model`: the tokenizer and tagalong files are copied from the Instruct model.

Weights and the vocabulary handling are untouched: the tensors are exactly mergekit's.
Importing this module under another mergekit version raises ImportError naming it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable, List, Optional

import mergekit.merge as _merge

from mergekit_timber import finite, hub_layout, preflight
from mergekit_timber.checkpoint import looks_like_hub_id
from mergekit_timber.errors import (
    TimberOutputError,
    install_excepthook,
    running_cli,
)
from mergekit_timber.output_dir import OutputDir, hold_config

LOG = logging.getLogger(__name__)

SUPPORTED_MERGEKIT = ("0.1.5",)

# The functions of mergekit.merge this seam relies on, with the parameters it passes.
_RELIED_ON = {
    "run_merge": ("merge_config", "out_path", "options", "config_source"),
    "_model_out_config": ("config", "arch_info", "trust_remote_code"),
    "_get_donor_model": ("merge_config", "options"),
    "_copy_tokenizer": ("merge_config", "out_path", "options"),
}


def _check_supported() -> None:
    try:
        found = version("mergekit")
    except PackageNotFoundError:
        found = "unknown"
    problem = None
    if found not in SUPPORTED_MERGEKIT:
        problem = "is not a supported version"
    else:
        for name, params in _RELIED_ON.items():
            function = _original(name)
            if function is None or tuple(inspect.signature(function).parameters) != params:
                problem = f"has no mergekit.merge.{name}{params}"
                break
    if problem:
        raise ImportError(
            f"mergekit-timber: mergekit {found} {problem}; this mergekit-timber supports "
            f"mergekit {', '.join(SUPPORTED_MERGEKIT)} only: install mergekit=="
            f"{SUPPORTED_MERGEKIT[-1]} (or set MERGEKIT_TIMBER_NO_HOOK=1 to run mergekit without the plugin)"
        )


def _original(name: str):
    """mergekit's own function, also when this module was imported before (reload)."""
    function = getattr(_merge, name, None)
    return getattr(function, "__wrapped__", function) if getattr(function, "_timber_seam", False) else function


_check_supported()  # before anything below looks at mergekit.merge


# --------------------------------------------------------------------------- which merges


def _timber_method(config):
    """The TimberMerge a config names (`timber`, `timber_l`, a sweep's own), else None."""
    from mergekit.merge_methods import registry

    from mergekit_timber.method import TimberMerge

    method = registry._METHODS.get(getattr(config, "merge_method", None) or "")
    return method if isinstance(method, TimberMerge) else None


def is_timber(config) -> bool:
    return _timber_method(config) is not None


def instruct_model(config):
    """The one model besides base_model: where config, tokenizer and the rest come from."""
    refs = sorted(config.referenced_models(), key=str)
    # The method's own check and one-line errors (no base, not exactly one other model).
    _timber_method(config).validate_inputs(refs, config.base_model)
    (instruct,) = (ref for ref in refs if ref != config.base_model)
    return instruct


def _with_instruct_as_donor(config):
    return config.model_copy(update={"base_model": instruct_model(config)})


def instruct_dir(config, options) -> Path:
    """The Instruct model's local directory (downloaded if it is a Hub id)."""
    return Path(_get_donor_model(config, options=options)[1])


# Files any tokenizer saved by transformers leaves (one of them is enough to try a copy).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def has_tokenizer(model_dir: Path) -> bool:
    """Whether there is a tokenizer to copy (else transformers would invent an empty one)."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def _mergekit_makes_tokenizer(config) -> bool:
    """An explicit tokenizer step (mergekit builds and saves the tokenizer, embeddings aligned)."""
    return config.tokenizer is not None or config.tokenizer_source is not None


# --------------------------------------------------------------------------- the wrappers


def _seam(name: str):
    def decorate(wrapper):
        wrapper = functools.wraps(_original(name))(wrapper)
        wrapper._timber_seam = True
        return wrapper

    return decorate


@_seam("_model_out_config")
def _model_out_config(config, arch_info, trust_remote_code=False):
    if is_timber(config):
        config = _with_instruct_as_donor(config)
    return _original("_model_out_config")(config, arch_info, trust_remote_code=trust_remote_code)


@_seam("_get_donor_model")
def _get_donor_model(merge_config, options):
    if is_timber(merge_config):
        merge_config = _with_instruct_as_donor(merge_config)
    return _original("_get_donor_model")(merge_config, options=options)


@_seam("run_merge")
def run_merge(merge_config, out_path, options, config_source=None):
    if not is_timber(merge_config):
        return _original("run_merge")(merge_config, out_path, options=options, config_source=config_source)
    return run_timber_merge(merge_config, out_path, options, config_source)


# --------------------------------------------------------------------------- Timber merges


def prepare(
    config, options, outs: Iterable, config_source: Optional[str] = None, *, replace: Optional[bool] = None
) -> List[OutputDir]:
    """Everything checked before the first tensor; the output directories, none touched."""
    preflight.check(config, options, source=config_source)
    instruct_model(config)
    inputs = [ref.model.path for ref in config.referenced_models() if os.path.isdir(ref.model.path)]
    targets = [OutputDir(out, replace=replace, inputs=inputs) for out in outs]
    for target in targets:
        target.check()
    return targets


def run_timber_merge(config, out_path, options, config_source=None, *, replace=None) -> None:
    """mergekit's run_merge for a Timber merge: drop-in output, all or nothing."""
    (target,) = prepare(config, options, [out_path], config_source, replace=replace)
    stage = target.stage()
    try:
        write_merge(config, stage, options, config_source, name=target.name)
        target.publish(stage)
    finally:
        if stage.exists():
            OutputDir.discard(stage)


def write_merge(
    config, stage: Path, options, config_source: Optional[str], *, name: str, run_as: Optional[str] = None
) -> None:
    """Run mergekit's merge into `stage`, then the Instruct files and the card; config held aside.

    `run_as` names the registered method mergekit runs (a sweep's own Timber instance);
    the card and mergekit_config.yml still describe `config`.
    """
    stage = Path(stage)
    explicit_tokenizer = _mergekit_makes_tokenizer(config)
    # mergekit's own copy step would swallow failures: it is ours (below). Without a
    # tokenizer step the chat template is applied by that copy, so mergekit is not told.
    inner_config = config if explicit_tokenizer else config.model_copy(update={"chat_template": None})
    if run_as is not None:
        inner_config = inner_config.model_copy(update={"merge_method": run_as})
    inner_options = options.model_copy(update={"copy_tokenizer": False, "write_model_card": False})
    try:
        # issue 19 hook: tensors are written under the Instruct checkpoint's own names (hub_layout).
        with hub_layout.written_like_instruct(instruct_dir(config, options), [stage], trust_remote_code=options.trust_remote_code):
            _original("run_merge")(inner_config, str(stage), options=inner_options)
    except OSError as error:
        raise TimberOutputError(f"writing the merged model failed: {_reason(error)}") from error
    finite.check_written(stage)
    hold_config(stage)

    instruct, source = instruct_model(config).model.path, instruct_dir(config, options)
    if options.copy_tokenizer and not explicit_tokenizer and not has_tokenizer(source):
        LOG.warning("%s has no tokenizer files: the output has no tokenizer either", instruct)
    elif options.copy_tokenizer and not explicit_tokenizer:
        with _step(f"copying the tokenizer of {instruct}"):
            _merge._copy_tokenizer(config, str(stage), options=options)  # from the Instruct model
    generation = source / "generation_config.json"
    if generation.is_file():
        with _step(f"copying generation_config.json of {instruct}"):
            shutil.copyfile(generation, stage / "generation_config.json")
    if options.write_model_card:
        text = config_source or config.to_yaml()
        with _step("writing the model card"):
            card = model_card(config, text, name=name, options=options, instruct_dir=source)
            (stage / "README.md").write_text(card, encoding="utf-8")
            (stage / "mergekit_config.yml").write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _step(what: str):
    """Any failure inside becomes one line naming the step (mergekit would log it and go on)."""
    try:
        yield
    except TimberOutputError:
        raise
    except Exception as error:
        raise TimberOutputError(f"{what} failed: {_reason(error)}") from error


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# --------------------------------------------------------------------------- the card


def _is_hub(path: str) -> bool:
    # A path that exists here is local, whatever it looks like: never ask the Hub.
    return not os.path.exists(path) and looks_like_hub_id(path)


def _ref_md(ref) -> str:
    def one(path: str) -> str:
        return f"[{path}](https://huggingface.co/{path})" if _is_hub(path) else path

    return one(ref.model.path) + (f" + {one(ref.lora.path)}" if ref.lora else "")


def _tokenizer_origin(config, options, instruct_md: str, instruct_dir: Path) -> str:
    source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    if source == "union":
        return "the union of the input models' vocabularies (the recipe's tokenizer step)"
    if source == "base":
        return f"{_ref_md(config.base_model)} (the recipe's tokenizer step)"
    if source is not None:
        return f"{_ref_md(source)} (the recipe's tokenizer step)"
    if not options.copy_tokenizer:
        return "none (--no-copy-tokenizer)"
    if not has_tokenizer(instruct_dir):
        return "none (the Instruct model has none)"
    return f"{instruct_md} (the Instruct model)"


def model_card(config, config_yaml: str, *, name: str, options, instruct_dir: Path) -> str:
    """mergekit's card for a Timber merge, plus where each file of the output comes from."""
    import yaml
    from mergekit.card import CARD_TEMPLATE, method_md

    refs = sorted(config.referenced_models(), key=str)
    hub = [p for r in refs for p in (r.model.path, r.lora.path if r.lora else None) if p and _is_hub(p)]
    instruct_md = _ref_md(instruct_model(config))
    tokenizer = _tokenizer_origin(config, options, instruct_md, instruct_dir)
    chat = "the recipe's `chat_template:`" if config.chat_template else f"with the tokenizer: {tokenizer}"
    vocab = ", vocabulary size set by the tokenizer step" if _mergekit_makes_tokenizer(config) else ""
    generation = (
        f"{instruct_md} (the Instruct model)"
        if (instruct_dir / "generation_config.json").is_file()
        else "none (the Instruct model has none)"
    )
    card = CARD_TEMPLATE.format(
        metadata=yaml.dump({"base_model": hub, "tags": ["mergekit", "merge"], "library_name": "transformers"}),
        model_list="\n".join(f"* {_ref_md(r)}" for r in refs if r != config.base_model),
        base_text=f" using {_ref_md(config.base_model)} as a base",
        merge_method=method_md(config.merge_method),
        name=name or "Untitled Model (1)",
        config_yaml=config_yaml,
    )
    return card + (
        "\n### Files\n\n"
        "The weights come from this merge; the other files make it a drop-in for the Instruct model.\n\n"
        "| file | from |\n|---|---|\n"
        f"| `config.json` | {instruct_md} (the Instruct model), dtype set by this merge{vocab} |\n"
        f"| `generation_config.json` | {generation} |\n"
        f"| tokenizer files | {tokenizer} |\n"
        f"| chat template | {chat} |\n"
    )


# --------------------------------------------------------------------------- install


def _install() -> None:
    _merge.run_merge = run_merge
    _merge._model_out_config = _model_out_config
    _merge._get_donor_model = _get_donor_model
    if running_cli():
        # One line per user error, in mergekit's CLIs only (not in every importing process).
        install_excepthook()


_install()
