"""Small matplotlib figures (Agg backend), always written atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl_cli.io import write_with


def _plt():  # noqa: ANN202 - pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    plt = _plt()
    write_with(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)


def loss_curve(history: list[dict[str, Any]], path: Path, title: str = "Barlow Twins pretraining") -> None:
    """Loss per epoch (total, on-diagonal and weighted off-diagonal terms), log-scale y axis; beside it
    the label-free collapse monitor RankMe (effective rank of the backbone features) where recorded."""
    plt = _plt()
    ranked = [h for h in history if h.get("rankme") is not None]
    fig, axes = plt.subplots(1, 2 if ranked else 1, figsize=(10.5 if ranked else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], marker="o", ms=3, label="loss")
    ax.plot(epochs, [h["on_diag"] for h in history], ls="--", label="on-diagonal  Σ(1-c_ii)²")
    ax.plot(epochs, [h["off_diag_weighted"] for h in history], ls=":", label="λ · off-diagonal  Σc_ij²")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (per step, mean over epoch)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if ranked:
        rx = axes[0][1]
        rx.plot([h["epoch"] for h in ranked], [h["rankme"] for h in ranked], marker="o", ms=3, color="C3")
        rx.set_xlabel("epoch")
        rx.set_ylabel("RankMe (effective rank, max 512)")
        rx.set_title("Collapse monitor: RankMe of backbone features")
        rx.set_ylim(bottom=0)
        rx.grid(alpha=0.3)
    save_figure(fig, path)
