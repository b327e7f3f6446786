"""`medssl finetune`: options -> recipe overrides -> ``stages.finetune.finetune`` (torch loads lazily)."""

from __future__ import annotations

from pathlib import Path

import typer

from medssl_cli.commands.common import csv
from medssl_cli.console import console
from medssl_cli.errors import UserError


def parse_seeds(text: str | None) -> list[int] | None:
    """'0,1,2' -> [0, 1, 2]; anything that is not a list of non-negative integers is a UserError."""
    items = csv(text)
    if items is None:
        return None
    out = []
    for t in items:
        try:
            value = int(t)
        except ValueError:
            raise UserError(
                f"--seeds '{text}' is malformed: '{t}' is not an integer.", "Use e.g. --seeds 0,1,2."
            ) from None
        if value < 0:
            raise UserError(f"--seeds '{text}': seeds must be >= 0, got {value}.", "Use e.g. --seeds 0,1,2.")
        out.append(value)
    return out


def parse_val_budget(text: str) -> str | int:
    from medssl_cli.data.fractions import parse_val_budget as parse

    return parse(text)


def parse_fractions(text: str | None) -> list[float] | None:
    """'0.005,1%,1' -> [0.005, 0.01, 1.0] (each through ``data.fractions.parse_fraction``)."""
    from medssl_cli.data.fractions import parse_fraction

    items = csv(text)
    return None if items is None else [parse_fraction(t) for t in items]


def finetune(
    from_run: str | None = typer.Option(
        None, "--from", help="Pretrain run (default: the newest finished one)."
    ),
    init: str | None = typer.Option(
        None, "--init", help="Initialisations, comma-separated: ssl,imagenet,random."
    ),
    mode: str | None = typer.Option(
        None, "--mode", help="linear (frozen backbone), full (end to end), knn: e.g. linear,full,knn."
    ),
    val_budget: str | None = typer.Option(
        None,
        "--val-budget",
        help="Val images for choosing C / early stopping: matched (default: as many as the labelled "
        "train images), full (optimistic), or a number.",
    ),
    fraction: str | None = typer.Option(
        None, "--fraction", help="Label fractions, e.g. 0.005,0.01,0.1,1 or 0.5%."
    ),
    seeds: str | None = typer.Option(None, "--seeds", help="Seeds (subset draw + training), e.g. 0,1,2."),
    head: str | None = typer.Option(None, "--head", help="Linear head: lbfgs (logistic regression) or sgd."),
    epochs: int | None = typer.Option(None, "--epochs", help="Max epochs (full mode, sgd head)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Mini-batch size (full mode, sgd head)."
    ),
    lr_head: float | None = typer.Option(None, "--lr-head", help="Head learning rate (full mode, sgd head)."),
    lr_backbone: float | None = typer.Option(
        None, "--lr-backbone", help="Backbone learning rate (full mode)."
    ),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML (overrides the pretrain run's)."),
    runs_root: Path | None = typer.Option(
        None, "--runs-root", help="Runs root (default: $MEDSSL_RUNS or runs)."
    ),
    name: str | None = typer.Option(None, "--name", help="Name part of the grid directory."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="MIMeta root (default: the pretrain run's)."
    ),
    datasets: str | None = typer.Option(None, "--datasets", help="Datasets (default: the pretrain run's)."),
    task: str | None = typer.Option(None, "--task", help="Task name (default: the first multiclass task)."),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Image size (default: the pretrain run's)."
    ),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    seed: int | None = typer.Option(None, "--seed", help="compute.seed (random-init backbone, defaults)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue a grid: runs only unfinished cells."),
    grid_dir: Path | None = typer.Option(
        None, "--grid-dir", help="Fixed grid directory (created once, shared)."
    ),
    cell: int | None = typer.Option(
        None, "--cell", help="Run only cell K (0-based; e.g. $SLURM_ARRAY_TASK_ID)."
    ),
) -> None:
    """Fine-tune on label fractions: inits x modes x fractions x seeds, one sub-run per cell.

    Cell order: inits x modes x fractions x seeds, seeds fastest (--cell K counts from 0).

    With --resume GRID (or --grid-dir DIR) finished cells are skipped, so an interrupted grid completes.

    Only train (fitting) and val (selection) are loaded; the test split is for `medssl evaluate`.
    """
    from medssl_cli.runs import default_runs_root
    from medssl_cli.stages.finetune import finetune as run_finetune

    # Dotted recipe keys; None = not given. The stage applies them with recipe.override, after the
    # pretrain run's recipe and --recipe (precedence: defaults < parent < file < CLI).
    overrides = {
        "finetune.inits": csv(init),
        "finetune.modes": csv(mode),
        "finetune.fractions": parse_fractions(fraction),
        "finetune.seeds": parse_seeds(seeds),
        "finetune.head": head,
        "finetune.epochs": epochs,
        "finetune.batch_size": batch_size,
        "finetune.lr_head": lr_head,
        "finetune.lr_backbone": lr_backbone,
        "finetune.val_budget": None if val_budget is None else parse_val_budget(val_budget),
        "data.datasets": csv(datasets),
        "data.task": task,
        "data.image_size": image_size,
        "compute.device": device,
        "compute.seed": seed,
    }
    if resume is not None and grid_dir is not None:
        raise UserError("Pass either --resume GRID or --grid-dir DIR, not both.")
    grid = run_finetune(
        overrides,
        recipe_file=recipe,
        from_run=from_run,
        runs_root=runs_root or default_runs_root(),
        name=name,
        data_dir=data_dir,
        resume=resume,
        grid_dir=grid_dir,
        cell=cell,
    )
    console.print(f"Grid: {grid.path} ({grid.manifest.get('status')})", soft_wrap=True)
