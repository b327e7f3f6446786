"""Barlow Twins pretraining (Zbontar et al., ICML 2021), the whole recipe in one place.

1. Load the pretraining pool: the official *train* split(s) of the chosen datasets; never test.
2. ResNet-18 backbone + projector (512-2048-2048-2048 by default), parameter counts printed.
3. Every step: a batch of uint8 images (on the device when it fits the budget), two asymmetric views
   made there in one batched pass (``batches.ViewFeed``, ``augment.make_pair``; on CUDA the next
   step's views are made on a side stream while this step trains), embeddings (``torch.compile``d
   with ``compute.compile``), cross-correlation loss on the full batch, optimizer step (Adam or LARS)
   with per-step warmup + cosine learning rate.
4. Per epoch (``pretrain_records.py``): ``history.jsonl`` (loss and its two terms, lr, samples/s),
   optional kNN monitor on val, a checkpoint every ``checkpoint_every`` epochs; at the end
   ``weights/backbone.safetensors``.

Randomness is derived from (seed, epoch) for the sample order and (seed, step) for the views, so a run
resumed from any checkpoint produces the same weights as one that never stopped.

Several processes (torchrun, srun; ``distributed.py``): each rank takes its slice of every global batch
(``rank_batch``), BatchNorm is synchronised and the loss's statistics are all-reduced, so N ranks with
batch B/N compute what one process with batch B computes. Only rank 0 writes run files.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from .. import checkpoint, cluster, compute, distributed
from ..augment import check_views, flip_warning
from ..batches import BatchSource, ViewFeed, steps_per_epoch
from ..chunked import chunked_train_step
from ..data.domains import describe, resolve_recipe_views
from ..data.pool import Pool, load_pool
from ..data.registry import resolve_root
from ..distributed import Dist
from ..errors import TrainingDiverged, UserError
from ..io import write_json
from ..losses import barlow_twins_loss
from ..models import build_pretrain_net, check_projector, count_params
from ..optim import build_optimizer, set_lr
from ..preempt import Interrupted, StopFlag
from ..recipe import Recipe
from ..runs import Run, check_name, create_run
from .pretrain_records import (
    check_knn_monitor,
    end_epoch,
    finish,
    monitor_features,
    save_checkpoint,
    truncate_history,
    zero_acc,
)

# Adam above this lr moves every weight by about its own size per step (the study's 0.03 destroyed the
# features on real images within a few steps; recipes/organs-bt-study.yaml has the numbers).
ADAM_LR_WARN = 1e-2
# A GPU run with this many steps left gets a hint to --compile: on the H200 at 224 px it saved ~10 ms of
# a 40 ms step for ~18 s of compiling, so it pays off after ~1,800 steps.
COMPILE_HINT_STEPS = 2000
LOG = logging.getLogger("medssl")


def check_recipe(recipe: Recipe, allow_test: bool = False) -> None:
    """Protocol checks that need no data."""
    if "test" in recipe.data.splits and not allow_test:
        raise UserError(
            "Pretraining on the test split would leak test images into the backbone.",
            "Use --splits train (default) or train,val.",
        )
    p = recipe.pretrain
    if p.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {p.epochs}.")
    if p.batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 (batch statistics), got {p.batch_size}.")
    if not (math.isfinite(p.lr) and p.lr > 0):
        raise UserError(
            f"--lr (pretrain.lr) must be a finite number > 0, got {p.lr}.",
            "E.g. --lr 0.2 (LARS, per 256 images).",
        )
    if not (math.isfinite(p.lars_eta) and p.lars_eta > 0):
        raise UserError(f"Recipe key 'pretrain.lars_eta' must be a finite number > 0, got {p.lars_eta}.")
    for key in ("lr_biases", "weight_decay", "warmup_epochs"):
        value = getattr(p, key)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"Recipe key 'pretrain.{key}' must be a finite number >= 0, got {value}.")
    if not (math.isfinite(p.lambd) and p.lambd > 0):
        raise UserError(
            f"Recipe key 'pretrain.lambd' (off-diagonal weight) must be a finite number > 0, got {p.lambd}.",
            "Barlow Twins uses 0.0051.",
        )
    if p.checkpoint_every < 1:
        raise UserError(
            f"--checkpoint-every (pretrain.checkpoint_every) must be >= 1 epoch, got {p.checkpoint_every}.",
            "E.g. --checkpoint-every 10; a stop signal writes a checkpoint anyway.",
        )
    if p.rankme_every < 0 or p.rankme_samples < 2:
        raise UserError(
            f"pretrain.rankme_every must be >= 0 (0: off) and pretrain.rankme_samples >= 2, got "
            f"{p.rankme_every} and {p.rankme_samples}."
        )
    if p.knn_every < 0:
        raise UserError(f"--knn-every (pretrain.knn_every) must be >= 0 (0: off), got {p.knn_every}.")
    if p.knn_every and recipe.evaluate.knn_k < 1:
        raise UserError(
            f"Recipe key 'evaluate.knn_k' (neighbours of the --knn-every monitor) must be >= 1, "
            f"got {recipe.evaluate.knn_k}."
        )
    if p.chunk_size < 0 or p.chunk_size == 1:
        raise UserError(
            f"pretrain.chunk_size must be 0 (off) or >= 2 (BatchNorm statistics), got {p.chunk_size}."
        )
    check_projector(recipe.model.projector)
    check_views(recipe.views)  # before the run directory exists (ViewFeed checks them again)


def optimizer_warning(recipe: Recipe) -> str | None:
    """One line when the optimiser settings are known to destroy features (Adam with lr > 1e-2)."""
    p = recipe.pretrain
    if p.optimizer == "adam" and p.lr > ADAM_LR_WARN:
        return (
            f"Adam with lr {p.lr:g} destroyed features on real images (the study's 0.03 ended at 0.30 vs a "
            f"random backbone's 0.79 at 5 labels/class); the default LARS (--optimizer lars --lr 0.2) learns."
        )
    return None


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
    lambd: float,
    bf16: bool,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Barlow Twins step on two ready views; returns detached (loss, on_diag, off_diag)."""
    with compute.autocast(v1.device, bf16):
        z1 = net(v1)
        z2 = net(v2)
    loss, on_diag, off_diag = barlow_twins_loss(z1.float(), z2.float(), lambd, world_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), on_diag.detach(), off_diag.detach()


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
        fixed.rmdir()  # empty (resolve_target checked it): create_run claims it afresh
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
    others get its path; ``distributed.py`` says what happens when one rank fails, ``cluster.py`` how a
    stop is recorded.
    """
    check_name(name)  # before any work: the directory name is made much later
    dist = dist or distributed.detect()
    views_line = None
    if resume is None:  # a resumed run keeps the views its recipe.yaml recorded
        recipe, views_line = resolve_recipe_views(recipe, data_dir)
    with distributed.session(dist, compute.resolve_device(recipe.compute.device)):
        kind, path = distributed.from_main(
            dist, lambda: cluster.resolve_target("pretrain", recipe, resume, run_dir)
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

        return cluster.guarded_run(run, dist, body, requeue)


def _train(run: Run, recipe: Recipe, pool: Pool, dist: Dist, stop: StopFlag) -> None:
    p, c = recipe.pretrain, recipe.compute
    device = distributed.rank_device(dist, compute.resolve_device(c.device))
    bf16 = compute.use_bf16(device, c.precision)
    channels_last = compute.use_channels_last(device, c.channels_last, pool.image_size)
    compute.seed_everything(c.seed)  # the same initial weights on every rank
    net: torch.nn.Module = build_pretrain_net(pool.channels, recipe.model.gray_mode, recipe.model.projector)
    n_backbone, n_proj = count_params(net.backbone), count_params(net.projector)
    LOG.info(
        f"ResNet-18 backbone {n_backbone / 1e6:.2f}M + projector {n_proj / 1e6:.2f}M = "
        f"{(n_backbone + n_proj) / 1e6:.2f}M trainable parameters"
    )
    if dist.enabled:  # BN statistics over the global batch, as one process with the whole batch
        net = distributed.sync_batchnorm(net, device)
    net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(net, p, p.batch_size)  # lr scaling by the global batch
    spe = steps_per_epoch(len(pool), p.batch_size)
    total, warmup = spe * p.epochs, round(spe * p.warmup_epochs)
    if warmup > total // 10:
        # A short run with the study's 10 warmup epochs would never leave warmup: cap at a tenth.
        LOG.info(f"Warmup capped at {total // 10} of {total} steps (recipe: {p.warmup_epochs} epochs).")
        warmup = total // 10
    source = BatchSource(pool, device, c.device_budget_gb)
    feed = ViewFeed(
        pool,
        source,
        recipe.views,
        batch_size=p.batch_size,
        seed=c.seed,
        dist=dist,
        device=device,
        channels_last=channels_last,
        total_steps=total,
        overlap=c.overlap_views,
        compile_views=c.compile,
    )
    LOG.info(
        f"Pretraining on {len(pool)} images ({', '.join(pool.dataset_ids)}; splits {','.join(pool.splits)}) "
        f"at {pool.image_size} px, {pool.channels} channel(s): {p.epochs} epochs x {spe} steps of "
        f"{p.batch_size}, {p.optimizer}, lr {p.lr}, device {compute.describe_device(device)}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}{', channels_last' if channels_last else ''}, "
        f"images {'on the device' if source.on_device else 'streamed'}"
    )
    v = recipe.views
    LOG.info(f"Views: {describe(v)}")
    flips = flip_warning(
        max(v.view1.flip_p or 0.0, v.view2.flip_p or 0.0),
        [name for t in pool.tasks for name in t.class_names],
        "views.view1.flip_p and views.view2.flip_p",
    )
    if flips and dist.is_main:
        LOG.warning(flips)
    if dist.enabled:
        LOG.info(f"Rank {dist.rank} of {dist.world_size}: {p.batch_size // dist.world_size} images per step")
    if dist.is_main:
        run.update(
            device=compute.describe_device(device),
            precision="bf16" if bf16 else "fp32",
            channels_last=channels_last,
            params={"backbone": n_backbone, "projector": n_proj},
            steps_per_epoch=spe,
            total_steps=total,
            distributed=dist.describe(),
        )

    step, acc = 0, zero_acc(device)
    ckpt_dir = run.file("checkpoint")
    latest = distributed.from_main(dist, lambda: checkpoint.latest(ckpt_dir))  # one choice for all ranks
    if latest is not None:
        meta, tensors = checkpoint.load(latest, net, optimizer, total)
        step = meta["step"]
        acc = {k: v.to(device).reshape(()) for k, v in tensors.items() if k in acc and v.numel() == 1}
        acc["time"] = checkpoint.field(latest, meta, "acc_time", (int, float))
        rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng_")}
        try:
            if set(acc) != set(zero_acc(device)):
                raise KeyError("running sums")
            compute.set_rng_state({**checkpoint.field(latest, meta, "rng", dict), **rng})
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise checkpoint.damaged(latest, f"its counters or RNG state: {type(exc).__name__}") from None
        LOG.info(f"Resumed from {latest.name} (epoch {step // spe}, step {step % spe} of {spe})")
    if dist.is_main and step == 0 and p.rankme_every:  # the random init's RankMe: the collapse baseline
        run.update(rankme_init=monitor_features(recipe, pool, net.backbone, device, bf16)["rankme"])
    if dist.is_main and run.file("history.jsonl").exists():
        # History lines written after the checkpoint (or, killed before the first one, all) are rewritten.
        truncate_history(run, step // spe)
    model = distributed.wrap_ddp(net, dist, device)  # after the load: checkpoints hold the bare net
    if c.compile:  # measured: 1.34x on an H200 at 224 px, batch 256, for ~18 s of compiling (CHANGELOG)
        LOG.info("torch.compile: the first steps compile the network and the views (tens of seconds)")
        model = torch.compile(model)
    elif dist.is_main and device.type == "cuda" and total - step >= COMPILE_HINT_STEPS:
        LOG.info(
            f"{total - step} steps to go on a GPU: --compile (compute.compile) trained 1.34x faster on an "
            "H200 at 224 px for ~18 s of compiling."
        )

    sync_every = 1 if device.type == "cpu" else 25
    from ..console import progress

    with progress("samples") as bar:
        task = bar.add_task(
            "pretrain", total=total * p.batch_size, completed=step * p.batch_size, rate=0.0, info=""
        )
        while step < total:
            epoch, in_epoch = divmod(step, spe)
            t0 = time.perf_counter()
            for s in range(in_epoch, spe):
                lr = set_lr(optimizer, step, total, warmup)
                v1, v2 = feed(step)
                if 0 < p.chunk_size < v1.shape[0]:  # memory saver: chunked passes, one full-batch loss
                    loss, on_d, off_d = chunked_train_step(
                        model, optimizer, v1, v2, p.lambd, bf16, p.chunk_size, dist.world_size
                    )
                else:
                    loss, on_d, off_d = train_step(model, optimizer, v1, v2, p.lambd, bf16, dist.world_size)
                acc["acc_loss"] += loss
                acc["acc_on"] += on_d
                acc["acc_off"] += off_d
                acc["acc_n"] += 1
                step += 1
                if step % sync_every == 0 or s == spe - 1:
                    value = loss.item()
                    if value != value or value in (float("inf"), float("-inf")):
                        raise TrainingDiverged(
                            f"Loss became {value} at epoch {epoch + 1}, step {s + 1}.",
                            "Lower --lr or use --precision fp32; the last good checkpoint is kept.",
                        )
                    elapsed = time.perf_counter() - t0
                    rate = (s + 1 - in_epoch) * p.batch_size / max(elapsed, 1e-9)
                    bar.update(
                        task,
                        completed=step * p.batch_size,
                        rate=rate,
                        info=f"epoch {epoch + 1}/{p.epochs} loss {value:.1f}",
                    )
                # Every rank must stop at the same step: the ranks agree on the signal (one tiny
                # all-reduce, at the loss-sync cadence so a GPU is not stalled every step).
                if not dist.enabled or step % sync_every == 0 or s == spe - 1:
                    signum = distributed.agree_signal(dist, (stop.signum or 0) if stop else 0)
                    if signum:
                        acc["time"] += time.perf_counter() - t0
                        if s == spe - 1:  # the epoch is complete: its history row now, as below
                            if dist.is_main:
                                end_epoch(run, recipe, pool, net, epoch, step, lr, acc, device, bf16)
                            acc = zero_acc(device)
                        if dist.is_main:
                            save_checkpoint(run, net, optimizer, step, acc)
                        raise Interrupted(str(run.path), signum, step)
            acc["time"] += time.perf_counter() - t0
            if dist.is_main:
                end_epoch(run, recipe, pool, net, epoch, step, lr, acc, device, bf16)
            acc = zero_acc(device)
            if (epoch + 1) % p.checkpoint_every == 0 and step < total and dist.is_main:
                save_checkpoint(run, net, optimizer, step, acc)
    if dist.is_main:
        finish(run, recipe, pool, net)
