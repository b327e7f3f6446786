"""Paired comparisons of inits, from the cells' per-image predictions (``predictions_<split>.csv``).

For one mode and label fraction, two inits A and B were evaluated on the same test images, and with the
same seed they trained on the same labelled subset. The difference (A minus B) in accuracy and in
balanced accuracy is the mean over the seeds both have of the per-seed difference. Its 95% interval
and two-sided p-value come from a paired bootstrap (``N_BOOT`` replicates): each replicate resamples
the test *groups* with replacement (the organ planes' shared (CT volume, organ) item, so the three
views of one item move together; other datasets: single images) with the same weights for A and B and
every seed, and resamples the seeds (with replacement) when there are several; interval = the 2.5th
and 97.5th percentiles, p = 2 x the smaller share of replicates on either side of 0 (at most 1;
identical predictions give p = 1). Holm's step-down adjustment is applied over all comparisons of a
grid, per metric.

"Labels saved": per pair and mode, the smallest fraction f at which A's accuracy at f matches or beats
B's at the next larger fraction g of the grid (observed difference >= 0), with the same paired
interval; A then needs g / f times fewer labels for B's accuracy.
"""

from __future__ import annotations

import csv
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

N_BOOT = 2000
INIT_ORDER = ("ssl", "imagenet", "random")
METHOD = (
    "paired bootstrap over test images ({boot} replicates; images grouped by subject item where the dataset "
    "has one, the organ planes' (CT volume, organ)), seeds resampled with the images; 95% percentile "
    "interval; two-sided p; Holm-adjusted over the grid's comparisons per metric"
)


def read_cell(path: str | Path) -> dict[str, np.ndarray] | None:
    """labels, predictions and group ids of one predictions file, in ``index`` order; None if absent."""
    p = Path(path)
    if not p.is_file():
        return None
    with open(p, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: int(r["index"]))
    groups = [r["item"] or f"image/{r['index']}" for r in rows]
    return {
        "label": np.array([int(r["label"]) for r in rows], dtype=np.int64),
        "predicted": np.array([int(r["predicted"]) for r in rows], dtype=np.int64),
        "group": np.unique(groups, return_inverse=True)[1],
    }


def _metrics(w: np.ndarray, correct: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(R, S) accuracy and balanced accuracy under image weights ``w`` (R, N), ``correct`` (S, N)."""
    acc = (w @ correct.T) / w.sum(1, keepdims=True)
    recalls = []
    for c in classes:
        m = labels == c
        denom = w[:, m].sum(1, keepdims=True)
        recalls.append(np.where(denom > 0, (w[:, m] @ correct[:, m].T) / np.maximum(denom, 1e-12), np.nan))
    bal = np.nanmean(np.stack(recalls), axis=0)
    return np.stack([acc, bal])  # (2, R, S)


def paired_difference(
    correct_a: np.ndarray, correct_b: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int = 0,
    n_boot: int = N_BOOT,
) -> dict[str, Any]:  # fmt: skip
    """A minus B (``correct_*``: (seeds, images) booleans on the same images) in accuracy and balanced
    accuracy: observed, 95% interval and p from the paired bootstrap of the module docstring."""
    ca, cb = np.atleast_2d(correct_a).astype(np.float64), np.atleast_2d(correct_b).astype(np.float64)
    n_seeds, n = ca.shape
    classes = np.unique(labels)
    observed = _metrics(np.ones((1, n)), ca, labels, classes) - _metrics(np.ones((1, n)), cb, labels, classes)
    obs = observed[:, 0, :].mean(1)  # (2,): per metric, mean over seeds
    rng = np.random.default_rng([seed, 2718])
    g = int(groups.max()) + 1 if len(groups) else 0
    boot = []
    for start in range(0, n_boot, 250):  # chunks bound memory: (chunk, images) weights
        r = min(250, n_boot - start)
        w = rng.multinomial(g, np.full(g, 1.0 / g), size=r)[:, groups].astype(np.float64)
        d = _metrics(w, ca, labels, classes) - _metrics(w, cb, labels, classes)  # (2, r, S)
        pick = rng.integers(0, n_seeds, size=(r, n_seeds)) if n_seeds > 1 else np.zeros((r, 1), int)
        boot.append(np.take_along_axis(d, pick[None], axis=2).mean(2))  # (2, r)
    b = np.concatenate(boot, axis=1)
    out = {}
    for i, name in enumerate(("accuracy", "balanced_accuracy")):
        lo, hi = np.percentile(b[i], [2.5, 97.5])
        p = min(1.0, 2 * min(float((b[i] <= 0).mean()), float((b[i] >= 0).mean())))
        out[name] = {"diff": float(obs[i]), "ci": [float(lo), float(hi)], "p": p}
    out.update(n_images=n, n_groups=g, n_seeds=n_seeds)
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _by_setup(
    grid: dict[str, Any], split: str
) -> dict[tuple[str, str, float], dict[int, dict[str, np.ndarray]]]:
    """{(init, mode, fraction): {seed: predictions}} of the grid's finished cells with a predictions file."""
    out: dict[tuple[str, str, float], dict[int, dict[str, np.ndarray]]] = {}
    for c in grid["cells"]:
        path = (c.get("predictions") or {}).get(split)
        pred = read_cell(path) if c.get("status") == "finished" and path else None
        if pred is not None:
            out.setdefault((c["init"], c["mode"], float(c["fraction"])), {})[int(c["seed"])] = pred
    return out


def _compare(a: dict[int, dict], b: dict[int, dict], seed: int) -> dict[str, Any] | None:
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    ref = a[seeds[0]]
    if any(not np.array_equal(x[s]["label"], ref["label"]) for x in (a, b) for s in seeds):
        return None  # not the same images: no paired comparison
    ca = np.stack([a[s]["predicted"] == a[s]["label"] for s in seeds])
    cb = np.stack([b[s]["predicted"] == b[s]["label"] for s in seeds])
    return {"seeds": seeds, **paired_difference(ca, cb, ref["label"], ref["group"], seed)}


def compare_grid(grid: dict[str, Any], split: str) -> dict[str, Any]:
    """Every paired comparison of the grid (per mode and fraction, every pair of inits), Holm-adjusted,
    and the labels-saved line per pair and mode (module docstring)."""
    setups = _by_setup(grid, split)
    inits = [i for i in INIT_ORDER if any(k[0] == i for k in setups)]
    modes = sorted({k[1] for k in setups})
    fractions = sorted({k[2] for k in setups})
    comparisons = []
    for mode in modes:
        for f in fractions:
            for a, b in combinations(inits, 2):
                if (a, mode, f) in setups and (b, mode, f) in setups:
                    res = _compare(setups[(a, mode, f)], setups[(b, mode, f)], seed=len(comparisons))
                    if res:
                        comparisons.append({"mode": mode, "fraction": f, "a": a, "b": b, **res})
    for metric in ("accuracy", "balanced_accuracy"):
        for c, adj in zip(comparisons, holm([c[metric]["p"] for c in comparisons]), strict=True):
            c[metric]["p_holm"] = adj
    saved = []
    for mode in modes:
        for a, b in [(x, y) for x in inits for y in inits if x != y]:
            for f, g in zip(fractions, fractions[1:], strict=False):
                if (a, mode, f) not in setups or (b, mode, g) not in setups:
                    continue
                res = _compare(setups[(a, mode, f)], setups[(b, mode, g)], seed=7)
                if res and res["accuracy"]["diff"] >= 0:
                    saved.append({"mode": mode, "a": a, "fraction_a": f, "b": b, "fraction_b": g,
                                  "factor": g / f, **res})  # fmt: skip
                    break
    return {
        "split": split,
        "method": METHOD.format(boot=N_BOOT),
        "comparisons": comparisons,
        "labels_saved": saved,
    }


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci(ci: list[float]) -> str:
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def blocks(grids: list[dict[str, Any]]) -> list[Any]:
    """The report's "Paired comparisons" section: one table and the labels-saved lines per grid."""
    from medssl_cli.stages.report.figures import init_name, pct_label
    from medssl_cli.stages.report.render import Bullets, Heading, Para, Table

    out: list[Any] = []
    for g in grids:
        res = g.get("paired")
        if not res or not res["comparisons"]:
            continue
        name = lambda i, grid=g["grid"]: init_name(i, grid)  # noqa: E731
        rows = [
            [c["mode"], pct_label(c["fraction"]), f"{name(c['a'])} - {name(c['b'])}", str(len(c["seeds"])),
             f"{_pts(c['accuracy']['diff'])} {_ci(c['accuracy']['ci'])}", _p(c["accuracy"]["p"]),
             _p(c["accuracy"]["p_holm"]),
             f"{_pts(c['balanced_accuracy']['diff'])} {_ci(c['balanced_accuracy']['ci'])}",
             _p(c["balanced_accuracy"]["p_holm"])]
            for c in res["comparisons"]
        ]  # fmt: skip
        headers = ["mode", "labels", "A - B", "seeds", "accuracy diff (points) [95% CI]", "p", "p (Holm)",
                   "balanced accuracy diff [95% CI]", "p (Holm)"]  # fmt: skip
        n = res["comparisons"][0]
        caption = (
            f"{res['split'].upper()} split of grid {g['grid']['name']}: {n['n_images']} images in "
            f"{n['n_groups']} groups. Method: {res['method']}."
        )
        out += [Heading(3, f"Paired comparisons: grid {g['grid']['name']}"), Table(headers, rows, caption)]
        lines = [
            f"{c['mode']}: {name(c['a'])} at {pct_label(c['fraction_a'])} labels matches {name(c['b'])} at "
            f"{pct_label(c['fraction_b'])} ({c['factor']:g}x fewer labels): accuracy difference "
            f"{_pts(c['accuracy']['diff'])} points {_ci(c['accuracy']['ci'])}, p {_p(c['accuracy']['p'])}"
            for c in res["labels_saved"]
        ]
        out.append(Bullets(lines) if lines else Para("Labels saved: no init matches another one at the next "
                                                     "larger label fraction in this grid."))  # fmt: skip
    if out:
        out.insert(0, Heading(2, "Paired comparisons", "paired-comparisons"))
    return out
