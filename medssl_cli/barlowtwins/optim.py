"""Optimisers and the learning-rate schedule for pretraining.

LARS as in the official Barlow Twins code (You et al. 2017, "Large Batch Training of Convolutional
Networks"; Zbontar et al. 2021): SGD with momentum 0.9 where each weight tensor's update is rescaled by
the trust ratio eta * ||w|| / ||g + wd * w|| (eta = 0.001); 1-D parameters (biases, BatchNorm) get
neither weight decay nor the rescaling. Adam is what the study used (lr 0.03, batch 256).

The schedule is per step: linear warmup, then cosine decay to 0.001 x the base lr. Each param group
keeps its own ``base_lr``; ``set_lr`` multiplies it by the schedule's factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from medssl_cli.recipe import PretrainRecipe

FINAL_LR_FRACTION = 0.001  # cosine ends at base_lr * 0.001, as the official Barlow Twins schedule


class LARS(torch.optim.Optimizer):
    """LARS with momentum (no dampening, no Nesterov), as the official Barlow Twins optimiser.

    Per parameter p with gradient g, for p.ndim > 1 (or every p when ``exclude_1d`` is False):
        d = g + weight_decay * p
        d = d * eta * ||p|| / ||d||      (only when both norms are > 0, else unchanged)
    1-D parameters use d = g. Then mu = momentum * mu + d and p = p - lr * mu.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay: float = 0.0,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay, exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not (group["exclude_1d"] and p.ndim == 1):
                    if group["weight_decay"] != 0:
                        d = d.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    # torch.where instead of an if: no device sync per parameter.
                    ratio = torch.where(
                        (p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, torch.ones_like(p_norm)
                    )
                    d = d.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


def param_groups(
    model: nn.Module | Iterable[tuple[str, nn.Parameter]],
    lr_weights: float,
    lr_biases: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Two groups: weights (ndim > 1) with ``weight_decay``, and biases/BatchNorm (ndim == 1) without.

    Each group records ``base_lr`` (the lr before scheduling). Frozen parameters are left out.
    """
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    weights, biases = [], []
    for _, p in named:
        if p.requires_grad:
            (biases if p.ndim <= 1 else weights).append(p)
    groups = [
        {
            "name": "weights",
            "params": weights,
            "lr": lr_weights,
            "base_lr": lr_weights,
            "weight_decay": weight_decay,
        },
        {"name": "biases", "params": biases, "lr": lr_biases, "base_lr": lr_biases, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module | Iterable[tuple[str, nn.Parameter]],
    recipe: PretrainRecipe,
    batch_size: int | None = None,
) -> torch.optim.Optimizer:
    """The pretraining optimiser named by ``recipe.optimizer``.

    adam: torch Adam with ``recipe.lr`` as given and ``recipe.weight_decay`` on weights only (fused
    kernel on CUDA). lars: lr = recipe.lr x batch/256 for weights and recipe.lr_biases x batch/256 for
    biases/BN, momentum 0.9, eta ``recipe.lars_eta`` (official Barlow Twins: lr 0.2 / 0.0048, weight decay
    1.5e-6, eta 0.001).
    """
    batch = recipe.batch_size if batch_size is None else batch_size
    if recipe.optimizer == "adam":
        groups = param_groups(model, recipe.lr, recipe.lr, recipe.weight_decay)
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.Adam(groups, lr=recipe.lr, fused=True if on_cuda else None)
    if recipe.optimizer == "lars":
        scale = batch / 256
        groups = param_groups(model, recipe.lr * scale, recipe.lr_biases * scale, recipe.weight_decay)
        return LARS(groups, lr=recipe.lr * scale, momentum=0.9, eta=recipe.lars_eta)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate at 0-based ``step``: linear warmup, then cosine to ``FINAL_LR_FRACTION * base_lr``.

    Warmup: base * (step + 1) / warmup_steps, so the first step already moves (the official code starts
    at exactly 0) and step warmup_steps - 1 reaches base. Cosine over the remaining steps:
    end + (base - end) * (1 + cos(pi * t)) / 2 with t = (step - warmup) / (total - 1 - warmup), so the
    last step (total_steps - 1) uses exactly end = 0.001 * base (the official code approaches it).
    A schedule with no step after warmup (total_steps <= warmup_steps + 1) stays at base.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    end = base_lr * FINAL_LR_FRACTION
    span = total_steps - 1 - warmup_steps
    t = min(max((step - warmup_steps) / span, 0.0), 1.0) if span > 0 else 0.0
    return end + (base_lr - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int) -> float:
    """Set every group's lr to its ``base_lr`` (default: its current lr) scheduled at ``step``.

    Returns the first group's new lr (for logging).
    """
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = lr_at(step, total_steps, warmup_steps, group["base_lr"])
    return optimizer.param_groups[0]["lr"]
