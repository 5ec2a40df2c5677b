"""The files around a Timber output's weights are the Instruct model's own, and proven so.

mergekit 0.1.5 writes `config.json` through transformers 5, which rewrites a config saved
by transformers 4 (`rope_theta`/`rope_scaling` become `rope_parameters`, `num_experts`
becomes `num_local_experts`, `layer_types` and defaults are added): a reader still on
transformers 4 then loads the output with the wrong rope or not at all. So:

- `write_config` first checks that the config mergekit wrote is the Instruct's as
  transformers reads it (the seam made the Instruct its donor), then replaces it with the
  Instruct's own `config.json`, key for key, where only the dtype is set to what was
  written (in the key the file already uses), plus what the recipe itself changes (the
  vocabulary size with a `tokenizer:` step, the layer count with `slices:`); a block-FP8
  Instruct's `quantization_config` goes (mergekit_timber.integration.quantized.plain_config).
- `verify` is the last check before publishing, a safety net for a mergekit that calls
  the seam's patches another way: config, generation config and tokenizer files equal
  the Instruct's (as above), the tensor names and shapes equal the Instruct checkpoint's
  (an FP8 Instruct's without its scales). Any difference stops the merge with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from mergekit_timber.checkpoint import GENERATION_CONFIG as GENERATION, MERGEKIT_TOKENIZER_COPY
from mergekit_timber.errors import TimberOutputError

DTYPE_KEYS = ("dtype", "torch_dtype")
# Keys a recipe itself changes: the vocabulary with a tokenizer step, the layers with slices.
VOCAB_KEY, LAYERS_KEY = "vocab_size", "num_hidden_layers"


def read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TimberOutputError(f"{what} {path} cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise TimberOutputError(f"{what} {path} is not a JSON object")
    return data


def _recipe_keys(merge_config) -> Tuple[str, ...]:
    from mergekit_timber.integration.card import mergekit_makes_tokenizer

    keys = (VOCAB_KEY,) if mergekit_makes_tokenizer(merge_config) else ()
    return keys + ((LAYERS_KEY,) if merge_config.slices or merge_config.modules else ())


def _dtype_of(config: Mapping[str, Any]) -> Optional[str]:
    value = next((config[k] for k in DTYPE_KEYS if config.get(k) is not None), None)
    return str(value).removeprefix("torch.") if value is not None else None


def _with_values(config: Dict[str, Any], source: Mapping[str, Any], keys) -> Dict[str, Any]:
    """`config` with each of `keys` it holds (top level or in text_config) set as in `source`."""
    out = dict(config)
    for key in keys:
        if key in out and key in source:
            out[key] = source[key]
    inner, inner_source = out.get("text_config"), source.get("text_config")
    if isinstance(inner, dict) and isinstance(inner_source, Mapping):
        out["text_config"] = _with_values(inner, inner_source, keys)
    return out


def expected_config(instruct: Mapping[str, Any], written: Mapping[str, Any], merge_config) -> Dict[str, Any]:
    """The Instruct's config.json with the dtype and the recipe's own keys of `written`."""
    from mergekit_timber.integration.quantized import plain_config

    config = plain_config(instruct, _dtype_of(written))
    return _with_values(config, written, _recipe_keys(merge_config))


def _first_difference(got: Any, want: Any, skip=(), path: str = "") -> Optional[str]:
    """The first dotted key where two JSON values differ (None when equal)."""
    if isinstance(got, Mapping) and isinstance(want, Mapping):
        for key in list(want) + [k for k in got if k not in want]:
            if key in skip:
                continue
            where = f"{path}.{key}" if path else str(key)
            if (key in got) != (key in want):
                return where
            found = _first_difference(got[key], want[key], skip, where)
            if found:
                return found
        return None
    return None if got == want else (path or "(the whole file)")


def _shown(config: Mapping[str, Any], dotted: str) -> str:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "absent"
        value = value[part]
    return json.dumps(value)[:80]


def write_config(stage: Path, instruct_dir: Path, merge_config, *, trust_remote_code: bool = False) -> None:
    """Replace mergekit's config.json in `stage` by the Instruct's own (see module doc)."""
    from transformers import AutoConfig

    written_path, instruct_path = Path(stage) / "config.json", Path(instruct_dir) / "config.json"
    written, instruct = read_json(written_path, "config"), read_json(instruct_path, "config")
    # What mergekit wrote must be the Instruct's, read and saved by the same transformers.
    as_read = json.loads(
        AutoConfig.from_pretrained(str(instruct_dir), trust_remote_code=trust_remote_code).to_json_string(use_diff=True)
    )
    skip = DTYPE_KEYS + ("transformers_version", "quantization_config") + _recipe_keys(merge_config)
    key = _first_difference(written, as_read, skip)
    if key is not None:
        raise TimberOutputError(
            f"config.json: mergekit wrote {key} = {_shown(written, key)} where the Instruct model "
            f"({instruct_dir}) has {_shown(as_read, key)}: not the Instruct's config (does this mergekit "
            "still take it from mergekit.merge._model_out_config?); nothing was published"
        )
    text = json.dumps(expected_config(instruct, written, merge_config), indent=2, ensure_ascii=False) + "\n"
    written_path.write_text(text, encoding="utf-8")


def _differ(a: Path, b: Path) -> bool:
    if a.is_file() != b.is_file():
        return True
    return a.is_file() and a.read_bytes() != b.read_bytes()


def _check_files(stage: Path, instruct_dir: Path, merge_config, options) -> None:
    from mergekit_timber.integration.card import mergekit_makes_tokenizer

    def refuse(name: str, why: str):
        raise TimberOutputError(
            f"{name}: {why} the Instruct model's ({instruct_dir / name}); nothing was published"
        )

    staged = read_json(stage / "config.json", "the merged model's config")
    instruct = read_json(instruct_dir / "config.json", "config")
    want = expected_config(instruct, staged, merge_config)
    key = _first_difference(staged, want)
    if key is not None:
        refuse("config.json", f"key {key} is {_shown(staged, key)}, not {_shown(want, key)} as in")
    if _differ(stage / GENERATION, instruct_dir / GENERATION):
        refuse(GENERATION, "is not a copy of" if (instruct_dir / GENERATION).is_file() else "is there without")
    # mergekit copies the tokenizer files byte for byte unless the recipe makes its own
    # tokenizer (a tokenizer step, a chat template) or the Instruct has no fast tokenizer.
    copied = (
        options.copy_tokenizer and not mergekit_makes_tokenizer(merge_config) and not merge_config.chat_template
        and (instruct_dir / "tokenizer_config.json").is_file()
        and any((instruct_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    )  # fmt: skip
    if copied:
        for name in MERGEKIT_TOKENIZER_COPY:
            if _differ(stage / name, instruct_dir / name):
                refuse(name, "is not a copy of" if (instruct_dir / name).is_file() else "is there without")


def instruct_tensors(instruct_dir: Path) -> Dict[str, Optional[Tuple[int, ...]]]:
    """name -> shape of the Instruct checkpoint as a merge reads it (an FP8 one without scales)."""
    from mergekit_timber.integration import hub_layout, quantized
    from mergekit_timber.checkpoint import Checkpoint

    stored = hub_layout._stored_tensors(Path(instruct_dir))
    if any(Path(instruct_dir).glob("*.safetensors")):
        with Checkpoint(Path(instruct_dir), "instruct model") as checkpoint:
            quant = quantized.detect(checkpoint)
        if quant is not None:
            stored = {n: s for n, s in stored.items() if n not in quant.hidden()}
    return stored


def _mergekit_reads(merge_config, options):
    """(name -> whether mergekit reads the Instruct's stored tensor `name`, name -> whether
    mergekit writes `name` as a tied copy of a stored one), from mergekit's architecture."""
    from mergekit_timber.integration.preflight import architecture_weights
    from mergekit_timber.integration.recipe import base_model

    base = base_model(merge_config)
    weights = architecture_weights(merge_config, options, base) if base is not None else None
    if weights is None:  # no architecture to ask: every stored tensor must be there
        return (lambda name: True), (lambda name, stored: False)
    listed = {n for w in weights for n in (w.name, *(w.aliases or ()), *(w.tied_names or ()))}
    # Per-expert tensors of a layer whose experts mergekit reads stacked, through
    # transformers' conversion (Qwen3-MoE `mlp.experts.{e}...`, Mixtral `block_sparse_moe...`).
    layers = tuple(w.name.split(".experts")[0].rsplit(".", 1)[0] + "." for w in weights if ".experts" in w.name)
    tied = {w.name: tuple(w.tied_names or ()) for w in weights}

    def reads(name: str) -> bool:
        return name in listed or (".experts." in name and name.startswith(layers))

    def tied_copy(name: str, stored) -> bool:
        return any(t in stored for t in tied.get(name, ()))

    return reads, tied_copy


def _check_tensors(written: Mapping[str, Tuple[int, ...]], instruct_dir: Path, merge_config, options) -> None:
    from mergekit_timber.integration.card import mergekit_makes_tokenizer
    from mergekit_timber.integration.hub_layout import _layer_template

    stored = instruct_tensors(instruct_dir)
    reads, tied_copy = _mergekit_reads(merge_config, options)
    # A tensor mergekit never reads (not in its architecture) is not written; a tied head
    # (Gemma's lm_head) is written as a copy of the embeddings the checkpoint stores.
    written = {n: s for n, s in written.items() if n in stored or not tied_copy(n, stored)}
    sliced = bool(merge_config.slices or merge_config.modules)
    key = _layer_template if sliced else (lambda name: name)  # slices renumber layers
    want = {key(n): s for n, s in stored.items()}
    read = {key(n) for n in stored if reads(n)}
    got = {key(n): tuple(s) for n, s in written.items()}
    vocab = _vocab_size(read_json(instruct_dir / "config.json", "config"))
    resized = mergekit_makes_tokenizer(merge_config)  # a tokenizer step resizes vocabulary rows

    def refuse(name: str, why: str):
        raise TimberOutputError(
            f"{name}: {why} the Instruct checkpoint ({instruct_dir}); nothing was published"
        )

    for name in sorted(set(got) - set(want)):  # first: a layout not converted back shows here
        refuse(name, "in the merged model but not stored by")
    for name in sorted(read - set(got)):
        refuse(name, "missing from the merged model, though stored by")
    for name in sorted(set(want) & set(got)):
        shape, stored_shape = got[name], want[name]
        if stored_shape is None or tuple(stored_shape) == shape:
            continue
        if resized and stored_shape[0] == vocab and tuple(stored_shape[1:]) == shape[1:]:
            continue
        refuse(name, f"shape {list(shape)} where {list(stored_shape)} is stored by")


def _vocab_size(config: Mapping[str, Any]) -> Optional[int]:
    inner = config.get("text_config")
    return config.get(VOCAB_KEY) or (inner.get(VOCAB_KEY) if isinstance(inner, Mapping) else None)


def written_shapes(stage: Path) -> Dict[str, Tuple[int, ...]]:
    """name -> shape of the tensors written into `stage` (headers; pickled shards memory-mapped)."""
    from mergekit_timber.checkpoint import Checkpoint, open_written

    with open_written(Path(stage), "merged model") as written:
        if isinstance(written, Checkpoint):
            return {name: tuple(written.info(name)[0]) for name in written.names()}
        return {name: tuple(written.tensor(name).shape) for name in written.names()}


def verify(stage: Path, instruct_dir: Path, merge_config, options, written: Mapping[str, Tuple[int, ...]]) -> None:
    """Stop, naming the file or tensor, unless the staged output is the Instruct's files
    around its weights under the Instruct's tensor names and shapes (`written`: name -> shape)."""
    stage, instruct_dir = Path(stage), Path(instruct_dir)
    _check_files(stage, instruct_dir, merge_config, options)
    _check_tensors(written, instruct_dir, merge_config, options)
