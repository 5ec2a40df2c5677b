"""Timber merge orchestration: what `run_merge` does for a `timber`/`timber_l` merge.

mergekit_timber/integration/patches.py hands Timber merges here (and only those); this module checks
the output folder, runs preflight, merges into a staging folder inside the output
(mergekit_timber.integration.output_dir) with mergekit's own `run_merge`, puts the Instruct model's
own config.json, tokenizer and generation config beside the weights (a failure stops the
merge), writes the card (mergekit_timber/integration/card.py; a failure there only warns), checks that
the staged files and tensor names are the Instruct's (mergekit_timber.integration.dropin) and
publishes the model at the end; SIGTERM/SIGHUP clean up like Ctrl-C
(mergekit_timber.integration.signals). The tensor values and the vocabulary handling are mergekit's;
block-FP8 inputs are read dequantized, exactly (mergekit_timber.integration.quantized), and every
tensor is written under the Instruct checkpoint's own name and layout
(mergekit_timber.integration.hub_layout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from mergekit_timber.integration import dropin, finite, guard, hub_layout, preflight, quantized, signals, worker_threads
from mergekit_timber.integration.card import has_tokenizer, mergekit_makes_tokenizer, model_card
from mergekit_timber.errors import NonFiniteInput, TimberOutputError
from mergekit_timber.integration.output_dir import OutputDir, describe, writing_into
from mergekit_timber.checkpoint import local_dir
from mergekit_timber.integration.recipe import base_model, instruct_model, is_timber, with_instruct_as_donor

LOG = logging.getLogger(__name__)

__all__ = [
    "prepare", "run_timber_merge", "write_merge", "instruct_dir", "instruct_model",
    "is_timber", "with_instruct_as_donor", "model_card",
]


def instruct_dir(config, options) -> Path:
    """The Instruct model's local directory (downloaded if it is a Hub id)."""
    get_donor_model = guard.lookup("mergekit.merge._get_donor_model")
    return Path(get_donor_model(with_instruct_as_donor(config), options=options)[1])


def _local(model, options) -> Optional[Path]:
    try:
        return local_dir(model, options)
    except Exception:  # noqa: BLE001 - only used to word an error better
        return None


def prepare(config, options, outs: Iterable, config_source: Optional[str] = None) -> List[OutputDir]:
    """Everything checked before the first tensor; the output folders, none touched."""
    guard.require()  # the seam is in place (else one line), and a word on an unverified mergekit
    inputs = [ref.model.path for ref in config.referenced_models() if os.path.isdir(ref.model.path)]
    targets = [OutputDir(out, inputs=inputs) for out in outs]
    for target in targets:
        target.check()  # first: instant, and before preflight may fetch a model
    preflight.check(config, options, source=config_source)
    instruct_model(config)
    return targets


_STAGES: set = set()  # staging folders a Timber merge is writing now (see staging)


def staging() -> bool:
    """Whether a Timber merge of this process is running mergekit through the seam."""
    return bool(_STAGES)


def run_timber_merge(config, out_path, options, config_source=None) -> None:
    """mergekit's run_merge for a Timber merge: drop-in output, all or nothing."""
    (target,) = prepare(config, options, [out_path], config_source)
    with signals.terminate_as_exception():
        try:
            model_dir = target.open()
            write_merge(config, model_dir, options, config_source, name=target.name)
            target.publish()
        finally:
            target.discard()  # nothing left after a publish; the staging folder after a failure


def write_merge(
    config, stage: Path, options, config_source: Optional[str], *, name: str, run_as: Optional[str] = None
) -> dict:
    """Run mergekit's merge into `stage`, then the Instruct files and the card; check them.

    `run_as` names the registered method mergekit runs (a sweep's own Timber instance);
    the card and mergekit_config.yml still describe `config`. Returns the written
    tensors' shapes (name -> shape).
    """
    stage = Path(stage)
    explicit_tokenizer = mergekit_makes_tokenizer(config)
    # mergekit's own copy step would swallow failures: it is ours (below). Without a
    # tokenizer step the chat template is applied by that copy, so mergekit is not told.
    inner_config = config if explicit_tokenizer else config.model_copy(update={"chat_template": None})
    if run_as is not None:
        inner_config = inner_config.model_copy(update={"merge_method": run_as})
    inner_options = options.model_copy(update={"copy_tokenizer": False, "write_model_card": False})
    # The Instruct's folder: mergekit resolves a Hub id through the Hub, so once.
    instruct, source = instruct_model(config).model.path, instruct_dir(config, options)
    # block-FP8 inputs are read dequantized; tensors are written under the Instruct
    # checkpoint's own names and layout (hub_layout).
    # --multi-gpu workers see the options too (worker_threads).
    with writing_into(stage), worker_threads.options_in_every_thread(options), \
            quantized.dequantized_reading(config, options) as exact, \
            hub_layout.written_like_instruct(source, [stage], trust_remote_code=options.trust_remote_code):
        if exact:  # block-FP8: read every input exactly, round once on output
            inner_config = quantized.exact_config(inner_config)
        _STAGES.add(stage)
        try:
            guard.lookup("mergekit.merge.run_merge")(inner_config, str(stage), options=inner_options)
        except NonFiniteInput as error:  # the model's file, or the recipe's dtype: cast?
            model = base_model(config) if error.which == "base" else instruct_model(config)
            raise finite.blame_cast(error, inner_config.dtype, _local(model, options)) from error
        finally:
            _STAGES.discard(stage)
    written = finite.check_written(stage)
    with _step(f"writing config.json of {instruct}"):
        dropin.write_config(stage, source, config, trust_remote_code=options.trust_remote_code)

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
        write_card(stage, config, text, name=name, options=options, instruct_dir=source)
    dropin.verify(stage, source, config, options, written)
    return written


def write_card(stage: Path, config, config_text: str, *, name: str, options, instruct_dir: Path) -> None:
    """README.md (card.model_card) and mergekit_config.yml; a failure here does not make the
    model wrong: one warning, and the model is published without them."""
    files = (stage / "README.md", stage / "mergekit_config.yml")
    try:
        card = model_card(config, config_text, name=name, options=options, instruct_dir=instruct_dir)
        files[0].write_text(card, encoding="utf-8")
        files[1].write_text(config_text, encoding="utf-8")
    except Exception as error:  # noqa: BLE001 - cosmetic: never worth the finished merge
        for item in files:
            with contextlib.suppress(OSError):
                item.unlink()
        LOG.warning("writing the model card failed (%s); the model is published without README.md "
                    "and mergekit_config.yml", describe(error))


@contextlib.contextmanager
def _step(what: str):
    """Any failure inside becomes one line naming the step (mergekit would log it and go on)."""
    try:
        yield
    except TimberOutputError:
        raise
    except Exception as error:
        # describe: the output file for a failed write, shown where the user will look
        raise TimberOutputError(f"{what} failed: {describe(error)}") from error
