"""Timber merge orchestration: what `run_merge` does for a `timber`/`timber_l` merge.

mergekit_timber/patches.py hands Timber merges here (and only those); this module runs
preflight, checks the output directory, merges into a staging directory
(mergekit_timber.output_dir) with mergekit's own `run_merge`, copies the tokenizer and
the generation config from the Instruct model (a failure stops the merge), writes the
card (mergekit_timber/card.py) and publishes the directory at the end. Weights and the
vocabulary handling are untouched: the tensors are exactly mergekit's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from mergekit_timber import finite, guard, preflight, quantized
from mergekit_timber.card import has_tokenizer, mergekit_makes_tokenizer, model_card
from mergekit_timber.errors import TimberOutputError
from mergekit_timber.output_dir import OutputDir, hold_config
from mergekit_timber.recipe import instruct_model, is_timber, with_instruct_as_donor

LOG = logging.getLogger(__name__)

__all__ = [
    "prepare", "run_timber_merge", "write_merge", "instruct_dir", "instruct_model",
    "is_timber", "with_instruct_as_donor", "model_card",
]


def instruct_dir(config, options) -> Path:
    """The Instruct model's local directory (downloaded if it is a Hub id)."""
    get_donor_model = guard.lookup("mergekit.merge._get_donor_model")
    return Path(get_donor_model(with_instruct_as_donor(config), options=options)[1])


def prepare(
    config, options, outs: Iterable, config_source: Optional[str] = None, *, replace: Optional[bool] = None
) -> List[OutputDir]:
    """Everything checked before the first tensor; the output directories, none touched."""
    guard.require()  # the seam is in place (else one line), and a word on an unverified mergekit
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
    explicit_tokenizer = mergekit_makes_tokenizer(config)
    # mergekit's own copy step would swallow failures: it is ours (below). Without a
    # tokenizer step the chat template is applied by that copy, so mergekit is not told.
    inner_config = config if explicit_tokenizer else config.model_copy(update={"chat_template": None})
    if run_as is not None:
        inner_config = inner_config.model_copy(update={"merge_method": run_as})
    inner_options = options.model_copy(update={"copy_tokenizer": False, "write_model_card": False})
    try:
        with quantized.dequantized_reading(config, options):  # block-FP8 inputs read dequantized
            guard.lookup("mergekit.merge.run_merge")(inner_config, str(stage), options=inner_options)
    except OSError as error:
        raise TimberOutputError(f"writing the merged model failed: {_reason(error)}") from error
    finite.check_written(stage)
    hold_config(stage)

    instruct, source = instruct_model(config).model.path, instruct_dir(config, options)
    if options.copy_tokenizer and not explicit_tokenizer and not has_tokenizer(source):
        LOG.warning("%s has no tokenizer files: the output has no tokenizer either", instruct)
    elif options.copy_tokenizer and not explicit_tokenizer:
        with _step(f"copying the tokenizer of {instruct}"):
            copy_tokenizer = guard.lookup("mergekit.merge._copy_tokenizer")
            copy_tokenizer(config, str(stage), options=options)  # from the Instruct model (patched donor)
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
