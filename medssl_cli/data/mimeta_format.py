"""Write a dataset in the exact MIMeta on-disk format (mimeta-pytorch 0.0.6), atomically.

Layout: ``<root>/<id>/info.yaml``; ``images.hdf5`` holding one contiguous, uncompressed uint8 dataset
``images`` of shape (N,H,W) or (N,H,W,3); ``task_labels/<task name>.npy`` (int64, the task name
verbatim as file name); ``splits/{train,val,test}.txt`` with ``images/000123.tiff`` lines. The folder
is built beside its target and renamed into place, so a reader never sees half a dataset. Used by the
synthetic generators (``synth.py``) and by tests that need odd datasets.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medssl_cli.errors import UserError
from medssl_cli.io import writable_dir, write_bytes, write_text, write_with, write_yaml

SPLITS = ("train", "val", "test")
# fmt: off
TARGETS = ("MULTICLASS_CLASSIFICATION", "BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION",
           "ORDINAL_REGRESSION", "REGRESSION")
# fmt: on


@dataclass
class TaskSpec:
    """One task: its name (= label file name), MIMeta target kind, label names and per-image values."""

    task_name: str
    task_target: str
    labels: dict[int, str]
    values: np.ndarray


def write_mimeta_dataset(
    root: Path,
    dataset_id: str,
    images: np.ndarray,
    tasks: list[TaskSpec],
    splits: dict[str, np.ndarray],
    info_extra: dict | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write one dataset folder; built in ``<root>/.medssl-tmp-*/<id>`` and renamed into place.

    The temporary folder sits one level down, so a crash never leaves anything the MIMeta loader
    (which scans the root's direct subfolders for ``info.yaml``) would take for a dataset.
    ``info_extra`` adds keys (``name``, ``domain``, ``description``, ...) but cannot replace the ones
    derived from the data.
    """
    root, images = Path(root), np.ascontiguousarray(images)
    info = _validate(dataset_id, images, tasks, splits, info_extra or {})
    target = root / dataset_id
    if target.exists() and not overwrite:
        raise UserError(f"Dataset folder {target} already exists.", "Pass --overwrite to replace it.")
    writable_dir(root, "--out")
    work = Path(tempfile.mkdtemp(prefix=".medssl-tmp-", dir=root))
    try:
        tmp = work / dataset_id
        (tmp / "task_labels").mkdir(parents=True)
        (tmp / "splits").mkdir()
        write_with(tmp / "images.hdf5", lambda p: _write_hdf5(p, images))
        for t in tasks:
            buf = io.BytesIO()
            np.save(buf, np.asarray(t.values, dtype=np.int64))
            write_bytes(tmp / "task_labels" / f"{t.task_name}.npy", buf.getvalue())
        width = max(6, len(str(len(images) - 1)))
        for name in SPLITS:
            idx = np.sort(np.asarray(splits.get(name, []), dtype=np.int64))
            if len(idx):  # like the official writer: no file for an empty split
                write_text(
                    tmp / "splits" / f"{name}.txt", "\n".join(f"images/{i:0{width}d}.tiff" for i in idx)
                )
        write_yaml(tmp / "info.yaml", info)  # last: a folder with info.yaml is a complete dataset
        old = work / "previous"
        if target.exists():
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old.exists():
                os.rename(old, target)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_hdf5(path: Path, images: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:  # no chunks, no compression: contiguous, memory-mappable
        f.create_dataset("images", data=images)


def _validate(
    dataset_id: str, images: np.ndarray, tasks: list[TaskSpec], splits: dict[str, Any], extra: dict
) -> dict:
    """Check the arrays against the format and return the info.yaml dict."""
    if not dataset_id or "/" in dataset_id or dataset_id.startswith("."):
        raise ValueError(f"bad dataset id {dataset_id!r}")
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"images must be uint8 (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}")
    n = len(images)
    if n == 0 or not tasks or len({t.task_name for t in tasks}) != len(tasks):
        raise ValueError("need at least one image and one task, with unique task names")
    for t in tasks:
        v = np.asarray(t.values)
        if not t.task_name or "/" in t.task_name or t.task_target not in TARGETS or len(v) != n:
            raise ValueError(f"bad task {t.task_name!r}: name, target or {len(v)} values for {n} images")
        if v.ndim == 1 and t.task_target != "REGRESSION" and not set(np.unique(v).tolist()) <= set(t.labels):
            raise ValueError(f"task {t.task_name!r} has values outside its labels")
    if not set(splits) <= set(SPLITS):
        raise ValueError(f"unknown splits {sorted(set(splits) - set(SPLITS))}")
    idx = np.concatenate([np.asarray(splits[s], dtype=np.int64).ravel() for s in splits] or [[]])
    if len(idx) and (idx.min() < 0 or idx.max() >= n or len(np.unique(idx)) != len(idx)):
        raise ValueError("split indices must be disjoint and within [0, N)")
    derived = ("id", "input_size", "tasks", "splits_num_samples", "total_num_samples")
    if clash := sorted(set(extra) & set(derived)):
        raise ValueError(f"info_extra may not set {clash}")
    h, w = images.shape[1:3]
    info: dict[str, Any] = {"id": dataset_id, "name": dataset_id, "domain": "Unknown"}
    info.update({k: extra[k] for k in ("name", "domain", "summary", "description") if k in extra})
    info["input_size"] = [1 if images.ndim == 3 else 3, int(h), int(w)]
    info["tasks"] = [
        {
            "task_name": t.task_name,
            "task_target": t.task_target,
            "labels": {int(k): str(v) for k, v in t.labels.items()},
        }
        for t in tasks
    ]
    info["splits_num_samples"] = {s: int(len(splits.get(s, []))) for s in SPLITS}
    info["total_num_samples"] = n
    info.update({k: v for k, v in extra.items() if k not in info})
    return info
