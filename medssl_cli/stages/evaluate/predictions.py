"""Per-image predictions of an evaluated cell: ``<cell>/predictions_<split>.csv``.

One row per evaluated image, in the pooled split's order:

- ``index``: position in the pooled split (datasets in the grid's order);
- ``dataset``, ``row``: the MIMeta dataset id and the image's row in its ``images.hdf5``;
- ``item``: the subject-level item where the dataset has one (the organ planes: ``organs_/<row>``,
  the same (CT volume, organ) in all three planes; ``synthetic_organs_/<row>`` for their stand-ins),
  else empty;
- ``label``, ``predicted``: class indices; ``p_<class name>``: the class probabilities (6 decimals).

CSV because every tool reads it in one line (``pandas.read_csv(path)``, R's ``read.csv``, a
spreadsheet) and no library is needed to write it; the format version (``PREDICTIONS_VERSION``) and
the column list are recorded in the cell's ``metrics.json`` under the split's ``predictions`` key.
Paired comparisons between inits (same images, same order) join two files on ``index``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl_cli.data.leakage import item_id
from medssl_cli.data.pool import Pool
from medssl_cli.io import write_text

PREDICTIONS_VERSION = 1


def columns(class_names: list[str]) -> list[str]:
    return ["index", "dataset", "row", "item", "label", "predicted", *[f"p_{c}" for c in class_names]]


def write_predictions(path: Path, pool: Pool, proba: torch.Tensor) -> dict[str, Any]:
    """Write the predictions file atomically; returns its record for metrics.json."""
    p = proba.detach().cpu().double().numpy()
    predicted = p.argmax(1)
    ids = pool.dataset_ids
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns(pool.class_names))
    for i in range(len(pool)):
        ds, row = ids[int(pool.source_ds[i])], int(pool.source_idx[i])
        w.writerow([i, ds, row, item_id(ds, row), int(pool.labels[i]), int(predicted[i]), *np.round(p[i], 6)])
    write_text(path, out.getvalue())
    return {
        "file": path.name,
        "version": PREDICTIONS_VERSION,
        "rows": len(pool),
        "columns": columns(pool.class_names),
    }


def read_predictions(path: Path) -> list[dict[str, str]]:
    """The rows of a predictions file as dicts of strings (``csv.DictReader``)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
