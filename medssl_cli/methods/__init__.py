"""Self-supervised objectives on the same backbone, views and projector: one loss module each.

``pretrain.method``: ``barlow_twins`` (default; ``barlowtwins/loss.py``), ``vicreg`` (``vicreg.py``),
``simclr`` (``simclr.py``). Every loss takes the two views' embeddings of one rank's local batch and
``world_size``, and returns (loss, first term, second term) computed over the *global* batch with
differentiable all-reduces, so under DDP's gradient averaging N ranks train exactly as one process
with the whole batch. The two terms go into history.jsonl as ``on_diag`` / ``off_diag`` (Barlow
Twins: on- and off-diagonal; VICReg: invariance and variance + covariance; SimCLR: the loss and 0).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from medssl_cli.barlowtwins.loss import barlow_twins_loss
from medssl_cli.methods.simclr import simclr_loss
from medssl_cli.methods.vicreg import vicreg_loss
from medssl_cli.recipe import METHOD_NAMES, PretrainRecipe

METHODS = ("barlow_twins", "vicreg", "simclr")
NAMES = METHOD_NAMES
Loss = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor]]


def objective(p: PretrainRecipe) -> Loss:
    """The loss of ``p.method`` with its recipe hyper-parameters: (z1, z2, world_size) -> triple."""
    if p.method == "vicreg":
        return lambda z1, z2, w: vicreg_loss(z1, z2, p.vicreg_sim, p.vicreg_std, p.vicreg_cov, w)
    if p.method == "simclr":
        return lambda z1, z2, w: simclr_loss(z1, z2, p.simclr_temperature, w)
    return lambda z1, z2, w: barlow_twins_loss(z1, z2, p.lambd, w)


def describe(p: PretrainRecipe) -> dict[str, object]:
    """The method and its hyper-parameters (run.json, weights metadata, the report)."""
    if p.method == "vicreg":
        return {"method": "vicreg", "sim": p.vicreg_sim, "std": p.vicreg_std, "cov": p.vicreg_cov}
    if p.method == "simclr":
        return {"method": "simclr", "temperature": p.simclr_temperature}
    return {"method": "barlow_twins", "lambd": p.lambd}
