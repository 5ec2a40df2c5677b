"""`mergekit-timber search RECIPE -o OUT --tasks ...`: choose lambda by Pass@k, with Ray."""

from pathlib import Path

import click

from mergekit_timber.cli.sweep import _merge_options


def _names(text):
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None


@click.command("search")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the models (OUT/models/lambda-X/), the evaluations (OUT/evals/) and the result."
              " On a cluster: storage every Ray worker reads and writes, at the same path.")
@click.option("--lambdas", default="0,0.2,0.5,0.8", show_default=True, help="Comma-separated lambdas in [0, 1].")
@click.option("--tasks", "tasks_text", required=True, metavar="TASK[,TASK]",
              help="lm-eval tasks (their problems are pooled); each needs repeats (or --repeats) for Pass@k.")
@click.option("--base-tasks", "base_tasks_text", metavar="TASK[,TASK]",
              help="The Base's variant of each task (same documents, plain prompts); default: the same tasks,"
              " without a chat template when the Base has none.")
@click.option("--no-base", is_flag=True, help="Do not evaluate the Base model.")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of local lm-eval task YAMLs.")
@click.option("--k", "ks_text", metavar="K,K,...", help="k values of the table, plot and best lambda"
              " (default: powers of two up to n).")
@click.option("--repeats", type=click.IntRange(min=1), help="Samples per problem for every task (default: each task's own).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: no top-k cut.")
@click.option("--min-p", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--greedy", is_flag=True, help="do_sample=False (Pass@k then needs no more than k=1).")
@click.option("--max-gen-toks", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=1234, show_default=True, type=int, help="lm-eval's seeds (python, numpy, torch, few-shot).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Fixed (samples depend on it); the vLLM backend batches by itself.")
@click.option("--num-fewshot", type=click.IntRange(min=0))
@click.option("--limit", type=click.IntRange(min=1), help="First N documents of each task (a quick look).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "hf", "vllm"]),
              help="auto: vLLM on CUDA when installed, else transformers (hf).")
@click.option("--eval-device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where evaluations run (the merge has mergekit's --cuda/--device); auto: cuda, one GPU per"
              " evaluation, when Ray sees GPUs.")
@click.option("--dtype", default="auto", show_default=True, help="Weights' dtype for evaluation (auto: the model's).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPU threads (and Ray CPUs) per evaluation.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Embedded Ray only: evaluations at once on CPUs (default: cores / threads).")
@click.option("--address", help="Join this Ray cluster (default: RAY_ADDRESS, else a local Ray started and stopped here).")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0), help="Bootstrap resamples.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@_merge_options
def search(merge_options, recipe, out, lambdas, tasks_text, base_tasks_text, no_base, include_path, ks_text, repeats,
           temperature, top_p, top_k, min_p, greedy, max_gen_toks, seed, batch_size, num_fewshot, limit, backend,
           eval_device, dtype, threads, workers, address, bootstrap, confidence) -> None:
    """Choose lambda by measurement: one sweep, lm-eval per model as Ray tasks, Pass@k.

    \b
    1. `sweep`: OUT/models/lambda-X/ for every lambda (one decomposition per tensor);
    2. one lm-evaluation-harness evaluation per model (every lambda, the Instruct, the
       Base) as a Ray task: one GPU each where Ray sees GPUs, a CPU worker otherwise;
       the same sampling settings for every model (given here, never a model's own
       generation_config), samples kept per model in OUT/evals/<model>/;
    3. Pass@k with bootstrap bands per model: OUT/summary.md (printed), passk.csv,
       best_lambda.csv (the best lambda at each k, its band, its paired difference to
       the Instruct) and passk_vs_lambda.png.

    Ray: a local one is started and stopped by the command; --address (or RAY_ADDRESS)
    joins a cluster (`ray start --head`, then `ray start --address HEAD:6379` on each
    node), whose workers need this package with its [search] extra and OUT on storage
    they all read and write. A re-run resumes: outputs and evaluations made with the same
    recipe and settings are kept. A failed evaluation is reported and retried once;
    Ctrl-C stops the workers and keeps every finished evaluation.
    """
    from mergekit_timber.errors import TimberConfigError
    from mergekit_timber.tools.passk import PasskError, parse_ks
    from mergekit_timber.tools.search import SearchRequest, run_search
    from mergekit_timber.tools.search_eval import Sampling
    from mergekit_timber.tools.sweep import parse_lambdas

    merge_options.apply_global_options()
    try:
        ks = tuple(parse_ks(ks_text)) if ks_text else None
    except PasskError as error:
        raise TimberConfigError(f"--k: {error}") from None
    request = SearchRequest(
        recipe=recipe, out=out, lambdas=tuple(parse_lambdas(lambdas)), tasks=_names(tasks_text) or (),
        base_tasks=_names(base_tasks_text), with_base=not no_base, include_path=include_path, ks=ks,
        sampling=Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, do_sample=not greedy,
                          max_gen_toks=max_gen_toks, seed=seed),
        repeats=repeats, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, backend=backend,
        device=eval_device, dtype=dtype, threads=threads, workers=workers, address=address,
        bootstrap=bootstrap, confidence=confidence,
    )
    if not request.tasks:
        raise TimberConfigError("--tasks: name at least one lm-eval task")

    def say(message: str) -> None:
        click.echo(message, err=True)

    try:
        result = run_search(request, merge_options, say)
    except KeyboardInterrupt:
        say(f"interrupted: the workers are stopped; finished evaluations are kept in {out / 'evals'}; "
            "run the same command again to resume")
        raise SystemExit(130) from None
    if result.summary is not None:
        click.echo(result.summary, nl=False)
        say(f"wrote {out / 'summary.md'}, passk.csv, best_lambda.csv and passk_vs_lambda.png")
    if result.failures:
        failed = "; ".join(f"{label}: {reason}" for label, reason in result.failures.items())
        raise click.ClickException(f"{len(result.failures)} evaluation(s) failed twice ({failed}); "
                                   "the table leaves them out; run the same command again to retry them")
