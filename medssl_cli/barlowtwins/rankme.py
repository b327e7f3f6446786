"""RankMe: a label-free collapse monitor for self-supervised pretraining.

Garrido, Balestriero, Najman, LeCun, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank", ICML 2023. For embeddings Z (N x D) with singular
values sigma_1..sigma_min(N,D):

    p_k = sigma_k / ||sigma||_1 + eps,        RankMe(Z) = exp(-sum_k p_k log p_k)

the exponential of the entropy of the normalised singular values: a smooth effective rank between 1
and min(N, D). A collapsing representation (every image mapped to a few directions) drives it down,
and the paper shows it tracks downstream accuracy without any label. Computed here on the frozen
backbone features (512-d) of a fixed sample of pretraining images, once per epoch, beside the
per-dimension standard deviation of those features (a dimension with ~0 std carries nothing).
"""

from __future__ import annotations

from typing import Any

import torch

EPS = 1e-7
# A warning when RankMe falls below this fraction of its best value so far in the run.
COLLAPSE_FRACTION = 0.25
DEAD_STD = 1e-4  # a feature dimension with a smaller std over the sample is counted as dead


def rankme(z: torch.Tensor, eps: float = EPS) -> float:
    """RankMe of embeddings ``z`` (N, D), computed in float64."""
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"expected a non-empty (N, D) matrix, got {tuple(z.shape)}")
    s = torch.linalg.svdvals(z.double())
    if not torch.isfinite(s).all() or s.sum() <= 0:
        return 0.0 if torch.isfinite(s).all() else float("nan")
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_stats(z: torch.Tensor) -> dict[str, Any]:
    """RankMe and the per-dimension std summary of features ``z`` (N, D), for ``history.jsonl``."""
    std = z.double().std(dim=0) if z.shape[0] > 1 else torch.zeros(z.shape[1], dtype=torch.float64)
    return {
        "rankme": rankme(z),
        "feature_std_mean": float(std.mean()),
        "feature_std_min": float(std.min()),
        "dead_dims": int((std < DEAD_STD).sum()),
    }


def sample_rows(n: int, size: int) -> torch.Tensor:
    """A fixed, evenly spread sample of ``min(n, size)`` row indices (the same every epoch)."""
    m = max(0, min(n, size))
    return torch.linspace(0, n - 1, m).round().long().unique() if m else torch.zeros(0, dtype=torch.long)


def collapse_warning(history: list[dict[str, Any]], current: float, epoch: int) -> str | None:
    """One line when RankMe fell below COLLAPSE_FRACTION of its best earlier value in ``history``."""
    if current != current:
        return f"RankMe is NaN at epoch {epoch}: the features are not finite."
    earlier = [
        (h["rankme"], h["epoch"]) for h in history if h.get("rankme") is not None and h["epoch"] < epoch
    ]
    if not earlier:
        return None
    best, at = max(earlier)
    if current < COLLAPSE_FRACTION * best:
        return (
            f"RankMe collapsed: {current:.1f} at epoch {epoch}, down from {best:.1f} at epoch {at} (features "
            "spanning few directions). Lower --lr or use the default LARS optimiser."
        )
    return None
