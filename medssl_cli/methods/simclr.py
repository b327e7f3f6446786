"""SimCLR loss, NT-Xent (Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive
Learning of Visual Representations", ICML 2020).

The 2N embeddings of two views of N images are L2-normalised; for anchor i with positive p(i) (its
other view) and temperature t:

    l_i = -log( exp(s_i,p(i) / t) / sum_{k != i} exp(s_ik / t) ),   s = cosine similarity
    L = mean_i l_i        (over all 2N anchors)

With ``world_size`` > 1 the negatives are the global batch's: each rank places its embeddings at its
offset in a global buffer that a differentiable all-reduce sums (gradients flow back to their rank),
and every rank computes the global loss, exactly one process's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from medssl_cli.barlowtwins.loss import _all_reduce_sum


def _global(z: Tensor, world_size: int) -> Tensor:
    if world_size == 1:
        return z
    n = z.shape[0]
    buf = z.new_zeros((n * world_size, z.shape[1]))
    rank = dist.get_rank()
    buf = buf.index_copy(0, torch.arange(rank * n, (rank + 1) * n, device=z.device), z)
    return _all_reduce_sum(buf, world_size)


def simclr_loss(
    z1: Tensor, z2: Tensor, temperature: float = 0.2, world_size: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, loss, 0) over the global batch (the triple of every medssl objective)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be N x D, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = F.normalize(_global(z1.to(dtype), world_size), dim=1)
        b = F.normalize(_global(z2.to(dtype), world_size), dim=1)
        z = torch.cat([a, b])
        n = a.shape[0]
        logits = z @ z.T / temperature
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        loss = F.cross_entropy(logits, target)
    return loss, loss.detach(), torch.zeros((), dtype=loss.dtype, device=loss.device)
