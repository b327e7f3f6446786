"""`medssl pretrain`: options -> recipe -> stages.pretrain.pretrain.

Exit codes: 0 finished (or ``--run-dir`` already finished), 2 user error, 128 + signal number when
stopped by a signal after writing a checkpoint (130 Ctrl-C, 138 SIGUSR1, 143 SIGTERM; the run is
``interrupted`` and resumable), 1 crash. Under torchrun or srun every rank runs this same command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from medssl_cli.commands import common
from medssl_cli.console import console
from medssl_cli.errors import UserError


def pretrain(
    datasets: str = typer.Option(
        None, "--datasets", help="Datasets to pool: ids or aliases (axial,coronal,sagittal, organs, crc)."
    ),
    recipe: Path = common.RECIPE,
    epochs: int = typer.Option(None, "--epochs", help="Epochs (study: 1000)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Global batch size (study: 256)."),
    lr: float = typer.Option(None, "--lr", help="Learning rate (Adam: as is; LARS: per 256 images)."),
    optimizer: str = typer.Option(None, "--optimizer", help="adam (study) or lars (official Barlow Twins)."),
    image_size: int = typer.Option(
        None, "--image-size", help="Images are resized once to this size (MIMeta: 224)."
    ),
    splits: str = typer.Option(
        None, "--splits", help="Pretraining splits: train (default) or train,val. Never test."
    ),
    channels: str = typer.Option(
        None, "--channels", help="auto, 1 or 3: convert pooled datasets explicitly."
    ),
    gray_mode: str = typer.Option(
        None, "--gray-mode", help="1-channel data: replicate (to 3 channels) or native (1-channel conv1)."
    ),
    precision: str = typer.Option(None, "--precision", help="auto (bf16 where native), bf16 or fp32."),
    compile_net: bool = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the network and views (long GPU runs: ~1.3x)."
    ),
    knn_every: int = typer.Option(None, "--knn-every", help="kNN val accuracy every K epochs (0: off)."),
    method: str | None = typer.Option(
        None, "--method", help="barlow_twins (default), vicreg or simclr; each brings its paper's defaults."
    ),
    log: str | None = typer.Option(
        None,
        "--log",
        help="Also write per-epoch scalars for TensorBoard: --log tensorboard (<run>/tensorboard/).",
    ),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Checkpoint every N epochs."),
    seed: int = common.SEED,
    device: str = common.DEVICE,
    runs_root: Path = common.RUNS_ROOT,
    name: str = common.NAME,
    resume: Path = typer.Option(None, "--resume", help="Continue an interrupted pretrain run directory."),
    run_dir: Path = typer.Option(
        None,
        "--run-dir",
        help="Fixed run directory: created if absent, resumed if it holds an unfinished "
        "run (same options). For job scripts: --run-dir runs/pretrain-$SLURM_JOB_ID.",
    ),
    requeue: bool = typer.Option(
        False,
        "--requeue/--no-requeue",
        envvar="MEDSSL_REQUEUE",
        help="After a SIGUSR1/SIGTERM stop in a SLURM job: checkpoint, then `scontrol requeue` the job.",
    ),
    data_dir: Path = common.DATA_DIR,
) -> None:
    """Barlow Twins pretraining of a ResNet-18 on the official train split(s)."""
    from medssl_cli.stages.pretrain import pretrain as run_pretrain

    overrides = {
        "data.datasets": common.csv(datasets),
        "data.splits": common.csv(splits),
        "data.image_size": image_size,
        "data.channels": channels,
        "model.gray_mode": gray_mode,
        "pretrain.epochs": epochs,
        "pretrain.batch_size": batch_size,
        "pretrain.lr": lr,
        "pretrain.optimizer": optimizer,
        "pretrain.knn_every": knn_every,
        "pretrain.log": log,
        "pretrain.method": method,
        "pretrain.checkpoint_every": checkpoint_every,
        "compute.seed": seed,
        "compute.device": device,
        "compute.precision": precision,
        "compute.compile": compile_net,
    }
    if resume is not None and run_dir is None:  # both: the stage says "not both"
        _check_resume_options(resume, recipe, overrides)
    rec = common.build_recipe(recipe, overrides)
    # A graceful stop raises Interrupted; cli.main prints it and exits with 128 + the signal number.
    run = run_pretrain(
        rec,
        data_dir=data_dir,
        runs_root=common.runs_root(runs_root),
        name=name,
        resume=resume,
        run_dir=run_dir,
        requeue=requeue,
    )
    console.print(f"Pretrain run: {run.path}", soft_wrap=True)


def _check_resume_options(resume: Path, recipe_file: Path | None, overrides: dict[str, object]) -> None:
    """``--resume RUN`` continues RUN with its own recipe.yaml. Recipe options or ``--recipe`` that would
    change it are refused (they were silently ignored before); values equal to the run's pass, as with
    an unchanged ``--run-dir``."""
    # each override's option is its key's last part: pretrain.batch_size <- --batch-size
    given = ["--" + k.rsplit(".", 1)[1].replace("_", "-") for k, v in overrides.items() if v is not None]
    if recipe_file is not None:
        given.insert(0, "--recipe")
    if not given:
        return
    from medssl_cli.recipe import diff, load_recipe, override
    from medssl_cli.runs import Run

    prior = Run(resume)
    info = prior.manifest  # no run here: the UserError saying so
    if info.get("stage") != "pretrain" or info.get("status") == "finished":
        return  # the stage's own error ("not a pretrain run", "already finished") says more
    old = prior.recipe()
    changed = diff(old, override(load_recipe(recipe_file, base=old), overrides))
    if changed:
        raise UserError(
            f"--resume continues {resume} with its own recipe; {', '.join(given)} would change "
            f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}.",
            f"Drop {', '.join(given)}, or start a new run without --resume.",
        )
