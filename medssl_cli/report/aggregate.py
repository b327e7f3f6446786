"""Statistics over seeds for the comparison table (pure functions, unit-tested).

For one (init, mode, fraction) group with per-seed values x_1..x_n of a metric:

- mean = sum(x) / n; sample std s = sqrt(sum((x - mean)^2) / (n - 1)) (ddof = 1; undefined for n = 1);
- 95% CI of the mean over seeds: Student t interval mean ± t_{0.975, n-1} * s / sqrt(n) (n >= 2).
  It covers seed-to-seed variation (label subset draw + training), not the test-set sampling error;
- accuracy also gets the mean over seeds of each run's own 95% interval (Wilson by default, from
  evaluate): the test-set sampling uncertainty of a single run. Pooling the seeds' predictions into
  one Wilson interval is not done: every seed is scored on the same test images, so pooled counts are
  not independent and the interval would be too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student t quantile t_{(1+level)/2, df} (scipy.stats.t)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def seed_stats(values: Sequence[float | None], level: float = LEVEL) -> dict[str, Any]:
    """{"mean", "std", "n", "ci": [lo, hi] | None} over the non-missing values (see module docstring)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    n = len(v)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci": None}
    mean = sum(v) / n
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "ci": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci": [mean - half, mean + half]}


def mean_interval(intervals: Sequence[Sequence[float] | None]) -> list[float] | None:
    """Element-wise mean of [lo, hi] intervals (missing ones skipped); None if there are none."""
    got = [(float(i[0]), float(i[1])) for i in intervals if i is not None and len(i) == 2]
    if not got:
        return None
    return [sum(lo for lo, _ in got) / len(got), sum(hi for _, hi in got) / len(got)]


def choose_split(cells: Sequence[dict[str, Any]]) -> tuple[str | None, bool]:
    """("test", False) if any cell has test metrics; ("val", True) as a loud fallback; (None, False)."""
    if any(c.get("metrics", {}).get("test") for c in cells):
        return "test", False
    if any(c.get("metrics", {}).get("val") for c in cells):
        return "val", True
    return None, False


def group_cells(
    cells: Sequence[dict[str, Any]], split: str, init_order: Sequence[str] = ("ssl", "imagenet", "random")
) -> list[dict[str, Any]]:
    """One row per (init, mode, fraction) over the cells that have ``split`` metrics.

    A cell is {"init", "mode", "fraction", "seed", "n_train", "metrics": {split: METRICS}}. Rows are
    ordered by init (``init_order``, then others alphabetically), mode, then fraction.
    """
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for c in cells:
        m = (c.get("metrics") or {}).get(split)
        if not m:
            continue
        groups.setdefault((c["init"], c["mode"], float(c["fraction"])), []).append(c)

    def order(key: tuple[str, str, float]) -> tuple[int, str, str, float]:
        i, mo, f = key
        rank = init_order.index(i) if i in init_order else len(init_order)
        return (rank, i, mo, f)

    rows = []
    for key in sorted(groups, key=order):
        members = sorted(groups[key], key=lambda c: c["seed"])
        ms = [c["metrics"][split] for c in members]
        methods = sorted({str(m.get("ci_method")) for m in ms if m.get("ci_method")})
        rows.append(
            {
                "init": key[0],
                "mode": key[1],
                "fraction": key[2],
                "seeds": [c["seed"] for c in members],
                "cells": [c["name"] for c in members],
                "n_train": [c.get("n_train") for c in members],
                "n_eval": sorted({m.get("n") for m in ms if m.get("n") is not None}),
                **{k: seed_stats([m.get(k) for m in ms]) for k in METRIC_KEYS},
                "accuracy_run_ci_mean": mean_interval([m.get("accuracy_ci") for m in ms]),
                "run_ci_method": ", ".join(methods) or None,
                "leakage_override": any(bool(c.get("leakage_override")) for c in members),
            }
        )
    return rows
