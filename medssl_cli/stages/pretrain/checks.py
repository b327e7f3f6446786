"""Pretraining checks that need no data: the protocol (never the test split) and every numeric
setting, each a one-line UserError naming the option; and the warning for optimiser settings known to
destroy features."""

from __future__ import annotations

import math

from medssl_cli.barlowtwins.views import check_views
from medssl_cli.errors import UserError
from medssl_cli.models import check_projector
from medssl_cli.recipe import Recipe

# Adam above this lr moves every weight by about its own size per step (the study's 0.03 destroyed the
# features on real images within a few steps; recipes/organs-bt-study.yaml has the numbers).
ADAM_LR_WARN = 1e-2


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
