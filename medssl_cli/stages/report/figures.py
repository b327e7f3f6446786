"""The accuracy-vs-label-fraction figure of the report."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

INIT_NAMES = {"ssl": "Barlow Twins", "imagenet": "ImageNet", "random": "Random init"}
INIT_COLORS = {"ssl": "tab:blue", "imagenet": "tab:orange", "random": "tab:gray"}
MODE_STYLES = {"linear": ("-", "o"), "full": ("--", "s"), "knn": (":", "^")}


MODE_NAMES = {"linear": "linear probe", "full": "fine-tuned", "knn": "kNN"}


def init_name(init: str, grid: dict[str, Any] | None = None) -> str:
    """ "Barlow Twins" / "VICReg" / "SimCLR" for a grid's ssl init (its pretrain run's method)."""
    if init == "ssl" and grid and grid.get("ssl_name"):
        return str(grid["ssl_name"])
    return INIT_NAMES.get(init, init)


def series_label(init: str, mode: str, grid: dict[str, Any] | None = None) -> str:
    return f"{init_name(init, grid)}, {MODE_NAMES.get(mode, mode)}"


def pct_label(fraction: float) -> str:
    """0.005 -> '0.5%', 0.1 -> '10%', 1 -> '100%'."""
    return f"{100 * fraction:.4g}%"


def fraction_plot(
    rows: list[dict[str, Any]],
    path: Path,
    title: str,
    metric: str = "accuracy",
    grid: dict[str, Any] | None = None,
) -> None:
    """Mean ``metric`` (%) per label fraction (log x axis, %), one line per init x mode, error bars = std
    over seeds (none for a single seed)."""
    from medssl_cli.plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["init"], r["mode"]), []).append(r)
    fractions = sorted({float(r["fraction"]) for r in rows})
    others = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    for j, ((init, mode), rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["fraction"])
        # a small horizontal dodge (log axis: a factor) keeps overlapping error bars apart
        dodge = 1.0 + 0.025 * (j - (len(series) - 1) / 2)
        x = [100 * float(r["fraction"]) * dodge for r in rs]
        y = [100 * r[metric]["mean"] if r[metric]["mean"] is not None else float("nan") for r in rs]
        err = [100 * r[metric]["std"] if r[metric]["std"] is not None else 0.0 for r in rs]
        ls, marker = MODE_STYLES.get(mode, (":", "^"))
        color = INIT_COLORS.get(init) or next(others, "black")
        seeds = sorted({len(r["seeds"]) for r in rs})
        n_seeds = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        ax.errorbar(
            x, y, yerr=err, ls=ls, marker=marker, color=color, capsize=4, lw=1.8, ms=6,
            label=f"{series_label(init, mode, grid)} ({n_seeds} seed{'s' if seeds[-1] > 1 else ''})",
        )  # fmt: skip
    ax.set_xscale("log")
    if len(fractions) == 1:  # else the axis spans only the dodge and the series look far apart
        ax.set_xlim(50 * fractions[0], 200 * fractions[0])
    ax.set_xticks([100 * f for f in fractions], [pct_label(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images (fraction of the train split, log scale)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=9, loc="lower right", title="init, mode (error bars: ±1 std over seeds)", title_fontsize=8
    )
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    save_figure(fig, path, dpi=130)
