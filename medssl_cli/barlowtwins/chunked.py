"""Barlow Twins training step in chunks, with the loss on the full batch (large batches at 224 px).

Why: at 224 px a batch of 256 two-view samples keeps ~10 GB of activations for the backward pass; on a
CPU they no longer fit the caches and the step's efficiency falls from ~0.9 to 0.4-0.7 of the matmul
peak (shared/reference/cpu-probe.md), and on a small GPU they may not fit at all. The Barlow Twins loss
is not a sum over samples (its cross-correlation uses full-batch statistics), so plain gradient
accumulation over micro-batches would change the loss. Instead, two passes:

1. Under ``no_grad``, embed both views chunk by chunk (z1, z2 for the whole batch; nothing stored for
   a backward pass). On leaf copies of z compute the full-batch loss (``losses.barlow_twins_loss``)
   and its gradient dL/dz.
2. For each chunk again: forward with grad, then ``torch.autograd.backward([z1_c, z2_c], [dL/dz1_c,
   dL/dz2_c])``, accumulating parameter gradients. Then one optimizer step.

By the chain rule, dL/dtheta = sum over chunks of (dz_c/dtheta)^T dL/dz_c, so the gradient is that of the
full-batch loss of the embeddings the chunked network produces. The forward is RNG-free (no dropout;
the views are made before this function), so pass 2 reproduces pass 1's embeddings exactly. The price
is one extra forward pass (+34% FLOPs: 28.7 vs 21.4 GFLOP per sample at 224 px); the gain is
activations of ``2 x chunk`` images instead of ``2 x batch``. Measured with
``bench/pretrain_throughput.py --chunk 64`` (2-core Zen 4, bf16 + channels_last, 224 px, batch 256):
0.91-0.92x the plain step's throughput in undisturbed rounds, so it does not pay for speed on that
CPU; it is a memory lever (a large batch on a small GPU), off by default.

BatchNorm consequence (stated because it changes the model, not just the schedule):

- Batch statistics: the backbone's and the projector's BatchNorm layers normalise each chunk with that
  chunk's own mean and variance (as "ghost batch norm", Hoffer et al. 2017), not the full batch's.
  Only the loss's affine-free standardisation and the cross-correlation are full-batch. With chunk >=
  batch (one chunk) the step is exactly the plain ``train_step``.
- Running statistics (used later in eval mode: feature extraction, kNN monitor): pass 1 would update
  them a second time with the same data, so they are saved before pass 1 and restored after it. Pass 2
  updates them once per chunk and view, with the layers' own momentum, in the order v1_c, v2_c per
  chunk: ``2 x n_chunks`` updates per step instead of 2, each from ``chunk`` samples. The running
  averages therefore estimate the same per-chunk-batch statistics over fewer steps (the EMA with
  momentum 0.1 spans ~10 chunks instead of ~10 batches); no momentum correction is applied, so the
  statistics stay exactly those of a plain run with batch = chunk on the same sequence of chunks.

Chunks are as equal as possible (``torch.tensor_split`` into ceil(batch / chunk) parts): batch 250 with
chunk 64 gives 4 chunks of 62-63, so every chunk's BatchNorm sees about as many samples. Under DDP the
backward of every chunk but the last runs in ``no_sync()``, so gradients are all-reduced once per step.
The network's train/eval mode is left as the caller set it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from medssl_cli.barlowtwins.loss import barlow_twins_loss
from medssl_cli.runtime.compute import autocast

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d and SyncBatchNorm


def chunk_count(batch: int, chunk: int) -> int:
    """Number of chunks a batch is split into: ceil(batch / chunk), at least 1."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return max(1, math.ceil(batch / chunk))


def bn_state(net: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Copies of every BatchNorm layer's running buffers (running_mean, running_var, num_batches_tracked)."""
    out = []
    for m in net.modules():
        if isinstance(m, _BN_TYPES) and m.track_running_stats:
            bufs = {
                k: getattr(m, k).clone()
                for k in ("running_mean", "running_var", "num_batches_tracked")
                if getattr(m, k, None) is not None
            }
            out.append((m, bufs))
    return out


def restore_bn_state(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    """Put back what ``bn_state`` copied (in place, so optimizer/DDP references stay valid)."""
    with torch.no_grad():
        for m, bufs in saved:
            for k, v in bufs.items():
                getattr(m, k).copy_(v)


def chunked_train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
    lambd: float,
    bf16: bool,
    chunk: int,
    world_size: int = 1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Barlow Twins step in chunks of ``chunk`` samples (see the module docstring).

    Same contract as ``stages.pretrain.train_step``: returns detached (loss, on_diag, off_diag) of the
    full-batch loss; leaves the accumulated gradients in ``.grad`` after the optimizer step.
    """
    if v1.shape != v2.shape:
        raise ValueError(f"views differ in shape: {tuple(v1.shape)} vs {tuple(v2.shape)}")
    n = chunk_count(v1.shape[0], chunk)
    parts1, parts2 = torch.tensor_split(v1, n), torch.tensor_split(v2, n)
    if n > 1 and min(p.shape[0] for p in parts1) < 2 and net.training:
        raise ValueError(f"batch {v1.shape[0]} in {n} chunks leaves a chunk of 1: BatchNorm needs 2 or more")

    # Pass 1: embeddings of the whole batch, no graph kept; BN running stats untouched (restored).
    saved = bn_state(net)
    with torch.no_grad(), autocast(v1.device, bf16):
        z1 = torch.cat([net(p) for p in parts1])
        z2 = torch.cat([net(p) for p in parts2])
    restore_bn_state(saved)

    # Full-batch loss on leaf copies: dL/dz for every sample.
    z1 = z1.detach().float().requires_grad_(True)
    z2 = z2.detach().float().requires_grad_(True)
    if loss_fn is None:  # Barlow Twins; any medssl objective (methods.objective) is a full-batch loss too
        loss, on_diag, off_diag = barlow_twins_loss(z1, z2, lambd, world_size)
    else:
        loss, on_diag, off_diag = loss_fn(z1, z2, world_size)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))

    # Pass 2: recompute each chunk with grad and push its slice of dL/dz through the network.
    optimizer.zero_grad(set_to_none=True)
    no_sync = getattr(net, "no_sync", None)  # DDP: all-reduce the gradients once, on the last chunk
    start = 0
    for i, (p1, p2) in enumerate(zip(parts1, parts2, strict=True)):
        end = start + p1.shape[0]
        last = i == n - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast(v1.device, bf16):
                c1 = net(p1)
                c2 = net(p2)
            torch.autograd.backward([c1, c2], [g1[start:end].to(c1.dtype), g2[start:end].to(c2.dtype)])
        start = end
    optimizer.step()
    return loss.detach(), on_diag.detach(), off_diag.detach()
