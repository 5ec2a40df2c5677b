"""Every mergekit name mergekit-timber relies on, in one table, and the check of it.

mergekit has no plugin API beyond its method registry, so the plugin reaches into
mergekit in a few places (see mergekit_timber/integration/patches.py for what it changes and why).
`RELIED_ON` lists each mergekit name any module of the package imports, calls, reads or
replaces, with the parameters the plugin passes (or the attributes it reads). `check()`
looks each one up in the mergekit that is installed: a mergekit change is found here,
when `mergekit.merge` is imported, not by a user in the middle of a merge
(tests/test_hook.py checks that the package touches no mergekit name missing here).

The verdict is feature detection, not a version string: when every name is present as
expected, Timber merges run (with one warning on a mergekit version no one verified);
when one is missing or changed, Timber merges stop with one line naming it, and every
other merge is mergekit's own, untouched.

To rely on one more mergekit name, add a line to `RELIED_ON`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import string
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from mergekit_timber.errors import TimberError

LOG = logging.getLogger(__name__)

# mergekit versions the test suite has been run against (docs/registration.md).
VERIFIED_MERGEKIT = ("0.1.5",)


@dataclass(frozen=True)
class Relied:
    """One mergekit name: `where` is its module and name, `kind` says how it is used.

    - "patched": replaced by mergekit_timber.integration.patches; its parameters must be exactly `params`
      (the wrapper has the same signature and forwards them);
    - "called": called (or constructed) with the keyword names in `params`;
    - "mapping": a dict-like registry the plugin reads and edits;
    - "template": a str.format template with exactly the fields in `params`;
    - "class": a class (or enum) with the attributes in `attrs`;
    - "type": a type annotation (a class or a typing alias) the plugin hands to pydantic.
    `attrs` are attributes read from the object (methods, class attributes, enum members).
    """

    where: str
    kind: str
    params: Tuple[str, ...] = ()
    attrs: Tuple[str, ...] = ()
    why: str = ""

    @property
    def module(self) -> str:
        return self.where.rsplit(".", 1)[0]

    @property
    def name(self) -> str:
        return self.where.rsplit(".", 1)[1]


R = Relied
RELIED_ON: Tuple[Relied, ...] = (
    # --- replaced for Timber merges (mergekit_timber/integration/patches.py)
    R("mergekit.merge.run_merge", "patched", ("merge_config", "out_path", "options", "config_source"),
      why="a Timber merge runs preflight, a staged output and the drop-in files"),
    R("mergekit.merge._model_out_config", "patched", ("config", "arch_info", "trust_remote_code"),
      why="config.json of a Timber output is the Instruct model's"),
    R("mergekit.merge._get_donor_model", "patched", ("merge_config", "options"),
      why="tokenizer and tagalong files of a Timber output are the Instruct model's"),
    # --- called or read by the seam, the card and the sweep
    R("mergekit.merge._copy_tokenizer", "called", ("merge_config", "out_path", "options"),
      why="the seam copies the Instruct tokenizer itself (mergekit would swallow a failure)"),
    R("mergekit.merge_methods.registry._METHODS", "mapping",
      why="which method a config names; a sweep removes its one-merge method (no unregister)"),
    R("mergekit.merge_methods.register", "called", ("method",), why="registers timber, timber_l"),
    R("mergekit.merge_methods.registered_methods", "called", (),
      why="registration is idempotent; preflight's vocabulary of parameter names"),
    R("mergekit.merge_methods.get", "called", ("name",), why="preflight reads a method's ParameterSpecs"),
    R("mergekit.card.CARD_TEMPLATE", "template",
      ("metadata", "model_list", "base_text", "merge_method", "name", "config_yaml"),
      why="the Timber model card is mergekit's card plus a table of files"),
    R("mergekit.card.method_md", "called", ("merge_method",), why="the card names the method as mergekit does"),
    R("mergekit.io.tensor_writer.TensorWriter", "called", ("out_path", "max_shard_size", "safe_serialization"),
      attrs=("save_tensor", "finalize"),
      why="a sweep writes its extra outputs with mergekit's writer; hub_layout wraps save_tensor "
          "(self, name, tensor, clone) and checks that signature itself before wrapping"),
    R("mergekit.io.ShardedTensorIndex", "class", attrs=("from_disk",),
      why="hub_layout reads the tensor names of a pickled Instruct checkpoint"),
    R("mergekit.io.tasks.LoaderCache", "class", attrs=("trust_remote_code", "loaders", "get", "setup"),
      why="layout reads a model's config as mergekit's loaders do; block-FP8 models get a "
          "dequantizing loader in the class-level `loaders` dict for one merge (quantized.py); "
          "setup's options become the class defaults for one merge, so --multi-gpu's worker "
          "threads see them (worker_threads.py)"),
    R("mergekit.io.lazy_tensor_loader.LazyTensorLoader", "called", ("index", "lazy_unpickle"),
      attrs=("get_tensor", "flush"), why="quantized.DequantizingLoader subclasses mergekit's loader"),
    R("mergekit.io.lazy_tensor_loader.ShardedTensorIndex", "called",
      ("base_path", "is_safetensors", "tensor_paths", "shards"),
      why="the dequantizing loader's index hides the scale tensors"),
    R("mergekit.io.lazy_tensor_loader.ShardInfo", "called", ("filename", "contained_keys"),
      why="the dequantizing loader's index hides the scale tensors"),
    R("mergekit.options.add_merge_options", "called", ("f",), why="`mergekit-timber sweep` takes mergekit's options"),
    R("mergekit.options.MergeOptions", "called",
      ("copy_tokenizer", "write_model_card", "transformers_cache", "trust_remote_code",
       "out_shard_size", "safe_serialization", "quiet", "lora_merge_cache", "lora_merge_dtype", "lazy_unpickle"),
      why="the seam reads and overrides these options; quantized.py opens loaders as mergekit does"),
    # --- the method adapter (mergekit_timber/method/adapter.py)
    R("mergekit.merge_methods.base.GroupMergeMethod", "class", attrs=("merge_group", "validate_inputs"),
      why="TimberMerge is a GroupMergeMethod"),
    R("mergekit.merge_methods.base.MergeMethodSpec", "called",
      ("name", "parameters", "contract", "pretty_name", "reference_url", "optional_tensor_policy",
       "uses_accelerator"), why="TimberMerge's spec"),
    R("mergekit.merge_methods.base.InputContract", "called",
      ("base", "min_inputs", "max_inputs", "min_non_base", "max_non_base"), why="one Base, one Instruct"),
    R("mergekit.merge_methods.base.ParameterSpec", "called", ("name", "value_type", "scope", "default", "description"),
      attrs=("validate",), why="Timber's parameters and their one validation"),
    R("mergekit.merge_methods.base.ParameterScope", "class", attrs=("NON_BASE",), why="parameter scope"),
    R("mergekit.merge_methods.base.BasePolicy", "class", attrs=("REQUIRED",), why="a Base is required"),
    R("mergekit.merge_methods.base.OptionalTensorPolicy", "class", attrs=("PASSTHROUGH_SINGLETON",),
      why="optional tensors present in one model pass through"),
    R("mergekit.merge_methods.base.PerInputValues", "class", why="type of per-input parameter values"),
    R("mergekit.merge_methods.base.TensorGroup", "class", why="what merge_group receives"),
    # --- preflight and layout read the recipe and the architecture as mergekit does
    R("mergekit.config.MergeConfiguration", "called",
      ("modules", "slices", "models", "merge_method", "base_model", "dtype", "tokenizer_source", "tokenizer",
       "chat_template", "out_dtype", "parameters"), attrs=("referenced_models", "model_validate", "to_yaml"),
      why="the recipe"),
    R("mergekit.config.InputModelDefinition", "called", ("model", "parameters"), why="recipe keys"),
    R("mergekit.config.InputSliceDefinition", "called", ("model", "layer_range", "parameters"), why="recipe keys"),
    R("mergekit.config.OutputSliceDefinition", "called", ("sources", "base_model", "parameters"),
      why="recipe keys; a slice's own base_model"),
    R("mergekit.config.OutputModuleDefinition", "called", ("slices", "models", "parameters"), why="recipe keys"),
    R("mergekit.config.ParameterSetting", "type", why="mergekit's own parser of a parameter setting"),
    R("mergekit.config.ConditionalParameter", "called", ("value", "filter"), why="keys of a filter entry"),
    R("mergekit.common.ModelReference", "called", ("model", "lora"),
      attrs=("model_validate", "local_path", "config", "merged", "lazy_loader"), why="models of the recipe"),
    R("mergekit.common.dtype_from_name", "called", ("name",),
      why="a sweep casts to out_dtype; preflight refuses a dtype: it does not know, before any work"),
    R("mergekit.io.tasks.LoadTensor", "called", ("model", "tensor", "dtype"),
      why="casts each input to the recipe's dtype: as it reads it: a block-FP8 merge sets float32 "
          "(quantized.exact_config), and a float16 overflow is blamed on that cast (finite.blame_cast)"),
    R("mergekit.architecture.get_architecture_info", "called", ("config", "options"),
      why="preflight compares the tensors mergekit will read"),
    R("mergekit.architecture.arch_info_for_config", "called", ("config",), why="vocabulary-sized tensors"),
    R("mergekit.architecture.WeightInfo", "called", ("name", "optional", "aliases", "tied_names"),
      why="a fallback lm_head when the architecture is unknown"),
    R("mergekit.architecture.base.ConfiguredModelArchitecture", "called", ("info", "config"),
      attrs=("all_weights",), why="the weights mergekit plans"),
    R("mergekit.architecture.conversion.get_checkpoint_conversion_mapping", "called", ("model_type",),
      why="model types whose checkpoints mergekit converts"),
)
del R

BY_NAME = {entry.where: entry for entry in RELIED_ON}


def lookup(where: str) -> Any:
    """The mergekit object `where` names, unwrapped if mergekit_timber.integration.patches replaced it."""
    entry = BY_NAME[where]  # a KeyError here: add the name to RELIED_ON
    value = getattr(importlib.import_module(entry.module), entry.name)
    return getattr(value, "__wrapped__", value) if getattr(value, "_timber_seam", False) else value


def _parameters(value: Any) -> Optional[Tuple[List[str], bool]]:
    """(parameter names, takes **kwargs) of a callable; None when it has no signature."""
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return None
    names = [n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def problem_with(entry: Relied) -> Optional[str]:
    """Why the installed mergekit does not offer `entry` as the plugin uses it, else None."""
    try:
        value = lookup(entry.where)
    except ImportError as error:
        return f"{entry.module} cannot be imported ({error})"
    except AttributeError:
        return f"{entry.where} is missing"
    wanted = ", ".join(entry.params)
    if entry.kind in ("patched", "called"):
        found = _parameters(value) if callable(value) else None
        if found is None:
            return f"{entry.where} is not a function with parameters ({wanted})"
        names, any_keyword = found
        if entry.kind == "patched" and tuple(names) != entry.params:
            return f"{entry.where} has parameters ({', '.join(names)}), not ({wanted})"
        missing = [p for p in entry.params if p not in names and not any_keyword]
        if missing:
            return f"{entry.where} takes no parameter {missing[0]!r}"
    elif entry.kind == "mapping":
        if not all(hasattr(value, m) for m in ("get", "pop", "__contains__")):
            return f"{entry.where} is no longer a mapping"
    elif entry.kind == "template":
        if not isinstance(value, str):
            return f"{entry.where} is no longer a text template"
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f}
        if fields != set(entry.params):
            return f"{entry.where} has the fields {sorted(fields)}, not {sorted(entry.params)}"
    elif entry.kind == "class" and not isinstance(value, type):
        return f"{entry.where} is not a class"
    for attr in entry.attrs:
        if not hasattr(value, attr):
            return f"{entry.where} has no attribute {attr!r}"
    return None


def check() -> List[str]:
    """One line per relied-on name the installed mergekit lacks or changed (never raises)."""
    found = []
    for entry in RELIED_ON:
        try:
            problem = problem_with(entry)
        except Exception as error:  # noqa: BLE001 - a failed check is a finding, not a crash
            problem = f"{entry.where} could not be checked ({type(error).__name__}: {error})"
        if problem:
            found.append(problem)
    return found


def mergekit_version() -> str:
    """The installed mergekit's version as its metadata says (for messages only)."""
    try:
        from importlib.metadata import version

        return version("mergekit")
    except Exception:  # noqa: BLE001 - PackageNotFoundError, broken metadata
        return "unknown"


# --------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    """What the guard found when mergekit.merge was imported (set by patches.install)."""

    version: str
    problems: Tuple[str, ...]

    @property
    def verified(self) -> bool:
        return self.version in VERIFIED_MERGEKIT

    def refusal(self) -> str:
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return (
            f"timber merges cannot run with this mergekit ({self.version}): {self.problems[0]}{more}; "
            f"mergekit-timber is verified with mergekit {', '.join(VERIFIED_MERGEKIT)} "
            f"(pip install mergekit=={VERIFIED_MERGEKIT[-1]}); merges with other methods are unaffected"
        )

    def notice(self) -> str:
        return (
            f"mergekit-timber: mergekit {self.version} is not a version mergekit-timber was verified with "
            f"(verified: {', '.join(VERIFIED_MERGEKIT)}); every mergekit function it relies on is present "
            "as expected, so the Timber merge runs"
        )


_VERDICT: Optional[Verdict] = None
_NOTICE_GIVEN = False


def record(problems: List[str]) -> Verdict:
    global _VERDICT
    _VERDICT = Verdict(version=mergekit_version(), problems=tuple(problems))
    return _VERDICT


def verdict() -> Verdict:
    """The guard's verdict; importing mergekit.merge first makes the hook record it."""
    if _VERDICT is None:
        import mergekit.merge  # noqa: F401 - the import hook runs mergekit_timber.integration.patches

        from mergekit_timber.integration import _hook

        _hook.ensure("mergekit.merge")  # also without the hook (MERGEKIT_TIMBER_NO_HOOK)
    if _VERDICT is None:  # the patches could not even be imported
        return Verdict(version=mergekit_version(), problems=("mergekit_timber.integration.patches failed to load",))
    return _VERDICT


def require() -> None:
    """Stop a Timber merge with one line unless the seam is in place; say once if unverified."""
    global _NOTICE_GIVEN
    found = verdict()
    if found.problems:
        raise TimberError(found.refusal())
    if not found.verified and not _NOTICE_GIVEN:
        _NOTICE_GIVEN = True
        LOG.warning(found.notice())
