"""Barlow Twins loss (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
ICML 2021).

For embeddings z1, z2 of two views of the same N images (shape N x D):

    c = BN(z1)^T BN(z2) / N          (D x D cross-correlation; BN = affine-free batch standardisation)
    L = sum_i (1 - c_ii)^2  +  lambda * sum_{i != j} c_ij^2

The first (invariance) term pulls each feature's correlation across views to 1, the second
(redundancy reduction) term decorrelates different features. lambda = 0.0051 as in the paper.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from medssl_cli.runtime.distributed import all_reduce_sum

BN_EPS = 1e-5  # as nn.BatchNorm1d


def _all_reduce_sum(x: Tensor, world_size: int) -> Tensor:
    """Sum over ranks, differentiable (the backward pass sums the ranks' gradients as well)."""
    return x if world_size == 1 else all_reduce_sum(x)


def batch_standardize(z: Tensor, world_size: int = 1, eps: float = BN_EPS) -> Tensor:
    """(z - mean) / sqrt(var + eps) per feature over the batch: BatchNorm1d(affine=False) in training mode.

    The variance is the biased one (divide by N), as BatchNorm normalises with. With ``world_size`` > 1
    the mean and variance are over the global batch (all ranks), as the official code's SyncBatchNorm:
    two differentiable all-reduces (sum, then sum of squared deviations), so N ranks of batch B
    standardise exactly as one process with batch N*B.
    """
    n = z.shape[0] * world_size
    mean = _all_reduce_sum(z.sum(dim=0), world_size) / n
    centred = z - mean
    var = _all_reduce_sum(centred.pow(2).sum(dim=0), world_size) / n
    return centred / torch.sqrt(var + eps)


def barlow_twins_loss(
    z1: Tensor, z2: Tensor, lambd: float = 0.0051, world_size: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Barlow Twins loss on full-batch embeddings: returns (loss, on_diag, off_diag).

    ``on_diag = sum_i (1 - c_ii)^2``, ``off_diag = sum_{i != j} c_ij^2`` (unweighted) and
    ``loss = on_diag + lambd * off_diag``, with ``c = BN(z1)^T BN(z2) / global_batch`` (see module doc).

    Always computed in at least fp32, also under autocast: the D x D correlation sums N products per
    entry and bf16 would lose the small off-diagonal terms. A caller that runs the network in chunks
    concatenates the chunks' embeddings and calls this once: the loss is not a sum over samples.

    With ``world_size`` > 1 (torch.distributed initialised, one call per rank with the rank's local
    batch) the BN statistics are global and c is summed over ranks before the terms, as the official
    code. The all-reduces are differentiable, so under DDP's gradient averaging the gradients equal
    those of one process with the whole global batch.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be N x D, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 needs torch.distributed to be initialised")
    if world_size > 1 and dist.get_world_size() != world_size:
        raise RuntimeError(f"world_size={world_size} but torch.distributed has {dist.get_world_size()} ranks")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = batch_standardize(z1.to(dtype), world_size)
        b = batch_standardize(z2.to(dtype), world_size)
        c = _all_reduce_sum(a.T @ b / (z1.shape[0] * world_size), world_size)
        diag = torch.diagonal(c)
        on_diag = (1 - diag).pow(2).sum()
        # Masking (not subtracting the diagonal's squares) keeps off_diag exact when it is small; no sync.
        eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        off_diag = c.masked_fill(eye, 0.0).pow(2).sum()
        loss = on_diag + lambd * off_diag
    return loss, on_diag, off_diag
