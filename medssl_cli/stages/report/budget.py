"""The validation budget in the report: what each grid chose its settings on, and, where one setup was
run with both budgets, the optimism gap (accuracy with the whole val split minus with a val set the
size of the labelled subset, per init, mode and label fraction)."""

from __future__ import annotations

from typing import Any

from medssl_cli.stages.report.figures import init_name, pct_label
from medssl_cli.stages.report.render import Block, Heading, Para, Table


def describe(budget: str) -> str:
    """One sentence on a grid's ``finetune.val_budget``."""
    if budget == "matched":
        return (
            "Validation budget: matched (each cell chose C / stopped early on a stratified val subset as "
            "large as its labelled train subset, at least one image per class; with fewer than 2 per class "
            "C was chosen by cross-validation on the labelled images, or fixed at 1)."
        )
    if budget == "full":
        return (
            "Validation budget: full (OPTIMISTIC: every cell chose C / stopped early on the whole val "
            "split, more labels than a low-label user has)."
        )
    return f"Validation budget: {budget} val images per cell (stratified, at least one per class)."


def _key(g: dict[str, Any]) -> tuple:
    grid = g["grid"]
    return (tuple(grid["datasets"]), g["split"])


def optimism_gap(grids: list[dict[str, Any]]) -> list[Block]:
    """Full minus matched mean accuracy, per (init, mode, fraction) present in both, for grids on the
    same datasets and split (the newest grid of each budget)."""
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for g in grids:
        if g["rows"]:
            by.setdefault(_key(g), {})[g["grid"].get("val_budget", "full")] = g
    blocks: list[Block] = []
    for (datasets, split), budgets in by.items():
        full, matched = budgets.get("full"), budgets.get("matched")
        if not full or not matched:
            continue
        means = {
            name: {(r["init"], r["mode"], r["fraction"]): r["accuracy"].get("mean") for r in g["rows"]}
            for name, g in (("full", full), ("matched", matched))
        }
        rows = []
        for key in sorted(means["full"].keys() & means["matched"].keys(), key=lambda k: (k[0], k[1], k[2])):
            a, b = means["full"][key], means["matched"][key]
            if a is None or b is None:
                continue
            init, mode, fraction = key
            rows.append([init_name(init, matched["grid"]), mode, pct_label(fraction), f"{100 * a:.1f}",
                         f"{100 * b:.1f}", f"{100 * (a - b):+.1f}"])  # fmt: skip
        if not rows:
            continue
        blocks.append(Heading(3, f"Optimism gap: {', '.join(datasets)}"))
        blocks.append(
            Table(
                [
                    "init",
                    "mode",
                    "labels",
                    "accuracy % (full val)",
                    "accuracy % (matched val)",
                    "gap (points)",
                ],
                rows,
                f"{split.upper()} accuracy, mean over seeds, of grids {full['grid']['name']} (val budget "
                f"full) and {matched['grid']['name']} (matched): the gap is how much of the full-val "
                "number came from choosing on more val labels than the labelled subset.",
            )
        )
    if blocks:
        blocks.insert(
            0, Para("The same setups were run with both validation budgets; the difference is optimism.")
        )
    return blocks
