"""`mergekit-timber analyze`: effective ranks, Timber's head K and the realized edit, per matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from mergekit_timber.checkpoint import DTYPES


class _AnalyzeCommand(click.Command):
    """Lists the CSV columns under --help; the list is read only when help is shown."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from mergekit_timber.tools.analysis import COLUMNS

        with formatter.section("Columns of erank.csv (one row per matrix)"):
            formatter.write_dl(list(COLUMNS.items()))


@click.command("analyze", cls=_AnalyzeCommand)
@click.argument("base")
@click.argument("instruct")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for erank.csv, summary.json and the PNG plots (created if missing).")
@click.option("--lambda", "lam", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="Timber's lambda for the realized-edit columns (0 = Timber-L).")
@click.option("--out-dtype", type=click.Choice(list(DTYPES)),
              help="dtype the merged weights would be stored in (default: each instruct tensor's dtype).")
@click.option("--rank-ratio", type=click.FloatRange(0, 1, min_open=True),
              help="Ablation (Truncate-R): K = ceil(R * rank) instead of ceil(eRank).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True),
              help="Ablation (Truncate-E): K = smallest head holding E of sum(S^2).")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(("table", "json")),
              help="table: summary for people; json: summary and every row on stdout.")
@click.option("--filter", "name_filter", metavar="SUBSTRING",
              help="Only tensors whose checkpoint name contains SUBSTRING (e.g. self_attn, layers.3.).")
@click.option("--refine-embeddings/--no-refine-embeddings", default=True, show_default=True,
              help="Include vocabulary-sized tensors (embeddings, lm_head), as the merge's "
              "refine_embeddings parameter.")
def analyze(
    base: str,
    instruct: str,
    out_dir: Path,
    lam: float,
    out_dtype: Optional[str],
    rank_ratio: Optional[float],
    energy: Optional[float],
    fmt: str,
    name_filter: Optional[str],
    refine_embeddings: bool,
) -> None:
    """Spectral analysis of a BASE/INSTRUCT pair: what Timber does to each matrix.

    BASE and INSTRUCT are local model directories or Hugging Face Hub ids (safetensors
    checkpoints, sharded or not). Tensors are read one at a time. For every matrix
    Timber refines (stacked MoE experts: one row per expert and per projection) it
    computes in float64 the eRank of Base, Instruct and their delta, the head K, the
    delta's spectral energy kept by the head, and the realized edit: the fraction of
    Timber's intended change (at --lambda) that survives rounding to the output dtype.

    Writes DIR/erank.csv (one row per matrix), DIR/summary.json,
    DIR/erank_base_vs_instruct.png (paper Fig. 1), DIR/erank_ratio_hist.png (Fig. 2)
    and DIR/k_per_layer.png; prints a summary table (or JSON with --format json).
    """
    from mergekit_timber.tools import require

    require("analyze", "tools")  # before any work: the plots need matplotlib
    from mergekit_timber.tools import analysis as an
    from mergekit_timber.errors import TimberError
    from mergekit_timber.method.kernel import HeadRule

    if rank_ratio is not None and energy is not None:
        raise click.UsageError("--rank-ratio and --energy are alternatives; give at most one")
    rule = HeadRule("rank_ratio", rank_ratio) if rank_ratio is not None else (
        HeadRule("energy", energy) if energy is not None else HeadRule()
    )

    def progress(names):
        from tqdm import tqdm

        # disable=None: a bar only on a terminal (stderr), so pipes and logs stay clean.
        return tqdm(names, desc="analyze", unit="tensor", disable=None, leave=False)

    try:
        result = an.run(base, instruct, out_dir, lam=lam, rule=rule, out_dtype=out_dtype,
                        name_filter=name_filter, progress=progress,
                        refine_embeddings=refine_embeddings)
    except TimberError as exc:
        raise click.ClickException(str(exc)) from None

    if fmt == "json":
        click.echo(an.to_json(result))
    else:
        click.echo(an.format_table(result.summary))
    click.echo("wrote " + ", ".join(str(p) for p in result.files), err=True)
