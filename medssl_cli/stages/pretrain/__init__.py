"""Barlow Twins pretraining (Zbontar et al., ICML 2021), the whole recipe in one place.

1. Load the pretraining pool: the official *train* split(s) of the chosen datasets; never test.
2. ResNet-18 backbone + projector (512-2048-2048-2048 by default), parameter counts printed.
3. Every step (``loop.train_one_epoch``): a batch of uint8 images (on the device when it fits the
   budget), two asymmetric views made there in one batched pass (``barlowtwins.feed.ViewFeed``,
   ``barlowtwins.views.make_pair``; on CUDA the next step's views are made on a side stream while
   this step trains), embeddings (``torch.compile``d with ``compute.compile``), cross-correlation loss
   on the full batch, optimizer step (Adam or LARS) with per-step warmup + cosine learning rate.
4. Per epoch (``records.py``): ``history.jsonl`` (loss and its two terms, lr, samples/s),
   optional kNN monitor on val, a checkpoint every ``checkpoint_every`` epochs; at the end
   ``weights/backbone.safetensors``.

Randomness is derived from (seed, epoch) for the sample order and (seed, step) for the views, so a run
resumed from any checkpoint produces the same weights as one that never stopped.

Several processes (torchrun, srun; ``runtime/distributed.py``): each rank takes its slice of every
global batch (``rank_batch``), BatchNorm is synchronised and the loss's statistics are all-reduced, so
N ranks with batch B/N compute what one process with batch B computes. Only rank 0 writes run files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from medssl_cli import lifecycle, methods
from medssl_cli.barlowtwins.views import flip_warning
from medssl_cli.checks import check_pretrain as check_recipe  # noqa: F401 - importable as before
from medssl_cli.data.domains import describe, resolve_recipe_views
from medssl_cli.data.pool import Pool, load_pool
from medssl_cli.data.registry import resolve_root
from medssl_cli.errors import UserError
from medssl_cli.io import write_json
from medssl_cli.models import count_params
from medssl_cli.recipe import Recipe
from medssl_cli.runs import Run, check_name, create_run
from medssl_cli.runtime import checkpoint, compute, distributed, launch
from medssl_cli.runtime.launch import Dist
from medssl_cli.runtime.preempt import Interrupted, StopFlag
from medssl_cli.stages.pretrain.checks import ADAM_LR_WARN, optimizer_warning  # noqa: F401
from medssl_cli.stages.pretrain.loop import EpochSums, Training, setup, train_one_epoch, train_step  # noqa: F401
from medssl_cli.stages.pretrain.records import (
    check_knn_monitor,
    close_tensorboard,
    end_epoch,
    finish,
    monitor_features,
    save_checkpoint,
    truncate_history,
)

# A GPU run with this many steps left gets a hint to --compile: on the H200 at 224 px it saved ~10 ms of
# a 40 ms step for ~18 s of compiling, so it pays off after ~1,800 steps.
COMPILE_HINT_STEPS = 2000
LOG = logging.getLogger("medssl")


def _load_data(recipe: Recipe, data_dir: Path | str | None, dist: Dist) -> Pool:
    d = recipe.data
    pool = load_pool(
        resolve_root(data_dir),
        d.datasets,
        d.splits,
        task=d.task,
        image_size=d.image_size,
        channels=d.channels,
        supervised=False,
        # Each rank on a node holds its own copy in RAM: share the budget, else stream from the memory map
        # (the page cache is shared between the processes).
        ram_budget_gb=d.ram_budget_gb / dist.local_world_size,
    )
    if recipe.pretrain.batch_size > len(pool):
        raise UserError(
            f"Batch size {recipe.pretrain.batch_size} is larger than the {len(pool)} pretraining images.",
            f"Use --batch-size {max(2, len(pool) // 4)} or fewer, or add datasets/splits.",
        )
    return pool


def _checked_pool(recipe: Recipe, data_dir: Path | str | None, allow_test: bool, dist: Dist) -> Pool:
    check_recipe(recipe, allow_test)
    b, n = recipe.pretrain.batch_size, dist.world_size
    if b % n:
        raise UserError(
            f"--batch-size {b} (global) does not split over {n} processes.",
            f"Use a multiple of {n}, e.g. {max(n, b - b % n)}.",
        )
    compute.configure_threads(recipe.compute.threads)
    pool = _load_data(recipe, data_dir, dist)
    check_knn_monitor(recipe, pool)
    return pool


def _open_run(
    kind: str, path: str | None, recipe: Recipe, pool: Pool, runs_root: Path | str, name: str | None
) -> str:
    """Rank 0: create the run directory (or check a resumed run's data); returns its path."""
    if kind == "resume":
        if not pool.matches(Run(Path(path or "")).manifest.get("data", {})):
            raise UserError(
                f"The data under {pool.root} differs from what run {path} was trained on.",
                "Pass the original --data-dir.",
            )
        return str(path)
    fixed = Path(path) if path else None
    if fixed is not None and fixed.is_dir():
        fixed.rmdir()  # empty (lifecycle.resolve_target checked it): create_run claims it afresh
    run = create_run(
        fixed.parent if fixed else runs_root,
        "pretrain",
        recipe,
        name=name,
        extra={"data": pool.provenance()},
        path=fixed,
    )
    write_json(run.file("data_seen.json"), pool.seen())
    return str(run.path)


def pretrain(
    recipe: Recipe,
    *,
    data_dir: Path | str | None = None,
    runs_root: Path | str = "runs",
    name: str | None = None,
    resume: Path | str | None = None,
    run_dir: Path | str | None = None,
    requeue: bool = False,
    allow_test_split: bool = False,
    dist: Dist | None = None,
) -> Run:
    """Run (or resume) Barlow Twins pretraining; returns the finished run.

    ``run_dir``: a fixed run directory, created when absent and resumed when it holds an unfinished run
    with the same recipe (so a requeued SLURM job's unchanged command continues). ``requeue``: after a
    SIGUSR1/SIGTERM stop under SLURM, ``scontrol requeue`` the job. ``dist`` (default: detected from
    torchrun/srun variables): every rank calls this; rank 0 decides and writes the run directory, the
    others get its path; ``distributed.py`` says what happens when one rank fails, ``lifecycle.py`` how a
    stop is recorded.
    """
    check_name(name)  # before any work: the directory name is made much later
    dist = dist or launch.detect()
    views_line = None
    if resume is None:  # a resumed run keeps the views its recipe.yaml recorded
        recipe, views_line = resolve_recipe_views(recipe, data_dir)
    with distributed.session(dist, compute.resolve_device(recipe.compute.device)):
        kind, path = distributed.from_main(
            dist, lambda: lifecycle.resolve_target("pretrain", recipe, resume, run_dir)
        )
        if kind != "new":
            prior = Run(Path(path or ""))
            recipe = prior.recipe()
            data_dir = data_dir or prior.manifest.get("data", {}).get("root")
            if kind == "finished":
                LOG.info(f"Run {prior.path} already finished; nothing to do.")
                return prior
        warning = optimizer_warning(recipe)
        if warning and dist.is_main:
            LOG.warning(warning)
        if recipe.compute.compile:  # before any data is read or a run directory is made
            compute.check_compile(compute.resolve_device(recipe.compute.device))
        pool = distributed.check_all(dist, lambda: _checked_pool(recipe, data_dir, allow_test_split, dist))
        path = distributed.from_main(dist, lambda: _open_run(kind, path, recipe, pool, runs_root, name))
        run = Run(Path(path))

        def body(stop: StopFlag) -> None:
            if kind == "resume" and dist.is_main:  # in the run lock: a refused second process marks nothing
                run.reopen()
            if views_line and dist.is_main:  # in the run's log, not before a bad option's one-line error
                LOG.info(views_line)
            _train(run, recipe, pool, dist, stop)

        return lifecycle.guarded_run(run, dist, body, requeue)


def _train(run: Run, recipe: Recipe, pool: Pool, dist: Dist, stop: StopFlag) -> None:
    p = recipe.pretrain
    t = setup(recipe, pool, dist)
    _announce(run, recipe, pool, dist, t)
    step, sums = _resume(run, t, dist)
    if dist.is_main and step == 0 and p.rankme_every:  # the random init's RankMe: the collapse baseline
        run.update(rankme_init=monitor_features(recipe, pool, t.net.backbone, t.device, t.bf16)["rankme"])
    if dist.is_main and run.file("history.jsonl").exists():
        # History lines written after the checkpoint (or, killed before the first one, all) are rewritten.
        truncate_history(run, step // t.steps_per_epoch)
    _ready(t, recipe, dist, step)

    from medssl_cli.console import progress

    try:
        with progress("samples") as bar:
            task = bar.add_task(
                "pretrain", total=t.total * p.batch_size, completed=step * p.batch_size, rate=0.0, info=""
            )

            def show(at: int, rate: float, text: str) -> None:
                bar.update(task, completed=at * p.batch_size, rate=rate, info=text)

            while step < t.total:
                epoch = step // t.steps_per_epoch
                step, lr, signum = train_one_epoch(t, p, dist, stop, step, sums, show)
                epoch_done = step % t.steps_per_epoch == 0
                if epoch_done:  # its history row (also when a stop came at its last step)
                    if dist.is_main:
                        end_epoch(run, recipe, pool, t.net, epoch, step, lr, sums, t.device, t.bf16)
                    sums = EpochSums.zero(t.device)
                if signum:
                    if dist.is_main:
                        save_checkpoint(run, t.net, t.optimizer, step, sums)
                    raise Interrupted(str(run.path), signum, step)
                due = epoch_done and (epoch + 1) % p.checkpoint_every == 0 and step < t.total
                if due and dist.is_main:
                    save_checkpoint(run, t.net, t.optimizer, step, sums)
        if dist.is_main:
            finish(run, recipe, pool, t.net)
    finally:  # the TensorBoard event file (--log tensorboard) is complete however the run ends
        close_tensorboard(run)


def _announce(run: Run, recipe: Recipe, pool: Pool, dist: Dist, t: Training) -> None:
    """What is about to run, in the log and in run.json."""
    p, v = recipe.pretrain, recipe.views
    LOG.info(
        f"Pretraining on {len(pool)} images ({', '.join(pool.dataset_ids)}; splits {','.join(pool.splits)}) "
        f"at {pool.image_size} px, {pool.channels} channel(s): {p.epochs} epochs x {t.steps_per_epoch} "
        f"steps of {p.batch_size}, {methods.NAMES[p.method]}, {p.optimizer}, lr {p.lr}, "
        f"device {compute.describe_device(t.device)}, "
        f"{'bf16 autocast' if t.bf16 else 'fp32'}{', channels_last' if t.channels_last else ''}, "
        f"images {'on the device' if t.source.on_device else 'streamed'}"
    )
    LOG.info(f"Views: {describe(v)}")
    flips = flip_warning(
        max(v.view1.flip_p or 0.0, v.view2.flip_p or 0.0),
        [name for task in pool.tasks for name in task.class_names],
        "views.view1.flip_p and views.view2.flip_p",
    )
    if flips and dist.is_main:
        LOG.warning(flips)
    if dist.enabled:
        LOG.info(f"Rank {dist.rank} of {dist.world_size}: {p.batch_size // dist.world_size} images per step")
    if dist.is_main:
        run.update(
            device=compute.describe_device(t.device),
            precision="bf16" if t.bf16 else "fp32",
            channels_last=t.channels_last,
            params={"backbone": count_params(t.net.backbone), "projector": count_params(t.net.projector)},
            steps_per_epoch=t.steps_per_epoch,
            total_steps=t.total,
            distributed=dist.describe(),
            method=methods.describe(p),
        )


def _resume(run: Run, t: Training, dist: Dist) -> tuple[int, EpochSums]:
    """The step and running sums to continue from: the newest intact checkpoint's, else (0, zeros).
    Network, optimizer and RNG states are restored in place; a checkpoint that does not fit is damaged."""
    latest = distributed.from_main(dist, lambda: checkpoint.latest(run.file("checkpoint")))  # one choice
    if latest is None:
        return 0, EpochSums.zero(t.device)
    meta, tensors = checkpoint.load(latest, t.net, t.optimizer, t.total)
    try:
        time_s = checkpoint.field(latest, meta, "acc_time", (int, float))
        sums = EpochSums.from_tensors(tensors, time_s, t.device)
        rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng_")}
        compute.set_rng_state({**checkpoint.field(latest, meta, "rng", dict), **rng})
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise checkpoint.damaged(latest, f"its counters or RNG state: {type(exc).__name__}") from None
    step = meta["step"]
    spe = t.steps_per_epoch
    LOG.info(f"Resumed from {latest.name} (epoch {step // spe}, step {step % spe} of {spe})")
    return step, sums


def _ready(t: Training, recipe: Recipe, dist: Dist, step: int) -> None:
    """Wrap the (restored) network for DDP and, with compute.compile, torch.compile it."""
    t.model = distributed.wrap_ddp(t.net, dist, t.device)  # after the load: checkpoints hold the bare net
    if recipe.compute.compile:  # measured: 1.34x on an H200 at 224 px, batch 256, ~18 s of compiling
        LOG.info("torch.compile: the first steps compile the network and the views (tens of seconds)")
        t.model = torch.compile(t.model)
    elif dist.is_main and t.device.type == "cuda" and t.total - step >= COMPILE_HINT_STEPS:
        LOG.info(
            f"{t.total - step} steps to go on a GPU: --compile (compute.compile) trained 1.34x faster on an "
            "H200 at 224 px for ~18 s of compiling."
        )
