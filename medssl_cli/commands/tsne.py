"""`medssl tsne`: options -> recipe overrides -> ``stages.tsne.tsne`` (torch loads lazily)."""

from __future__ import annotations

from pathlib import Path

import typer

from medssl_cli.commands import common
from medssl_cli.console import console


def tsne(
    from_run: list[str] | None = typer.Option(
        None,
        "--from",
        help="Pretrain run (Barlow Twins); repeat for several. Default: the newest finished one, "
        "unless only --init imagenet/random is given.",
    ),
    init: str | None = typer.Option(
        None, "--init", help="Comparison backbones, comma-separated: imagenet,random."
    ),
    split: str | None = typer.Option(None, "--split", help="Split to embed: test (default), val or train."),
    max_samples: int | None = typer.Option(
        None, "--max-samples", help="At most this many images, stratified by class (default 2000)."
    ),
    perplexity: float | None = typer.Option(
        None, "--perplexity", help="t-SNE perplexity (default 30; clipped for small samples)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sample draw and of t-SNE (default 0)."),
    k: int | None = typer.Option(None, "--k", help="Neighbours of the leave-one-out kNN score (default 20)."),
    datasets: str | None = typer.Option(
        None, "--datasets", help="Datasets (default: the first pretrain run's)."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Image size (default: the first pretrain run's)."
    ),
    allow_leakage: bool = typer.Option(
        False, "--allow-leakage", help="Embed images (or subjects) a backbone pretrained on (recorded)."
    ),
    recipe: Path | None = common.RECIPE,
    runs_root: Path | None = common.RUNS_ROOT,
    name: str | None = common.NAME,
    data_dir: Path | None = common.DATA_DIR,
    device: str | None = common.DEVICE,
) -> None:
    """t-SNE panels of frozen backbones on one fixed, stratified sample of a split, with silhouette and
    leave-one-out kNN scores measured in the original feature space.

    Writes a new run: plots/tsne.png, coordinates.csv, sample.json, metrics.json.
    """
    from medssl_cli.stages.tsne import tsne as run_tsne

    overrides = {
        "tsne.split": split,
        "tsne.max_samples": max_samples,
        "tsne.perplexity": perplexity,
        "tsne.seed": seed,
        "evaluate.knn_k": k,
        "data.datasets": common.csv(datasets),
        "data.image_size": image_size,
        "compute.device": device,
    }
    run = run_tsne(
        overrides,
        from_runs=from_run,
        inits=common.csv(init),
        runs_root=common.runs_root(runs_root),
        data_dir=data_dir,
        name=name,
        allow_leakage=allow_leakage,
        recipe_file=recipe,
    )
    console.print(f"t-SNE run: {run.path}\nFigure: {run.file('plots', 'tsne.png')}", soft_wrap=True)
