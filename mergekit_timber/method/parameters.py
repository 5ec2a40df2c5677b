"""The parameters of `timber` and `timber_l`: the one definition, and the one check of each.

The adapter builds mergekit's ParameterSpecs from PARAMETERS; preflight asks those specs
(and `check_cutoffs`) before a merge starts; the sweep, analyze and the kernel's HeadRule
check their values with the same functions; the CLI help (`help_block`) and the README
table (`markdown_table`, printed by `python -m mergekit_timber.tools.params_table`) are
rendered from it. Plain Python: `mergekit-timber --help` imports neither torch nor mergekit.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from mergekit_timber.errors import TimberConfigError

METHODS = ("timber", "timber_l")


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type  # float or bool
    default: Any
    methods: Tuple[str, ...]  # the methods that accept it
    meaning: str  # markdown (backticks): the README's wording; the CLI drops the backticks
    zero_ok: bool = True  # for a fraction: whether 0 is allowed (1 always is)

    @property
    def interval(self) -> str:
        return "[0, 1]" if self.zero_ok else "(0, 1]"

    def check(self, value: Any, prefix: str = "timber: ") -> Any:
        """`value` if it is allowed (None: unset); else one line naming the parameter."""
        if value is None or self.kind is bool:
            return value
        low_ok = value >= 0 if self.zero_ok else value > 0
        if not (low_ok and value <= 1):  # also refuses NaN
            raise TimberConfigError(f"{prefix}{self.name} must lie in {self.interval}; got {value}")
        return value


LAMBDA = Parameter(
    "lambda", float, 0.2, ("timber",),  # 0.2: the authors' recommended default (arXiv 2509.23595)
    "scale of the spectral tail, `0 <= lambda <= 1`: 0 removes it (= `timber_l`), 1 returns "
    "the Instruct tensor. `timber_l` refuses a `lambda`.",
)
REFINE_EMBEDDINGS = Parameter(
    "refine_embeddings", bool, True, METHODS,
    "refine the vocabulary-sized tensors (`embed_tokens`, `lm_head`) as the authors' script "
    "does; `false` takes them from the Instruct model",
)
RANK_RATIO = Parameter(
    "rank_ratio", float, None, METHODS,
    "ablation (Truncate-R): keep `ceil(rank_ratio * rank)` components instead of `ceil(eRank)`",
    zero_ok=False,
)
ENERGY = Parameter(
    "energy", float, None, METHODS,
    "ablation (Truncate-E): keep the smallest head holding this share of `sum(S^2)`; at most "
    "one of `rank_ratio`/`energy`",
    zero_ok=False,
)
PARAMETERS = (LAMBDA, REFINE_EMBEDDINGS, RANK_RATIO, ENERGY)


def check_cutoffs(rank_ratio: Optional[float], energy: Optional[float], where: str, method: str = "timber") -> None:
    """The two ablation cutoffs exclude each other (`where`: the tensor, or the recipe's places)."""
    if rank_ratio is not None and energy is not None:
        raise TimberConfigError(
            f"{method}: {where}: rank_ratio={rank_ratio} and energy={energy} are both set; "
            "choose one cutoff rule (or neither, for Timber's eRank rule)"
        )


def _plain(text: str) -> str:
    return text.replace("`", "")


def _default(parameter: Parameter, markdown: bool) -> str:
    value = parameter.default
    text = "unset" if value is None else (str(value).lower() if isinstance(value, bool) else f"{value:g}")
    return f"`{text}`" if markdown and value is not None else text


def help_block(width: int = 78) -> str:
    """The CLI's Parameters paragraph (click prints a \\b block as it is)."""
    lines = ["\b", "Parameters (globally under parameters:, or under the Instruct's entry):"]
    pad = max(len(p.name) for p in PARAMETERS) + 4
    for p in PARAMETERS:
        only = f"{' and '.join(p.methods)} only; " if p.methods != METHODS else ""
        text = f"{only}default {_default(p, markdown=False)}: {_plain(p.meaning)}"
        lines += textwrap.wrap(text, width - 2, initial_indent=f"  {p.name:<{pad - 2}}",
                               subsequent_indent=" " * pad)
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's parameter table."""
    rows = ["| parameter | method | default | meaning |", "|---|---|---|---|"]
    for p in PARAMETERS:
        methods = "both" if p.methods == METHODS else ", ".join(f"`{m}`" for m in p.methods)
        rows.append(f"| `{p.name}` | {methods} | {_default(p, markdown=True)} | {p.meaning} |")
    return "\n".join(rows) + "\n"
