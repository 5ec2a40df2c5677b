"""The mergekit adapter: `timber` and `timber_l` as mergekit GroupMergeMethods.

This module maps mergekit's per-tensor call onto the kernel: it asks
mergekit_timber.method.layout which tensors are refined and how each splits into matrices
(stacked MoE experts, fused projections), checks the inputs, and reads the
parameters. The maths lives in mergekit_timber.method.kernel.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from pydantic import AfterValidator, BeforeValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_timber import DISTRIBUTION, PAPER_URL

from mergekit_timber.integration import input_pages, quantized, signals
from mergekit_timber.integration.finite import check_finite

from mergekit_timber.method import layout
from mergekit_timber.errors import TimberConfigError, TimberInputError
from mergekit_timber.method.kernel import ERANK, HeadRule, NonFiniteDelta, refine_stack
from mergekit_timber.method.parameters import PARAMETERS, Parameter, check_cutoffs

LOG = logging.getLogger(__name__)


def _fraction(parameter: Parameter):
    return AfterValidator(parameter.check)


def _strict_number(name: str):
    """Numbers only: pydantic alone would take `true` as 1.0 (a silently wrong merge)."""

    def check(value: Any) -> Any:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        if isinstance(value, str):  # YAML 1.1 reads `1e-1` as a string; mergekit accepts it
            try:
                return float(value)
            except ValueError:
                pass
        raise TimberConfigError(f"timber: parameter {name} must be a number; got {value!r}")

    return BeforeValidator(check)


def _strict_bool(name: str):
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        raise TimberConfigError(f"timber: parameter {name} must be true or false; got {value!r}")

    return BeforeValidator(check)


def _no_lambda(value: Any) -> None:
    if value is not None:
        raise TimberConfigError(
            "timber_l: parameter lambda is not accepted (timber_l removes the tail, "
            f"lambda = 0); got lambda={value}; use merge_method: timber to set lambda"
        )
    return None


def _spec(parameter: Parameter, method: str) -> ParameterSpec:
    """mergekit's declaration of one parameter (parameters.PARAMETERS defines them).

    NON_BASE scope: each may be set globally or under the instruct model's entry, with
    mergekit's filters and gradients; both places are honoured.
    """
    name, description = parameter.name, parameter.meaning.replace("`", "")
    if method not in parameter.methods:  # timber_l's lambda: any value refused, before parsing
        kind = Annotated[Optional[float], BeforeValidator(_no_lambda)]
        return ParameterSpec(name, kind, ParameterScope.NON_BASE, default=None,
                             description=f"Not accepted by {method}.")
    if parameter.kind is bool:
        kind = Annotated[bool, _strict_bool(name)]
    else:
        optional = Optional[float] if parameter.default is None else float
        kind = Annotated[optional, _strict_number(name), _fraction(parameter)]
    return ParameterSpec(name, kind, ParameterScope.NON_BASE, default=parameter.default, description=description)


def _parameters(method: str) -> tuple:
    return tuple(_spec(parameter, method) for parameter in PARAMETERS)


def _single(value: PerInputValues) -> Any:
    """The instruct model's value of a NON_BASE parameter (there is exactly one).

    mergekit binds every NON_BASE parameter per input, on both of its entry points.
    """
    (only,) = tuple(value.values())
    return only


def head_rule(rank_ratio: Optional[float], energy: Optional[float], tensor: str) -> HeadRule:
    check_cutoffs(rank_ratio, energy, tensor)  # preflight has checked the recipe; the API has not
    if rank_ratio is not None:
        return HeadRule("rank_ratio", rank_ratio)
    if energy is not None:
        return HeadRule("energy", energy)
    return ERANK


def refine_tensor(
    name: str,
    base: torch.Tensor,
    instruct: torch.Tensor,
    lam: Union[float, Sequence[float]],
    rule: HeadRule = ERANK,
    split: Optional[layout.Split] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Timber on one checkpoint tensor, in `out_dtype` (default: the instruct tensor's dtype)
    on the instruct tensor's device.

    `split` (mergekit_timber.method.layout) says which matrices the tensor holds; without
    it, the layout rule of an unknown architecture (2-D: one matrix; stacked experts
    need their architecture). With a sequence of lambdas, one decomposition serves
    them all and a tuple of results comes back, each bit-identical to a run with
    that lambda alone.
    """
    many = not isinstance(lam, (int, float))
    lams = [float(x) for x in lam] if many else [float(lam)]
    split = split or layout.split(name, instruct.shape)
    outs = _refine(split, base, instruct, lams, rule, out_dtype)
    # lambda = 1 is the instruct tensor itself, bit for bit (a sweep may mix it with others).
    outs = tuple(instruct if x == 1 else o for x, o in zip(lams, outs))
    return outs if many else outs[0]


def _chunk_read(view: torch.Tensor) -> None:
    """The kernel's read hook: give the pages back; stop here if a signal ends the merge."""
    input_pages.release(view)
    signals.raise_if_stopping()  # --multi-gpu workers get no signal themselves


def _refine(split, base, instruct, lams, rule, out_dtype=None) -> Tuple[torch.Tensor, ...]:
    # Views throughout (Split.stacks): no copy of the inputs or outputs beside the kernel's
    # budgeted scratch, whatever the number of experts.
    dtype = out_dtype or instruct.dtype
    outs = tuple(torch.empty_like(instruct, dtype=dtype, memory_format=torch.contiguous_format) for _ in lams)
    parts = zip(split.stacks(base), split.stacks(instruct), *(split.stacks(out) for out in outs))
    for b, i, *o in parts:
        refine_stack(b, i, lams, rule, read_hook=_chunk_read, outs=o)
    return outs


# Receives, per tensor, the outputs for a method's extra lambdas (see sweep.py).
Sink = Callable[[str, Tuple[torch.Tensor, ...]], None]


class TimberMerge(GroupMergeMethod):
    """`timber` (tail scaled by lambda) or `timber_l` (tail removed).

    The registered methods are stateless. A sweep builds its own instance, under a
    name of its own, with `extra_lambdas` computed from the same decomposition and a
    `sink` that receives their outputs; it returns the configured lambda's output.
    """

    def __init__(
        self,
        name: str,
        tail_removed: bool,
        version: str,
        extra_lambdas: Sequence[float] = (),
        sink: Optional[Sink] = None,
    ):
        if extra_lambdas and (tail_removed or sink is None):
            raise ValueError("extra lambdas need `timber` and a sink for their outputs")
        self.tail_removed = tail_removed
        self.label = "timber_l" if tail_removed else "timber"  # as users name it
        self.extra_lambdas = tuple(float(x) for x in extra_lambdas)
        self.sink = sink
        pretty = "Timber-L" if tail_removed else "Timber"
        self.spec = MergeMethodSpec(
            name=name,
            parameters=_parameters("timber_l" if tail_removed else "timber"),
            contract=InputContract(
                base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2,
                min_non_base=1, max_non_base=1,
            ),
            # mergekit prints the pretty name into the model card it writes: it names
            # the plugin and its version, so a Hub visitor knows what to install
            # beside mergekit to rerun the recipe (no package-index release exists yet).
            pretty_name=f"{pretty} (mergekit plugin {DISTRIBUTION} {version}: "
            "install it from its source, `pip install .`, to rerun this recipe)",
            reference_url=PAPER_URL,
            optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_SINGLETON,
            uses_accelerator=True,
        )

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        where = f" ({group_name})" if group_name else ""
        name = self.label
        if base_id is None or base_id not in list(input_ids):
            raise TimberInputError(
                f"{name}: no base model{where}: set base_model: to the Base model "
                "and list its Instruct model under models:"
            )
        others = [i for i in input_ids if i != base_id]
        if len(others) != 1:
            raise TimberInputError(
                f"{name}: needs exactly one model besides base_model{where}, "
                f"its Instruct model; got {len(others)}"
                + (f": {', '.join(str(o) for o in others)}" if others else "")
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        # mergekit has checked the shapes (TensorGroup.validate_tensors) on both its
        # entry points before this is called.
        signals.raise_if_stopping()  # a worker thread of --multi-gpu: see signals
        name = group.metadata.name or "<unnamed tensor>"
        base, (instruct,) = group.base.tensor, [e.tensor for e in group.non_base]
        lam = 0.0 if self.tail_removed else float(_single(parameters["lambda"]))
        lams = [lam, *self.extra_lambdas]
        vocab = group.metadata.vocabulary_axis is not None
        arch = layout.architecture_of_model(group.non_base[0].id)  # cached per model
        # A block-FP8 merge reads exact float32 values: the float64 result is rounded once,
        # to the output dtype (else to float32 here, then again as mergekit saves it).
        out_dtype = quantized.output_dtype_for(group.non_base[0].id)
        try:
            outs = self._merge(name, base, instruct, lams, vocab, parameters, arch, out_dtype)
        finally:
            # Read once: their pages need not stay resident for the rest of the merge.
            input_pages.release(base, instruct)
        if self.sink is not None:
            self.sink(name, outs[1:])
        return outs[0]

    def _merge(
        self, name, base, instruct, lams, vocab, parameters, arch=layout.UNKNOWN, out_dtype=None
    ) -> Tuple[torch.Tensor, ...]:
        keep = (instruct,) * len(lams)
        if not instruct.is_floating_point():
            # mergekit-yaml copies integer buffers itself, but mergekit's direct call
            # (`method(groups)`) hands them to the method as they are.
            return keep
        rule = head_rule(_single(parameters["rank_ratio"]), _single(parameters["energy"]), name)
        split = layout.split(
            name, instruct.shape, arch, vocabulary=vocab,
            refine_embeddings=_single(parameters["refine_embeddings"]),
        )
        if not split.refined or all(x == 1 for x in lams):
            check_finite(name, "base", base)
            check_finite(name, "instruct", instruct)
            return keep
        if torch.equal(base, instruct):
            check_finite(name, "instruct", instruct)
            LOG.warning("%s: base and instruct are identical; kept the instruct tensor", name)
            return keep
        try:
            return refine_tensor(name, base, instruct, lams, rule, split, out_dtype)
        except NonFiniteDelta:
            # The kernel saw it in the Gram (cheap); now find which input holds it.
            check_finite(name, "base", base)
            check_finite(name, "instruct", instruct)
            raise TimberInputError(f"{name}: the delta holds NaN/Inf") from None


def _register() -> None:
    """Add the methods to mergekit's registry, once per process (idempotent)."""
    import mergekit_timber
    from mergekit import merge_methods

    version = mergekit_timber.__version__
    known = {m.spec.name for m in merge_methods.registered_methods()}
    for method in (
        TimberMerge("timber", tail_removed=False, version=version),
        TimberMerge("timber_l", tail_removed=True, version=version),
    ):
        if method.spec.name not in known:
            merge_methods.register(method)


# The one rule: importing this module registers, as mergekit's own registry does.
_register()
