"""`mergekit-timber dequantize IN OUT`: a block-FP8 or MXFP4 checkpoint as an ordinary one."""

from pathlib import Path

import click

from mergekit_timber.checkpoint import DTYPES


@click.command("dequantize")
@click.argument("source", metavar="IN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("target", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype", type=click.Choice(list(DTYPES)), default="bfloat16", show_default=True,
    help="dtype of the dequantized weights (the other tensors keep theirs).",
)
def dequantize(source: Path, target: Path, dtype: str) -> None:
    """Write the quantized checkpoint IN dequantized to OUT, shard by shard.

    Block-FP8 (DeepSeek-V3, Kimi-K2, `-FP8` models): each weight is code x the scale of
    its 128x128 block. MXFP4 (gpt-oss experts): transformers' rule, experts written as
    transformers holds them. Scale tensors are dropped and config.json loses its
    quantization_config; tokenizer and other files are copied. Memory holds one tensor.
    OUT is published as a merge's output is: an earlier model there is replaced, nothing
    else in the folder is touched.
    """
    from mergekit_timber.integration.quantized import dequantize_checkpoint

    quant = dequantize_checkpoint(source, target, dtype)
    click.echo(f"{quant.format} -> {dtype}\t{target}")
