"""Classification metrics for evaluate and finetune (the METRICS dict; see docs/architecture.md).

Definitions (K classes, confusion matrix M with rows = true class, columns = predicted class):

- accuracy = trace(M) / n, with a 95% CI: Wilson score interval (default) or a percentile bootstrap.
- per-class recall r_c = M[c, c] / sum_j M[c, j]; ``None`` for a class with no true sample.
- balanced accuracy = mean of r_c over the classes present in the true labels (sklearn's definition).
- macro-F1 = mean over the classes present in the true or the predicted labels of
  F1_c = 2 TP / (2 TP + FP + FN) (sklearn's ``f1_score(average="macro")`` with its default labels):
  a class that neither occurs nor is predicted is not counted as a 0.
- macro AUROC = mean over classes c of the one-vs-rest ROC AUC of the score p(c | x), taken over the
  classes that have at least one positive and one negative in the evaluated labels; the classes left out
  are listed under ``auroc_skipped`` (a class missing from a small eval set has no defined AUROC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl_cli.errors import short

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927).

    p = k/n, centre = (p + z^2/(2n)) / (1 + z^2/n), half width = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2)).
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 vector (resampling images with replacement)."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    # Resampling a 0/1 vector: the number of successes in a resample is Binomial(n, p) exactly.
    means = rng.binomial(correct.size, correct.mean(), size=n_boot) / correct.size
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> tuple[float | None, list[int]]:
    """Macro one-vs-rest AUROC over the classes with both positives and negatives; (value, skipped)."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    aucs, skipped = [], []
    for c in range(scores.shape[1]):
        pos = y_true == c
        if pos.all() or not pos.any():
            skipped.append(c)
            continue
        aucs.append(roc_auc_score(pos, scores[:, c]))
    return (float(np.mean(aucs)) if aucs else None), skipped


def compute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    class_names: Sequence[str],
    *,
    ci: str = "wilson",
    seed: int = 0,
) -> dict[str, Any]:
    """The METRICS dict: n, accuracy, balanced_accuracy, macro_f1, auroc, accuracy_ci, ci_method,
    per_class_recall, confusion, class_names (+ auroc_skipped). ``scores``: (n, K) class probabilities."""
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(class_names)
    n = int(y_true.size)
    m = confusion(y_true, y_pred, k)
    correct = int(np.trace(m))
    support = m.sum(axis=1)
    recall = {
        str(name): (float(m[c, c] / support[c]) if support[c] > 0 else None)
        for c, name in enumerate(class_names)
    }
    present = [r for r in recall.values() if r is not None]
    if ci == "wilson":
        lo, hi = wilson_interval(correct, n)
    elif ci == "bootstrap":
        lo, hi = bootstrap_interval(y_true == y_pred, seed=seed)
    else:
        raise ValueError(f"unknown CI method {ci!r}")
    auroc, skipped = (None, list(range(k))) if scores is None else macro_auroc(y_true, np.asarray(scores))
    return {
        "n": n,
        "accuracy": correct / n if n else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)) if n else None,
        "auroc": auroc,
        "auroc_skipped": [str(class_names[c]) for c in skipped],
        "accuracy_ci": [lo, hi],
        "ci_method": "wilson 95%" if ci == "wilson" else "bootstrap 95% (percentile, 2000 resamples)",
        "per_class_recall": recall,
        "confusion": m.tolist(),
        "class_names": [str(c) for c in class_names],
    }


def summarize(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std (ddof=1; None for one value: no spread is measured) and count of the non-missing
    values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def check_confusion(matrix: object, class_names: object) -> np.ndarray:
    """A k x k matrix of finite counts >= 0 for k class names (ValueError otherwise), as float64."""
    m = np.asarray(matrix, dtype=np.float64)
    if not isinstance(class_names, (list, tuple)) or m.shape != (len(class_names),) * 2:
        raise ValueError(f"confusion matrix of shape {m.shape} for {short(class_names, 60)} classes")
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError("confusion matrix with negative or non-finite counts")
    return m


def plot_confusion(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str
) -> None:
    """Confusion matrix PNG: counts, colour = row-normalised (recall), class names on both axes."""
    from medssl_cli.plots import _plt, save_figure

    plt = _plt()
    m = check_confusion(matrix, class_names)
    k = len(class_names)
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = max(4.0, 0.55 * k + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), [str(c) for c in class_names], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(m[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if frac[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    save_figure(fig, path)
