"""Statistics over seeds for the comparison table (pure functions, unit-tested).

For one (init, mode, fraction) group with per-seed values x_1..x_n of a metric:

- mean = sum(x) / n; sample std s = sqrt(sum((x - mean)^2) / (n - 1)) (ddof = 1; undefined for n = 1);
- 95% CI of the mean over seeds: Student t interval mean ± t_{0.975, n-1} * s / sqrt(n) (n >= 2),
  clipped to the metric's range [0, 1] (flagged). It covers seed-to-seed variation (label subset
  draw + training), not the test-set sampling error. Seeds with equal values get no interval;
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


def seed_stats(
    values: Sequence[float | None], level: float = LEVEL, bounds: tuple[float, float] | None = None
) -> dict[str, Any]:
    """{"mean", "std", "n", "ci": [lo, hi] | None} over the non-missing values (see module docstring).

    Values that are all equal (n >= 2) are flagged ``identical`` (std 0, no interval: the seeds did not
    vary the result, e.g. the same subset and a deterministic fit). ``bounds``: the metric's range; an
    interval reaching past it (few seeds: t_{0.975,1} = 12.7) is clipped to it and flagged
    ``ci_clipped``, with the unclipped one in ``ci_unclipped``.
    """
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    n = len(v)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci": None}
    mean = v[0] + sum(x - v[0] for x in v) / n  # exact when the values are equal (no 1e-17 std)
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "ci": None}
    if all(x == v[0] for x in v):
        return {"mean": v[0], "std": 0.0, "n": n, "ci": None, "identical": True}
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    ci = [mean - half, mean + half]
    out: dict[str, Any] = {"mean": mean, "std": std, "n": n, "ci": ci}
    if bounds is not None and (ci[0] < bounds[0] or ci[1] > bounds[1]):
        out.update(ci=[max(ci[0], bounds[0]), min(ci[1], bounds[1])], ci_clipped=True, ci_unclipped=ci)
    return out


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
                **{k: seed_stats([m.get(k) for m in ms], bounds=(0.0, 1.0)) for k in METRIC_KEYS},
                "accuracy_run_ci_mean": mean_interval([m.get("accuracy_ci") for m in ms]),
                "run_ci_method": ", ".join(methods) or None,
                "run_ci_methods": methods,
                "leakage_override": any(bool(c.get("leakage_override")) for c in members),
            }
        )
    return rows
