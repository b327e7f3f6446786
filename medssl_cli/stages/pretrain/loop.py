"""The training loop of pretraining: what is trained (``Training``), one step, one epoch.

As in the official ``main.py``: per step, set the learning rate (warmup + cosine), make the two views,
embed both, Barlow Twins loss on the full batch, one optimizer step. The epoch's running sums stay on
the device (``EpochSums``, no host sync per step) and are checkpointed with it, so a run resumed in the
middle of an epoch writes the same history row as one that never stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from medssl_cli.barlowtwins.chunked import chunked_train_step
from medssl_cli.barlowtwins.feed import BatchSource, ViewFeed, steps_per_epoch
from medssl_cli.barlowtwins.loss import barlow_twins_loss
from medssl_cli.barlowtwins.optim import build_optimizer, set_lr
from medssl_cli.data.pool import Pool
from medssl_cli.errors import TrainingDiverged
from medssl_cli.methods import Loss, objective
from medssl_cli.models import PretrainNet, build_pretrain_net, count_params
from medssl_cli.recipe import PretrainRecipe, Recipe
from medssl_cli.runtime import compute, distributed
from medssl_cli.runtime.launch import Dist
from medssl_cli.runtime.preempt import StopFlag

LOG = logging.getLogger("medssl")


@dataclass
class Training:
    """Everything a step needs. ``net`` is the bare network (checkpoints and weights files hold it);
    ``model`` is what the steps run: ``net``, wrapped for DDP and/or compiled (``ready``)."""

    net: PretrainNet
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    feed: ViewFeed
    source: BatchSource
    device: torch.device
    bf16: bool
    channels_last: bool
    steps_per_epoch: int
    total: int
    warmup: int


@dataclass
class EpochSums:
    """Running sums of one epoch's loss terms (0-d device tensors) and its wall time."""

    loss: torch.Tensor
    on_diag: torch.Tensor
    off_diag: torch.Tensor
    steps: torch.Tensor
    time_s: float = 0.0
    # Names in checkpoints (unchanged since the first format, so older checkpoints resume).
    CHECKPOINT: ClassVar[dict[str, str]] = {
        "acc_loss": "loss",
        "acc_on": "on_diag",
        "acc_off": "off_diag",
        "acc_n": "steps",
    }

    @classmethod
    def zero(cls, device: torch.device) -> EpochSums:
        return cls(*(torch.zeros((), device=device) for _ in range(4)))

    def add(self, loss: torch.Tensor, on_diag: torch.Tensor, off_diag: torch.Tensor) -> None:
        self.loss += loss
        self.on_diag += on_diag
        self.off_diag += off_diag
        self.steps += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, attr) for name, attr in self.CHECKPOINT.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], time_s: float, device: torch.device) -> EpochSums:
        """From a checkpoint's tensors (KeyError naming what is missing; a malformed one is damaged)."""
        values = {}
        for name, attr in cls.CHECKPOINT.items():
            t = tensors.get(name)
            if t is None or t.numel() != 1:
                raise KeyError(name)
            values[attr] = t.to(device).reshape(())
        return cls(**values, time_s=float(time_s))

    def means(self) -> tuple[float, float, float, int]:
        """(loss, on-diagonal, off-diagonal) per step, and the number of steps (>= 1)."""
        n = max(int(self.steps.item()), 1)
        return self.loss.item() / n, self.on_diag.item() / n, self.off_diag.item() / n, n


def setup(recipe: Recipe, pool: Pool, dist: Dist) -> Training:
    """The network (same initial weights on every rank), its optimizer, and the views feed."""
    p, c = recipe.pretrain, recipe.compute
    device = distributed.rank_device(dist, compute.resolve_device(c.device))
    bf16 = compute.use_bf16(device, c.precision)
    channels_last = compute.use_channels_last(device, c.channels_last, pool.image_size)
    compute.seed_everything(c.seed)
    net = build_pretrain_net(pool.channels, recipe.model.gray_mode, recipe.model.projector)
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
    return Training(net, net, optimizer, feed, source, device, bf16, channels_last, spe, total, warmup)


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
    lambd: float,
    bf16: bool,
    world_size: int = 1,
    loss_fn: Loss | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step on two ready views; returns detached (loss, first term, second term). ``loss_fn``:
    the method's objective (``methods.objective``); default Barlow Twins with ``lambd``."""
    with compute.autocast(v1.device, bf16):
        z1 = net(v1)
        z2 = net(v2)
    if loss_fn is None:
        loss, on_diag, off_diag = barlow_twins_loss(z1.float(), z2.float(), lambd, world_size)
    else:
        loss, on_diag, off_diag = loss_fn(z1.float(), z2.float(), world_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), on_diag.detach(), off_diag.detach()


def train_one_epoch(
    t: Training,
    p: PretrainRecipe,
    dist: Dist,
    stop: StopFlag | None,
    step: int,
    sums: EpochSums,
    show: Callable[[int, float, str], None],
) -> tuple[int, float, int]:
    """Train from ``step`` to the end of its epoch, adding to ``sums``; returns (step, last lr, signal).

    A stop signal (agreed on by every rank) ends the epoch early at the same step on all ranks; the
    caller checkpoints and stops. ``show(step, samples/s, text)`` updates the progress display.
    """
    loss_fn = objective(p)
    sync_every = 1 if t.device.type == "cpu" else 25  # host syncs stall a GPU: check the loss less often
    epoch, start = divmod(step, t.steps_per_epoch)
    t0 = time.perf_counter()
    lr, signum = 0.0, 0
    for s in range(start, t.steps_per_epoch):
        lr = set_lr(t.optimizer, step, t.total, t.warmup)
        v1, v2 = t.feed(step)
        if 0 < p.chunk_size < v1.shape[0]:  # memory saver: chunked passes, one full-batch loss
            out = chunked_train_step(
                t.model, t.optimizer, v1, v2, p.lambd, t.bf16, p.chunk_size, dist.world_size, loss_fn
            )
        else:
            out = train_step(t.model, t.optimizer, v1, v2, p.lambd, t.bf16, dist.world_size, loss_fn)

        sums.add(*out)
        step += 1
        last = s == t.steps_per_epoch - 1
        if step % sync_every == 0 or last:
            value = out[0].item()
            if value != value or value in (float("inf"), float("-inf")):
                raise TrainingDiverged(
                    f"Loss became {value} at epoch {epoch + 1}, step {s + 1}.",
                    "Lower --lr or use --precision fp32; the last good checkpoint is kept.",
                )
            rate = (s + 1 - start) * p.batch_size / max(time.perf_counter() - t0, 1e-9)
            show(step, rate, f"epoch {epoch + 1}/{p.epochs} loss {value:.1f}")
        # Every rank must stop at the same step: the ranks agree on the signal (one tiny all-reduce,
        # at the loss-sync cadence so a GPU is not stalled every step).
        if not dist.enabled or step % sync_every == 0 or last:
            signum = distributed.agreed_stop(dist, stop)
            if signum:
                break
    sums.time_s += time.perf_counter() - t0
    return step, lr, signum
