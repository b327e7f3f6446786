"""Grid-level ``metrics.json``: per-cell metrics of one split and their mean ± std over seeds.

``<grid>/metrics.json`` = {split: {"cells": [...], "groups": [...], "written": time}}, one entry per
split (``val`` from finetune, ``test`` from evaluate). A group is one (init, mode, fraction); its
statistics are over the seeds (sample std, ddof = 1).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ..io import read_json, write_json
from ..metrics import summarize
from ..runs import Run
from .grid import finished_cells, grid_lock

KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def write_summary(grid: Run, split: str) -> dict[str, Any]:
    """Collect ``split`` metrics of every finished cell into the grid's metrics.json (under the grid lock)."""
    cells = []
    for c, run in finished_cells(grid):
        try:
            m = read_json(run.file("metrics.json"))
        except (FileNotFoundError, ValueError):
            continue
        if split not in m:
            continue
        s = m[split]
        cells.append(
            {
                "name": c["name"],
                "index": c["index"],
                "init": c["init"],
                "mode": c["mode"],
                "fraction": c["fraction"],
                "seed": c["seed"],
                "n_train": m.get("cell", {}).get("n_train"),
                "n": s["n"],
                **{k: s.get(k) for k in KEYS},
                "accuracy_ci": s.get("accuracy_ci"),
                "leakage_override": bool(m.get("leakage_override")),
            }
        )
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in cells:
        groups.setdefault((row["init"], row["mode"], row["fraction"]), []).append(row)
    group_rows = [
        {
            "init": i,
            "mode": mo,
            "fraction": f,
            "seeds": [r["seed"] for r in rows],
            "n_train": [r["n_train"] for r in rows],
            **{k: summarize([r[k] for r in rows]) for k in KEYS},
        }
        for (i, mo, f), rows in groups.items()
    ]
    entry = {
        "cells": cells,
        "groups": group_rows,
        "written": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    with grid_lock(grid.path):
        path = grid.file("metrics.json")
        try:
            data = read_json(path)
        except (FileNotFoundError, ValueError):
            data = {}
        data[split] = entry
        write_json(path, data)
    return entry
