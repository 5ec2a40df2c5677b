"""`mergekit-timber passk`: pass@k curves with bootstrap intervals from correctness records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from mergekit_timber.tools import passk as pk, require


@click.command("passk")
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for passk.csv and passk.png (created if missing).")
@click.option("--models", help="Comma-separated model labels to keep, in this order (default: all).")
@click.option("--k", "ks_text", metavar="K,K,...",
              help="k values (default: every k from 1 to n). ks above a model's n are left out.")
@click.option("--bootstrap", "resamples", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap resamples over problems (0: no confidence interval).")
@click.option("--confidence", default=0.95, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Confidence level of the interval.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap.")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(pk.FORMATS),
              help="Input format; auto: lm-eval if a file's first object has 'doc_id', else native records.")
@click.option("--label", help="Model label for every lm-eval samples file (default: lm-eval's model directory"
              " name, shortened to the path parts that tell the models apart).")
@click.option("--metric", help="lm-eval metric holding per-sample correctness (default: exact_match, acc or pass@1;"
              " pass@k with k >= 2 is refused).")
@click.option("--filter", "filter_name", help="lm-eval filter to read when a file has several; for Pass@k one"
              " that keeps every repeat.")
def passk(
    records: Sequence[Path],
    out_dir: Path,
    models: str | None,
    ks_text: str | None,
    resamples: int,
    confidence: float,
    seed: int,
    fmt: str,
    label: str | None,
    metric: str | None,
    filter_name: str | None,
) -> None:
    """Pass@k (unbiased estimator) per model from per-sample correctness RECORDS.

    RECORDS are JSON Lines: native records {"model", "problem", "correct": true/false},
    one per sample, or lm-evaluation-harness --log_samples files (samples_<task>_<date>.jsonl,
    read by their structure: n completions kept per problem, c correct; a file that holds no
    per-sample correctness, such as pass@8 or lm-eval's results_*.json, is refused).
    Prints a table and writes DIR/passk.csv and DIR/passk.png.
    """
    require("passk", "tools")
    try:
        wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
        ks = pk.parse_ks(ks_text) if ks_text else None
        tallies = pk.read_tallies(records, fmt=fmt, label=label, metric=metric, filter_name=filter_name,
                                  warn=lambda message: click.echo(f"warning: {message}", err=True))
        counts = pk.group_counts(tallies, wanted)
    except pk.PasskError as exc:
        raise click.ClickException(str(exc)) from None

    if ks is not None:
        for mc in counts:
            over = [k for k in ks if k > mc.n]
            if over:
                click.echo(f"note: {mc.model} has n={mc.n}; k={','.join(map(str, over))} left out", err=True)
        if all(k > mc.n for mc in counts for k in ks):
            raise click.ClickException("every requested k exceeds n for every model")

    curves = _compute(counts, ks, resamples, confidence, seed)
    click.echo(pk.format_table(curves, ks or pk.table_ks(curves), confidence))

    out_dir.mkdir(parents=True, exist_ok=True)
    pk.write_csv(curves, out_dir / "passk.csv")
    plot_curves(curves, out_dir / "passk.png", confidence)
    click.echo(f"wrote {out_dir / 'passk.csv'} and {out_dir / 'passk.png'}", err=True)


def _compute(
    counts: Sequence[pk.ModelCounts], ks: list[int] | None, resamples: int, confidence: float, seed: int
) -> list[pk.Curve]:
    from tqdm import tqdm

    # disable=None: a bar only on a terminal, so logs and CI output stay clean.
    with tqdm(total=resamples * len(counts), desc="bootstrap", unit="resample", disable=None, leave=False) as bar:
        return [pk.compute_curve(mc, ks, resamples, confidence, seed, bar.update) for mc in counts]


def plot_curves(curves: Sequence[pk.Curve], path: Path, confidence: float = 0.95) -> None:
    """pass@k against log2 k, one line per model with its interval shaded."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    banded = False
    lines = []
    for c in curves:
        (line,) = ax.plot(c.k, c.pass_at_k, marker="o" if c.k.size <= 16 else None, markersize=3)
        lines.append(line)
        if not np.isnan(c.ci_low).all():  # all NaN when no bootstrap was run
            ax.fill_between(c.k, c.ci_low, c.ci_high, color=line.get_color(), alpha=0.2, linewidth=0)
            banded = True
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4 rather than 2^0, 2^1, 2^2
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k")
    problems = curves[0].problems if curves else 0
    bands = f" (bands: {confidence:.0%} bootstrap CI)" if banded else ""
    ax.set_title(f"pass@k over {problems} problems{bands}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    # Handles and labels given explicitly: matplotlib's automatic legend skips labels that
    # start with "_", and a model name may.
    ax.legend(lines, [f"{c.model} (n={c.n})" for c in curves], loc="lower right")
    fig.savefig(path, dpi=120)
