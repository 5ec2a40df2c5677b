"""The model card of a Timber output: mergekit's card, plus where each file came from.

mergekit's own card step may query the Hub for a relative local path; this one never
asks the Hub about a path that exists here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_timber.checkpoint import GENERATION_CONFIG, TOKENIZER_CORE, looks_like_hub_id
from mergekit_timber.integration.recipe import base_model, instruct_model



def has_tokenizer(model_dir: Path) -> bool:
    """Whether there is a tokenizer to copy (else transformers would invent an empty one)."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_CORE)


def mergekit_makes_tokenizer(config) -> bool:
    """An explicit tokenizer step (mergekit builds and saves the tokenizer, embeddings aligned)."""
    return config.tokenizer is not None or config.tokenizer_source is not None


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
        return f"{_ref_md(base_model(config))} (the recipe's tokenizer step)"
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

    refs, base = sorted(config.referenced_models(), key=str), base_model(config)
    hub = [p for r in refs for p in (r.model.path, r.lora.path if r.lora else None) if p and _is_hub(p)]
    instruct_md = _ref_md(instruct_model(config))
    tokenizer = _tokenizer_origin(config, options, instruct_md, instruct_dir)
    chat = "the recipe's `chat_template:`" if config.chat_template else f"with the tokenizer: {tokenizer}"
    vocab = ", vocabulary size set by the tokenizer step" if mergekit_makes_tokenizer(config) else ""
    generation = (
        f"{instruct_md} (the Instruct model)"
        if (instruct_dir / GENERATION_CONFIG).is_file()
        else "none (the Instruct model has none)"
    )
    card = CARD_TEMPLATE.format(
        metadata=yaml.dump({"base_model": hub, "tags": ["mergekit", "merge"], "library_name": "transformers"}),
        model_list="\n".join(f"* {_ref_md(r)}" for r in refs if r != base),
        base_text=f" using {_ref_md(base)} as a base",
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
