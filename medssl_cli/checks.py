"""Range checks of every recipe section, in one place: each bad value is one UserError naming the
option or recipe key and a fix, raised before any data is read or a run directory is made.

Types are checked when a recipe is built (``recipe.merge``: wrong types, unknown keys, and the
resource keys' lower bounds in ``recipe.MINIMUM``); the ranges that depend on a stage are here, called
by the stage that runs them: ``check_pretrain``, ``check_finetune``, ``check_tsne``, ``check_knn_k``.
"""

from __future__ import annotations

import math

from medssl_cli.barlowtwins.views import check_views
from medssl_cli.data.fractions import parse_fraction, parse_val_budget
from medssl_cli.errors import UserError
from medssl_cli.models import check_projector
from medssl_cli.recipe import Recipe


def check_pretrain(recipe: Recipe, allow_test: bool = False) -> None:
    """Pretraining: the protocol (never the test split) and every numeric setting, before any data."""
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
    if not (math.isfinite(p.simclr_temperature) and p.simclr_temperature > 0):
        raise UserError(f"Recipe key 'pretrain.simclr_temperature' must be > 0, got {p.simclr_temperature}.")
    for key in ("vicreg_sim", "vicreg_std", "vicreg_cov"):
        if not (math.isfinite(getattr(p, key)) and getattr(p, key) >= 0):
            raise UserError(
                f"Recipe key 'pretrain.{key}' must be a finite number >= 0, got {getattr(p, key)}."
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
    check_views(recipe.views)
    if p.log == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
        except ImportError:
            raise UserError(
                "--log tensorboard needs the tensorboard package, which is not installed.",
                'Install it with: pip install -e ".[tensorboard]" (or pip install tensorboard).',
            ) from None  # before the run directory exists (ViewFeed checks them again)


def check_finetune(recipe: Recipe) -> None:
    """The finetune grid's settings: non-empty lists without repeats, fractions, seeds, budgets."""
    ft = recipe.finetune
    for key in ("inits", "modes", "fractions", "seeds"):
        values = getattr(ft, key)
        if not values:
            raise UserError(f"Recipe key 'finetune.{key}' is empty.", "Give at least one value.")
        if len(set(values)) != len(values):
            raise UserError(f"finetune.{key} lists a value twice: {values}.", "Remove the repeat.")
    for f in ft.fractions:
        parse_fraction(f)
    if any(s < 0 for s in ft.seeds):
        raise UserError(f"Seeds must be >= 0, got {ft.seeds}.", "Use e.g. --seeds 0,1,2.")
    for key in ("epochs", "batch_size", "patience"):
        if getattr(ft, key) < 1:
            raise UserError(f"Recipe key 'finetune.{key}' must be >= 1, got {getattr(ft, key)}.")
    for key in ("lr_head", "lr_backbone"):
        if not getattr(ft, key) > 0:
            raise UserError(f"Recipe key 'finetune.{key}' must be > 0, got {getattr(ft, key)}.")
    if any(not c > 0 for c in ft.c_grid) or not ft.c_grid:
        raise UserError(f"finetune.c_grid must be positive numbers, got {ft.c_grid}.")
    parse_val_budget(ft.val_budget)
    if "knn" in ft.modes and recipe.evaluate.knn_k < 1:
        k = recipe.evaluate.knn_k
        raise UserError(f"Recipe key 'evaluate.knn_k' (neighbours of the knn mode) must be >= 1, got {k}.")


def check_tsne(recipe: Recipe) -> None:
    """t-SNE: sample size, perplexity, and the k of its leave-one-out kNN score."""
    t = recipe.tsne
    if t.max_samples < 3:
        raise UserError(f"tsne.max_samples must be at least 3, got {t.max_samples}.")
    if not t.perplexity > 0:
        raise UserError(f"tsne.perplexity must be > 0, got {t.perplexity}.")
    if recipe.evaluate.knn_k < 1:
        raise UserError(f"evaluate.knn_k must be >= 1, got {recipe.evaluate.knn_k}.")


def check_knn_k(recipe: Recipe) -> None:
    """The kNN probe's k (``medssl evaluate --probe knn --k``)."""
    k = recipe.evaluate.knn_k
    if k < 1:
        raise UserError(f"--k (evaluate.knn_k) must be >= 1, got {k}.", "E.g. --k 20.")
