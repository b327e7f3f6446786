"""`medssl evaluate`: options -> recipe overrides -> ``stages.evaluate.evaluate`` (torch loads lazily)."""

from __future__ import annotations

from pathlib import Path

import typer

from medssl_cli.commands.common import csv
from medssl_cli.console import console


def evaluate(
    from_run: str | None = typer.Option(
        None,
        "--from",
        help="Finetune grid or cell (default: the newest finished grid); a pretrain run with --probe knn.",
    ),
    split: str | None = typer.Option(None, "--split", help="test (default) or val."),
    probe: str = typer.Option(
        "head", "--probe", help="head: the finetuned cells; knn: k-NN probe of a pretrain run."
    ),
    allow_leakage: bool = typer.Option(
        False, "--allow-leakage", help="Evaluate even if pretraining saw these images/subjects (recorded)."
    ),
    ci: str | None = typer.Option(None, "--ci", help="Accuracy confidence interval: wilson or bootstrap."),
    k: int | None = typer.Option(None, "--k", help="Neighbours for --probe knn (default 20)."),
    datasets: str | None = typer.Option(
        None, "--datasets", help="--probe knn: datasets (default: the run's)."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="--probe knn: image size (default: the run's)."
    ),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with evaluate/compute settings."),
    runs_root: Path | None = typer.Option(
        None, "--runs-root", help="Runs root (default: $MEDSSL_RUNS or runs)."
    ),
    name: str | None = typer.Option(None, "--name", help="--probe knn: name part of the new evaluate run."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="MIMeta root (default: the run's)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Test metrics of finetune cells, written into each cell and the grid; or a kNN probe.

    Metrics: accuracy with a 95% CI, balanced accuracy, macro-F1, macro AUROC, per-class recall, confusion.

    Refuses images (or subjects) that the pretrained backbone saw, unless --allow-leakage (recorded).

    --probe knn --from PRETRAIN_RUN writes a new run evaluate-knn-<stamp> (never into the pretrain run).
    """
    from medssl_cli.runs import default_runs_root
    from medssl_cli.stages.evaluate import evaluate as run_evaluate

    overrides = {
        "evaluate.split": split,
        "evaluate.allow_leakage": True if allow_leakage else None,
        "evaluate.ci": ci,
        "evaluate.knn_k": k,
        "data.datasets": csv(datasets),
        "data.image_size": image_size,
        "compute.device": device,
    }
    if probe == "head" and (datasets is not None or image_size is not None):
        from medssl_cli.errors import UserError

        raise UserError(
            "--datasets/--image-size apply to --probe knn only.", "A grid is evaluated on its own data."
        )
    result = run_evaluate(
        overrides,
        from_run=from_run,
        runs_root=runs_root or default_runs_root(),
        probe=probe,
        data_dir=data_dir,
        name=name,
        recipe_file=recipe,
    )
    if "run" in result:
        console.print(f"kNN probe run: {result['run']}", soft_wrap=True)
