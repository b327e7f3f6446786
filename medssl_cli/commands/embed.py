"""`medssl embed`: options -> recipe overrides -> ``stages.embed.embed`` (torch loads lazily)."""

from __future__ import annotations

from pathlib import Path

import typer

from medssl_cli.commands import common
from medssl_cli.console import console


def embed(
    from_run: str | None = typer.Option(
        None, "--from", help="Pretrain run (default: the newest finished one; --init ssl only)."
    ),
    init: str = typer.Option("ssl", "--init", help="Backbone: ssl (a pretrain run), imagenet or random."),
    splits: str | None = typer.Option(
        None, "--splits", help="Splits, comma-separated (default train,val,test)."
    ),
    datasets: str | None = typer.Option(None, "--datasets", help="Datasets (default: the pretrain run's)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Image size (default: the run's)."),
    recipe: Path | None = common.RECIPE,
    runs_root: Path | None = common.RUNS_ROOT,
    name: str | None = common.NAME,
    data_dir: Path | None = common.DATA_DIR,
    device: str | None = common.DEVICE,
) -> None:
    """Frozen-backbone features (and labels, image rows, subject items) of whole splits, in
    <run>/features.npz: numpy.load(path) reads it."""
    from medssl_cli.stages.embed import embed as run_embed

    overrides = {
        "data.datasets": common.csv(datasets),
        "data.image_size": image_size,
        "compute.device": device,
    }
    run = run_embed(
        overrides,
        from_run=from_run,
        init=init,
        splits=common.csv(splits),
        runs_root=common.runs_root(runs_root),
        data_dir=data_dir,
        name=name,
        recipe_file=recipe,
    )
    console.print(f"Features: {run.file('features.npz')}", soft_wrap=True)
