"""Spectral analysis of a Base/Instruct pair: what Timber would do, matrix by matrix.

For every tensor that Timber refines (the selection of mergekit_timber.method.adapter: every
floating tensor with 2 or more dimensions, embeddings and lm_head included; a tensor
of more dimensions is read as [out, -1]; stacked MoE experts ``*.experts.down_proj``
[E, H, I] give one matrix per expert and fused ``*.experts.gate_up_proj`` [E, 2I, H]
one per expert and per projection) this computes, in float64:

- the effective rank of the Base matrix, the Instruct matrix and their delta, and
  their ratios to the rank min(m, n) (the paper's Figures 1 and 2);
- K, the head Timber keeps (ceil(eRank of the delta), or an ablation rule), and the
  share of the delta's spectral energy sum(S^2) the head holds;
- the relative size of the delta, ||D||_F / ||W_B||_F, and of Timber's edit,
  ||E||_F / ||W_I||_F with E = W_out - W_I computed exactly;
- the *realized edit*: the part of E that survives rounding W_out to the output dtype,
  <R, E> / <E, E> with R = round(W_out) - W_I (1 = the stored model moved exactly as
  intended, 0 = rounding undid the edit), and the share of elements whose stored value
  changes.

One row per matrix. A stacked expert tensor gives one row per expert (and per
projection), exactly like the per-expert Hub layout does, so that the per-expert
semantics of the paper (one decomposition per expert and per projection) stay
visible; the ``tensor`` column names the checkpoint tensor, ``expert`` the expert.

Models are read lazily from safetensors (sharded or not), one tensor at a time; the
float64 work is done by the kernel's Gram route in row chunks, so memory stays
around one tensor of each model plus the kernel's chunk scratch, whatever the size.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mergekit_timber.checkpoint import FLOATING_TAGS, Checkpoint, dtype_name, resolve_model
from mergekit_timber.errors import TimberInputError
# The kernel's own pieces: W_out is rebuilt by exactly the code a merge runs (same
# head/tail form, same rounding), row chunk by row chunk, so that the float64 result
# is never held whole. tests/test_analyze.py checks it against method.refine_tensor
# bit for bit.
from mergekit_timber.method.kernel import (
    ERANK,
    HeadRule,
    as_tall,
    rebuild_into,
    row_chunks,
    effective_rank,
    head_size,
    right_spectrum,
    singular_values,
)
from mergekit_timber.method import layout
from mergekit_timber.method.parameters import LAMBDA
from mergekit_timber.tools import require
from mergekit_timber.integration.finite import check_finite

# Columns of erank.csv, in order, with their meaning (shown by `mergekit-timber analyze
# --help` and included in the --format json output as "columns").
COLUMNS: Dict[str, str] = {
    "tensor": "checkpoint tensor name",
    "expert": "expert index for MoE expert matrices, empty otherwise",
    "layer": "decoder layer index, empty for embeddings/lm_head",
    "module": "module, e.g. self_attn.q_proj, mlp.down_proj, experts.gate_proj, embed_tokens",
    "rows": "m, rows of the matrix (tensors of >2 dims are read as [out, -1])",
    "cols": "n, columns of the matrix",
    "rank": "min(m, n)",
    "erank_base": "effective rank of W_B",
    "erank_instruct": "effective rank of W_I",
    "erank_delta": "effective rank of D = W_I - W_B",
    "erank_ratio_base": "erank_base / rank",
    "erank_ratio_instruct": "erank_instruct / rank",
    "erank_ratio_delta": "erank_delta / rank",
    "k": "head size K kept by Timber (ceil(eRank of D), or the --rank-ratio/--energy rule)",
    "k_ratio": "k / rank",
    "energy_kept": "share of sum(S^2) of D held by the first K components",
    "delta_rel_norm": "||D||_F / ||W_B||_F",
    "edit_rel_norm": "||E||_F / ||W_I||_F, E = W_out - W_I exact (float64)",
    "realized_edit": "<R, E> / <E, E>, R = round(W_out, out_dtype) - W_I; empty if E = 0",
    "changed_fraction": "share of elements whose stored value differs from W_I",
    "out_dtype": "dtype W_out is rounded to",
}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.(.+)$")
_EXPERT_STACK = re.compile(r"(?:^|\.)experts\.(.+)$")
_NATURAL = re.compile(r"(\d+)")


# --------------------------------------------------------------------------- names


def parse_name(name: str) -> Tuple[Optional[int], str, Optional[int]]:
    """(layer, module, expert) of a checkpoint tensor name.

    ``model.layers.3.self_attn.q_proj.weight`` -> (3, "self_attn.q_proj", None);
    ``model.layers.0.mlp.experts.5.down_proj.weight`` -> (0, "experts.down_proj", 5);
    ``model.layers.0.mlp.experts.down_proj`` (stacked) -> (0, "experts.down_proj", None);
    ``model.embed_tokens.weight`` -> (None, "embed_tokens", None).
    """
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    match = _LAYER.search(stem)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
    else:
        layer, rest = None, stem[len("model.") :] if stem.startswith("model.") else stem
    expert = _EXPERT_INDEX.search(rest)
    if expert:
        return layer, "experts." + expert.group(2), int(expert.group(1))
    stacked = _EXPERT_STACK.search(rest)
    if stacked:
        return layer, "experts." + stacked.group(1), None
    return layer, rest, None


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in _NATURAL.split(name)]


def tensor_order(name: str) -> tuple:
    """Embeddings first, then the layers in numeric order, then the rest (norm, lm_head)."""
    layer, module, _ = parse_name(name)
    group = 1 if layer is not None else (0 if "embed" in module else 2)
    return (group, -1 if layer is None else layer, natural_key(name))


def module_order(module: str) -> tuple:
    """Attention, then MLP / router / experts, then anything else."""
    group = 0 if "attn" in module else 1 if ("mlp" in module or "expert" in module) else 2
    return (group, module)


# --------------------------------------------------------------------------- checkpoints


def _architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    return ",".join(archs) if archs else str(cfg.get("model_type") or "")


def refined_tensor_names(
    base: Checkpoint,
    instruct: Checkpoint,
    name_filter: Optional[str] = None,
    refine_embeddings: bool = True,
) -> List[Tuple[str, layout.Split]]:
    """(name, split) of the tensors Timber refines (mergekit_timber.method.layout's rule),
    after checking the pair matches."""
    b_arch, i_arch = _architecture(base.config()), _architecture(instruct.config())
    if b_arch and i_arch and b_arch != i_arch:
        raise TimberInputError(
            f"base is {b_arch} but instruct is {i_arch}: analyze needs a Base/Instruct "
            "pair of one architecture"
        )
    b_names, i_names = set(base.names()), set(instruct.names())
    if b_names != i_names:
        only_b, only_i = sorted(b_names - i_names, key=natural_key), sorted(i_names - b_names, key=natural_key)
        parts = []
        if only_b:
            parts.append(f"{len(only_b)} only in base (e.g. {only_b[0]})")
        if only_i:
            parts.append(f"{len(only_i)} only in instruct (e.g. {only_i[0]})")
        raise TimberInputError("base and instruct hold different tensors: " + "; ".join(parts))
    config = instruct.config()
    arch = layout.architecture_of(config)
    shapes = {name: instruct.info(name)[0] for name in i_names}
    vocabulary = layout.vocabulary_names(instruct.directory, config, sorted(i_names), shapes)
    selected = []
    for name in sorted(i_names, key=tensor_order):
        if name_filter and name_filter not in name:
            continue
        (b_shape, _), (i_shape, i_dtype) = base.info(name), instruct.info(name)
        if b_shape != i_shape:
            raise TimberInputError(f"{name}: base shape {b_shape} != instruct shape {i_shape}")
        split = layout.split(
            name, i_shape, arch, floating=i_dtype in FLOATING_TAGS,
            vocabulary=name in vocabulary, refine_embeddings=refine_embeddings,
        )
        if split.refined:
            selected.append((name, split))
    if not selected:
        what = f" matching --filter {name_filter!r}" if name_filter else ""
        raise TimberInputError(f"no tensor that Timber refines (floating, 2 or more dims){what}")
    return selected


# --------------------------------------------------------------------------- matrices


@dataclass
class Stack:
    """Matrices of one checkpoint tensor as [B, m, n] stacks, with a label per matrix."""

    base: torch.Tensor
    instruct: torch.Tensor
    labels: List[Tuple[Optional[int], str, Optional[int]]]  # (layer, module, expert)


def split_matrices(
    name: str, base: torch.Tensor, instruct: torch.Tensor, split: Optional[layout.Split] = None
) -> Stack:
    """The matrices Timber decomposes in one tensor, as the merge splits them."""
    layer, module, expert = parse_name(name)
    split = split or layout.split(name, instruct.shape)
    stacks = split.matrices(base), split.matrices(instruct)
    if split.experts is None:
        return Stack(*stacks, [(layer, module, expert)])
    stem = module.rsplit(".", 1)[0] if "." in module else "experts"
    labels = [
        (layer, f"{stem}.{proj}" if proj else module, e)
        for proj, e in split.labels(instruct.shape)  # parts outer, experts inner
    ]
    return Stack(*stacks, labels)


def _nan_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def stack_stats(
    base: torch.Tensor,
    instruct: torch.Tensor,
    lam: float,
    rule: HeadRule = ERANK,
    out_dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """Per-matrix statistics of a [B, m, n] stack (each a float64/int64 tensor of size B).

    W_out is rebuilt by the kernel itself (same decomposition, same head/tail form as
    a merge), in float64 and in row chunks, so the exact and the rounded output are
    never held whole.
    """
    out_dtype = out_dtype or instruct.dtype
    b_tall, i_tall = as_tall(base), as_tall(instruct)
    rank = b_tall.shape[-1]
    s_base, s_inst = singular_values(b_tall), singular_values(i_tall)
    s_delta, v = right_spectrum(b_tall, i_tall)
    k = head_size(s_delta, rule)

    batch = b_tall.shape[0]
    zeros = lambda: torch.zeros(batch, dtype=torch.float64)  # noqa: E731
    bb, ii, dd, ee, re_, changed = zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
    dims = (-2, -1)
    for rows in row_chunks(b_tall.shape):
        b64, i64 = b_tall[..., rows, :].to(torch.float64), i_tall[..., rows, :].to(torch.float64)
        exact = torch.empty(b64.shape, dtype=torch.float64)
        rebuild_into(b_tall[..., rows, :], i_tall[..., rows, :], v, k, [float(lam)], [exact])
        stored = exact.to(out_dtype).to(torch.float64).sub_(i64)  # R = round(W_out) - W_I
        edit = exact.sub_(i64)  # E = W_out - W_I, exact up to float64 rounding
        bb += b64.square().sum(dims)
        ii += i64.square().sum(dims)
        dd += (i64 - b64).square_().sum(dims)
        ee += edit.square().sum(dims)
        re_ += (stored * edit).sum(dims)
        changed += (stored != 0).sum(dims).to(torch.float64)
        del b64, i64, exact, edit, stored

    energy = s_delta.square()
    head = (torch.arange(rank).unsqueeze(0) < k.unsqueeze(-1)).to(torch.float64)
    e_base, e_inst, e_delta = effective_rank(s_base), effective_rank(s_inst), effective_rank(s_delta)
    return {
        "rows": torch.full((batch,), base.shape[-2], dtype=torch.int64),
        "cols": torch.full((batch,), base.shape[-1], dtype=torch.int64),
        "rank": torch.full((batch,), rank, dtype=torch.int64),
        "erank_base": e_base,
        "erank_instruct": e_inst,
        "erank_delta": e_delta,
        "erank_ratio_base": e_base / rank,
        "erank_ratio_instruct": e_inst / rank,
        "erank_ratio_delta": e_delta / rank,
        "k": k,
        "k_ratio": k.to(torch.float64) / rank,
        "energy_kept": _nan_div((energy * head).sum(-1), energy.sum(-1)),
        "delta_rel_norm": _nan_div(dd.sqrt(), bb.sqrt()),
        "edit_rel_norm": _nan_div(ee.sqrt(), ii.sqrt()),
        "realized_edit": _nan_div(re_, ee),
        "changed_fraction": changed / (b_tall.shape[-2] * b_tall.shape[-1]),
    }


# --------------------------------------------------------------------------- the run


@dataclass
class Analysis:
    rows: List[Dict[str, Any]]
    summary: Dict[str, Any]
    files: List[Path] = field(default_factory=list)


def rule_label(rule: HeadRule) -> str:
    if rule.kind == "erank":
        return "K = ceil(eRank)"
    if rule.kind == "rank_ratio":
        return f"K = ceil({rule.value:g} * rank)"
    return f"K = smallest head holding {rule.value:g} of sum(S^2)"


def analyze_pair(
    base: Checkpoint,
    instruct: Checkpoint,
    lam: float = 0.2,
    rule: HeadRule = ERANK,
    out_dtype: Optional[torch.dtype] = None,
    name_filter: Optional[str] = None,
    progress: Optional[Callable[[Iterable[str]], Iterable[str]]] = None,
    refine_embeddings: bool = True,
) -> Analysis:
    """Rows (one per matrix) and summary for a pair; `progress` wraps the tensor loop."""
    LAMBDA.check(lam, prefix="")
    selected = dict(refined_tensor_names(base, instruct, name_filter, refine_embeddings))
    names = list(selected)
    rows: List[Dict[str, Any]] = []
    for name in progress(names) if progress else names:
        b, i = base.tensor(name), instruct.tensor(name)
        check_finite(name, "base", b)
        check_finite(name, "instruct", i)
        stack = split_matrices(name, b, i, selected[name])
        target = out_dtype or i.dtype
        stats = stack_stats(stack.base, stack.instruct, lam, rule, target)
        for j, (layer, module, expert) in enumerate(stack.labels):
            row: Dict[str, Any] = {"tensor": name, "expert": expert, "layer": layer, "module": module}
            for key, values in stats.items():
                value = values[j].item()
                row[key] = value if isinstance(value, int) else float(value)
            row["out_dtype"] = dtype_name(target)
            rows.append(row)
        del b, i, stack, stats
    return Analysis(rows=rows, summary=summarize(rows, lam, rule, len(names)))


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def matrix_label(row: Dict[str, Any]) -> str:
    """The tensor name, plus expert (and projection) for a matrix of a stacked tensor."""
    if row.get("expert") is None or parse_name(row["tensor"])[2] is not None:
        return row["tensor"]
    proj = row["module"].split(".")[-1]
    stored = row["tensor"].removesuffix(".weight").rsplit(".", 1)[-1]
    fused = stored != proj  # one of several projections fused in the tensor (gate_up_proj)
    return f"{row['tensor']} [expert {row['expert']}{', ' + proj if fused else ''}]"


def summarize(rows: List[Dict[str, Any]], lam: float, rule: HeadRule, tensors: int) -> Dict[str, Any]:
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    finite = [r for r in rows if not math.isnan(r["realized_edit"])]
    lowest = sorted(finite, key=lambda r: r["realized_edit"])[:5]
    dtypes = sorted({r["out_dtype"] for r in rows})
    return {
        "lambda": lam,
        "head_rule": rule.kind if rule.value is None else f"{rule.kind}={rule.value:g}",
        "head_rule_text": rule_label(rule),
        "out_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "tensors": tensors,
        "matrices": len(rows),
        "median_erank_ratio_base": _median(col("erank_ratio_base")),
        "median_erank_ratio_instruct": _median(col("erank_ratio_instruct")),
        "median_erank_ratio_delta": _median(col("erank_ratio_delta")),
        "median_k_ratio": _median(col("k_ratio")),
        "mean_energy_kept": _mean(col("energy_kept")),
        "median_realized_edit": _median(col("realized_edit")),
        "mean_changed_fraction": _mean(col("changed_fraction")),
        "lowest_realized_edit": [
            {
                "tensor": r["tensor"],
                "expert": r["expert"],
                "module": r["module"],
                "layer": r["layer"],
                "realized_edit": r["realized_edit"],
                "changed_fraction": r["changed_fraction"],
                "label": matrix_label(r),
            }
            for r in lowest
        ],
    }


# --------------------------------------------------------------------------- outputs


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in COLUMNS])
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(analysis: Analysis, include_rows: bool = True) -> str:
    doc: Dict[str, Any] = {"summary": analysis.summary, "columns": COLUMNS}
    if include_rows:
        doc["rows"] = analysis.rows
    return json.dumps(_json_safe(doc), allow_nan=False)


def format_table(summary: Dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"

    def num(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    lines = [
        f"Timber analysis: lambda={summary['lambda']:g}, {summary['head_rule_text']}, "
        f"output dtype {summary['out_dtype'] if isinstance(summary['out_dtype'], str) else '/'.join(summary['out_dtype'])}",
        f"  matrices                    {summary['matrices']} (from {summary['tensors']} tensors)",
        f"  median eRank/rank Base      {num(summary['median_erank_ratio_base'])}",
        f"  median eRank/rank Instruct  {num(summary['median_erank_ratio_instruct'])}",
        f"  median eRank/rank delta     {num(summary['median_erank_ratio_delta'])}",
        f"  median K/rank               {num(summary['median_k_ratio'])}",
        f"  mean energy kept by head    {pct(summary['mean_energy_kept'])}",
        f"  median realized edit        {num(summary['median_realized_edit'])}",
        f"  mean elements changed       {pct(summary['mean_changed_fraction'])}",
    ]
    lowest = summary["lowest_realized_edit"]
    if lowest:
        lines.append(f"Lowest realized edit ({len(lowest)}):")
        lines.append("  realized  changed  matrix")
        for r in lowest:
            lines.append(f"  {r['realized_edit']:8.4f}  {pct(r['changed_fraction']):>7}  {r['label']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _per_layer(rows: Sequence[Dict[str, Any]], key: str) -> Dict[str, Dict[int, List[float]]]:
    """module -> layer -> values (several for experts), modules in module_order."""
    out: Dict[str, Dict[int, List[float]]] = {}
    for r in rows:
        if r["layer"] is None or r[key] is None or (isinstance(r[key], float) and math.isnan(r[key])):
            continue
        out.setdefault(r["module"], {}).setdefault(r["layer"], []).append(float(r[key]))
    return {m: out[m] for m in sorted(out, key=module_order)}


def _integer_layers(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _line(ax, series: Dict[int, List[float]], label: str, color=None, marker="o"):
    layers = sorted(series)
    mean = [statistics.fmean(series[l]) for l in layers]
    (line,) = ax.plot(layers, mean, marker=marker, markersize=3, label=label, color=color)
    if any(len(series[l]) > 1 for l in layers):  # experts: mean line, min-max band
        ax.fill_between(
            layers, [min(series[l]) for l in layers], [max(series[l]) for l in layers],
            color=line.get_color(), alpha=0.2, linewidth=0,
        )
    return line


def _no_data(fig, text: str) -> None:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_erank_per_layer(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Figure 1: eRank of Base and Instruct per layer, one panel per module."""
    base, inst = _per_layer(rows, "erank_base"), _per_layer(rows, "erank_instruct")
    modules = list(base)
    cols = min(4, max(1, len(modules)))
    nrows = max(1, math.ceil(len(modules) / cols))
    fig = _figure((3.4 * cols, 2.7 * nrows + 0.4))
    if not modules:
        _no_data(fig, "no per-layer matrices")
    else:
        axes = fig.subplots(nrows, cols, squeeze=False).ravel()
        experts = False
        for ax, module in zip(axes, modules):
            _line(ax, base[module], "Base", "tab:blue")
            _line(ax, inst.get(module, {}), "Instruct", "tab:orange", marker="s")
            experts |= any(len(v) > 1 for v in base[module].values())
            ranks = {r["rank"] for r in rows if r["module"] == module and r["layer"] is not None}
            if len(ranks) == 1:
                ax.axhline(next(iter(ranks)), color="grey", linestyle=":", linewidth=1)
            ax.set_title(module, fontsize=9)
            _integer_layers(ax)
            ax.set_xlabel("layer", fontsize=8)
            ax.set_ylabel("eRank", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        for ax in axes[len(modules) :]:
            ax.set_axis_off()
        axes[0].legend(fontsize=7)
        note = " (experts: mean, band min-max)" if experts else ""
        fig.suptitle(f"eRank per layer, Base vs Instruct (dotted: rank){note}", fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def plot_ratio_hist(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Figure 2: distribution of eRank/rank over matrices, Base and Instruct, medians marked."""
    fig = _figure((6.5, 4))
    base = [r["erank_ratio_base"] for r in rows]
    inst = [r["erank_ratio_instruct"] for r in rows]
    if not rows:
        _no_data(fig, "no matrices")
    else:
        import numpy as np

        ax = fig.add_subplot()
        low = min(min(base), min(inst))
        bins = np.linspace(max(0.0, low - 0.02), 1.0, 41)
        styles = (
            (base, "Base", "tab:blue", dict(histtype="stepfilled", alpha=0.45), "-"),
            (inst, "Instruct", "tab:orange", dict(histtype="step", linewidth=2), "--"),
        )
        for values, label, color, style, median_style in styles:
            med = statistics.median(values)
            ax.hist(values, bins=bins, color=color, label=f"{label} (median {med:.3f})", **style)
            ax.axvline(med, color=color, linestyle=median_style, linewidth=1.5)
        ax.axvline(0.85, color="grey", linestyle=":", linewidth=1, label="paper medians ~0.85")
        ax.set_xlabel("eRank / rank")
        ax.set_ylabel("matrices")
        ax.set_title(f"eRank/rank over {len(rows)} matrices")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def plot_k_per_layer(rows: Sequence[Dict[str, Any]], path: Path, rule: HeadRule = ERANK) -> Path:
    """K per layer, one line per module (experts: mean with a min-max band)."""
    ks = _per_layer(rows, "k")
    fig = _figure((7.5, 4.5))
    if not ks:
        _no_data(fig, "no per-layer matrices")
    else:
        ax = fig.add_subplot()
        experts = False
        for module, series in ks.items():
            _line(ax, series, module)
            experts |= any(len(v) > 1 for v in series.values())
        ax.set_xlabel("layer")
        ax.set_ylabel("K (head kept)")
        _integer_layers(ax)
        note = "; experts: mean, band min-max" if experts else ""
        ax.set_title(f"K per layer ({rule_label(rule)}{note})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- entry point

CSV_NAME = "erank.csv"
PLOTS = ("erank_base_vs_instruct.png", "erank_ratio_hist.png", "k_per_layer.png")


def run(
    base_ref: str,
    instruct_ref: str,
    out_dir: Path,
    lam: float = 0.2,
    rule: HeadRule = ERANK,
    out_dtype: Optional[str] = None,
    name_filter: Optional[str] = None,
    progress: Optional[Callable[[Iterable[str]], Iterable[str]]] = None,
    refine_embeddings: bool = True,
) -> Analysis:
    """Analyze a pair and write erank.csv, summary.json and the three plots to `out_dir`."""
    require("analyze", "tools")  # the plots: before reading a tensor
    dtype = getattr(torch, out_dtype) if out_dtype else None  # a name of checkpoint.DTYPES
    base = Checkpoint(resolve_model(base_ref, "base"), "base")
    instruct = Checkpoint(resolve_model(instruct_ref, "instruct"), "instruct")
    try:
        analysis = analyze_pair(base, instruct, lam, rule, dtype, name_filter, progress, refine_embeddings)
    finally:
        base.close()
        instruct.close()
    analysis.summary["base"], analysis.summary["instruct"] = str(base_ref), str(instruct_ref)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis.files = [
        write_csv(analysis.rows, out_dir / CSV_NAME),
        plot_erank_per_layer(analysis.rows, out_dir / PLOTS[0]),
        plot_ratio_hist(analysis.rows, out_dir / PLOTS[1]),
        plot_k_per_layer(analysis.rows, out_dir / PLOTS[2], rule),
    ]
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(_json_safe(analysis.summary), indent=1) + "\n")
    analysis.files.append(summary_path)
    return analysis
