"""Feeding pretraining: which images each step sees, where they live, and the seeds of their views.

Everything here is a function of (seed, epoch, step, rank) only, so a run resumed from any checkpoint,
or split over N processes, sees exactly the batches an uninterrupted single-process run would.
"""

from __future__ import annotations

import torch

from .data.pool import Pool
from .distributed import Dist


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Full batches only (drop_last): the loss's batch statistics need a fixed, large batch."""
    return n_images // batch_size


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only, identical on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def rank_batch(order: torch.Tensor, s: int, batch_size: int, dist: Dist) -> torch.Tensor:
    """This rank's share of the epoch's global batch ``s``: the ranks' slices are disjoint and, in rank
    order, make up exactly the single-process batch ``order[s*B:(s+1)*B]``."""
    b = batch_size // dist.world_size
    start = s * batch_size + dist.rank * b
    return order[start : start + b]


def view_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return g


class BatchSource:
    """uint8 batches on the training device.

    If the pool is in RAM and fits ``device_budget_gb``, it is copied to the device once and batches
    are gathered there (no host work per step). Otherwise each batch is gathered on the host (from RAM
    or the memory map), pinned, and copied asynchronously.
    """

    def __init__(self, pool: Pool, device: torch.device, device_budget_gb: float) -> None:
        self.pool = pool
        self.device = device
        fits = pool.images.in_ram and pool.images.nbytes <= device_budget_gb * 2**30
        self.on_device = fits or (device.type == "cpu" and pool.images.in_ram)
        self.data = pool.images.data.to(device) if self.on_device else None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.data is not None:
            return self.data[idx.to(self.device)]
        x = self.pool.images[idx]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x
