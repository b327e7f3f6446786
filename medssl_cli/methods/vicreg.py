"""VICReg loss (Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022).

For embeddings z1, z2 of two views of the same N images (N x D), as the official code:

    inv = mean((z1 - z2)^2)                                         (over N x D)
    var = mean_j relu(1 - sqrt(Var_j(z1) + 1e-4)) / 2 + (same for z2) / 2      (unbiased Var over N)
    cov = sum_{i != j} C(z1)_ij^2 / D + sum_{i != j} C(z2)_ij^2 / D,  C = centred z^T z / (N - 1)
    L = sim * inv + std * var + cov_w * cov          (sim = std = 25, cov_w = 1 in the paper)

With ``world_size`` > 1 every statistic is over the global batch (differentiable all-reduces of sums),
as the official code's gather of all embeddings: N ranks compute exactly one process's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medssl_cli.barlowtwins.loss import _all_reduce_sum

VAR_EPS = 1e-4


def _centred_stats(z: Tensor, world_size: int) -> tuple[Tensor, Tensor, int]:
    """(centred z, unbiased covariance D x D, global N)."""
    n = z.shape[0] * world_size
    mean = _all_reduce_sum(z.sum(0), world_size) / n
    c = z - mean
    cov = _all_reduce_sum(c.T @ c, world_size) / (n - 1)
    return c, cov, n


def vicreg_loss(
    z1: Tensor, z2: Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0, world_size: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, invariance term, variance + covariance terms unweighted-sum) over the global batch."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be N x D, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, b = z1.to(dtype), z2.to(dtype)
        d = a.shape[1]
        inv = _all_reduce_sum((a - b).pow(2).sum(), world_size) / (a.shape[0] * world_size * d)
        var_terms, cov_terms = [], []
        for z in (a, b):
            _, c, _ = _centred_stats(z, world_size)
            var_terms.append(F.relu(1 - torch.sqrt(torch.diagonal(c) + VAR_EPS)).mean() / 2)
            eye = torch.eye(d, dtype=torch.bool, device=c.device)
            cov_terms.append(c.masked_fill(eye, 0.0).pow(2).sum() / d)
        v, k = var_terms[0] + var_terms[1], cov_terms[0] + cov_terms[1]
        loss = sim * inv + std * v + cov * k
    return loss, inv, std * v + cov * k
