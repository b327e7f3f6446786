"""Load one or more MIMeta datasets' official splits as one pool of uint8 images (+ labels).

``load_pool`` is the single entry point the stages use. Datasets and tasks are discovered through
``mimeta``; the official ``splits/*.txt`` are read and checked by ``splits.py`` (no overlap between a
dataset's splits), labels by ``checked_labels`` (every one a class index of the task); pixels come
from the fast reader in ``images.py``. Pooled datasets
must agree on channels (or be converted explicitly with ``channels``, which is recorded) and, for
supervised stages, on task and class names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl_cli.data.images import ImageArray, open_h5
from medssl_cli.data.registry import TaskInfo, dataset_folders, pick_task, resolve_names, scan
from medssl_cli.data.splits import SPLITS, check_disjoint, read_split, split_file
from medssl_cli.errors import UserError
from medssl_cli.recipe import Recipe

FINGERPRINT_VERSION = 2  # 1: rows only; 2: rows + a sample of the pixels
FINGERPRINT_SAMPLE = 256  # images hashed into Pool.fingerprint: ~13 MB at 224 px RGB, read in well under 1 s


@dataclass
class Pool:
    root: Path
    dataset_ids: list[str]
    splits: list[str]
    images: ImageArray
    labels: np.ndarray  # int64 (N,); -1 where the stage asked for no labels
    source_ds: np.ndarray  # (N,) index into dataset_ids
    source_split: np.ndarray  # (N,) index into SPLITS
    source_idx: np.ndarray  # (N,) row in the dataset's images.hdf5
    tasks: list[TaskInfo]
    channels: int
    image_size: int
    conversions: list[str] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return self.tasks[0].class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def synthetic(self) -> bool:
        return any(t.synthetic for t in self.tasks)

    def seen(self) -> dict[str, dict[str, list[int]]]:
        """{dataset id: {split: sorted rows}}: exactly which images this pool holds."""
        out: dict[str, dict[str, list[int]]] = {}
        for d, ds in enumerate(self.dataset_ids):
            for s, split in enumerate(SPLITS):
                m = (self.source_ds == d) & (self.source_split == s)
                if m.any():
                    out.setdefault(ds, {})[split] = sorted(int(i) for i in self.source_idx[m])
        return out

    def _rows_blob(self) -> bytes:
        return json.dumps(self.seen(), sort_keys=True).encode()

    def matches(self, recorded: dict[str, Any]) -> bool:
        """Whether a run's recorded provenance (run.json ``data``) names these images. Runs made before
        ``FINGERPRINT_VERSION`` 2 recorded a hash of the rows only: those are compared on the rows."""
        if recorded.get("fingerprint_version", 1) >= FINGERPRINT_VERSION:
            return recorded.get("fingerprint") == self.fingerprint()
        return recorded.get("fingerprint") == hashlib.sha256(self._rows_blob()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """Which images, and what they hold: sha256 of the rows (``seen``) and of up to
        ``FINGERPRINT_SAMPLE`` images spread evenly over the pool, as read (at the pool's size).

        The feature cache, ``pretrain --resume`` and a resumed grid compare it, so other pixels under the
        same ids and rows (regenerated data, another root) do not pass for the old ones. The root's path
        is not part of it: data copied to a node's scratch disk keeps its fingerprint.
        """
        if self._fingerprint is None:
            h = hashlib.sha256(self._rows_blob())
            if len(self):
                spread = np.linspace(0, len(self) - 1, min(len(self), FINGERPRINT_SAMPLE))
                idx = torch.from_numpy(np.unique(spread.round().astype(np.int64)))
                h.update(self.images[idx].contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def provenance(self) -> dict[str, Any]:
        """What goes into run.json: which images were used, and how they were prepared."""
        counts = {ds: {s: len(v) for s, v in sp.items()} for ds, sp in self.seen().items()}
        return {
            "root": str(self.root),
            "datasets": self.dataset_ids,
            "splits": self.splits,
            "task": self.tasks[0].task_name,
            "class_names": self.class_names,
            "n_images": len(self),
            "counts": counts,
            "fingerprint": self.fingerprint(),
            "fingerprint_version": FINGERPRINT_VERSION,
            "channels": self.channels,
            "image_size": self.image_size,
            "conversions": self.conversions,
            "synthetic": {t.dataset_id: t.synthetic for t in self.tasks},
            "in_ram": self.images.in_ram,
        }


def checked_labels(
    all_labels: np.ndarray, rows: np.ndarray, label_file: Path, task: TaskInfo, split: str
) -> np.ndarray:
    """int64 class indices of ``rows`` (first column of a 2-D label file, as ``mimeta``); every value must
    be a class index of the task (0 .. classes-1), else a UserError naming the file and the bad values."""
    lab = np.asarray(all_labels)[rows]
    lab = lab.reshape(len(rows), -1)[:, 0] if lab.ndim > 1 else lab
    k = len(task.class_names)
    if lab.dtype.kind == "f":  # NaN, inf or a fraction is no class index
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(lab) | (lab != np.round(lab))
    else:
        bad = np.zeros(len(lab), bool) if lab.dtype.kind in "iub" else np.ones(len(lab), bool)
    if not bad.any():
        as_int = lab.astype(np.int64)
        bad = (as_int < 0) | (as_int >= k)
    if bad.any():
        values = sorted({str(v) for v in lab[bad].tolist()})
        raise UserError(
            f"{label_file}: {int(bad.sum())} image(s) of the '{split}' split have labels outside the "
            f"{k} classes of task '{task.task_name}' (0-{k - 1} in info.yaml): {', '.join(values[:6])}"
            f"{' ...' if len(values) > 6 else ''}.",
            "Fix the label file, or the task's labels in info.yaml (one name per class index).",
        )
    return lab.astype(np.int64)


def load_pool(
    root: Path,
    names: list[str],
    splits: list[str],
    *,
    task: str | None = None,
    image_size: int,
    channels: str = "auto",
    supervised: bool = True,
    ram_budget_gb: float = 8.0,
) -> Pool:
    """Load ``splits`` of the datasets ``names`` (aliases allowed) as one pool."""
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"Unknown split '{s}'.", f"Splits are {', '.join(SPLITS)}.")
    if len(set(splits)) != len(splits):
        raise UserError(f"Split list {','.join(splits)} names a split twice.", "Name each split once.")
    if not 8 <= image_size <= 1024:
        raise UserError(f"Image size {image_size} is not supported.", "Use a size between 8 and 1024 pixels.")
    folders = dataset_folders(root)
    infos = scan(root, folders)
    ids = resolve_names(names, infos)
    tasks = [pick_task(ds, infos[ds], task, supervised=supervised) for ds in ids]
    if supervised:
        ref = tasks[0]
        for t in tasks[1:]:
            if t.task_name != ref.task_name or t.class_names != ref.class_names:
                raise UserError(
                    f"Cannot pool {ref.dataset_id} and {t.dataset_id}: their label spaces differ "
                    f"('{ref.task_name}': {len(ref.class_names)} classes vs '{t.task_name}': "
                    f"{len(t.class_names)} classes).",
                    "Pool only datasets with the same task and class names.",
                )
    chans = sorted({t.channels for t in tasks})
    conversions: list[str] = []
    if channels == "auto":
        if len(chans) > 1:
            raise UserError(
                f"Datasets {', '.join(ids)} mix {chans[0]}- and {chans[1]}-channel images.",
                "Choose the conversion explicitly with --channels 1 or --channels 3.",
            )
        c = chans[0]
    else:
        c = int(channels)
        conversions = [f"{t.dataset_id}: {t.channels}->{c} channels" for t in tasks if t.channels != c]

    parts, labels, src_ds, src_split, src_idx = [], [], [], [], []
    for d, (ds, t) in enumerate(zip(ids, tasks, strict=True)):
        folder = folders.get(ds, root / ds)
        label_file = folder / "task_labels" / f"{t.task_name}.npy"
        try:
            all_labels = np.load(label_file, allow_pickle=False)
        except (OSError, ValueError):
            raise UserError(f"{label_file} is missing or unreadable.", "Re-download the dataset.") from None
        h5 = open_h5(folder / "images.hdf5")
        if len(all_labels) != h5.shape[0]:
            raise UserError(
                f"{label_file} lists {len(all_labels)} labels but {folder / 'images.hdf5'} holds "
                f"{h5.shape[0]} images.",
                "Re-download the dataset (one of the files is truncated or from another version).",
            )
        check_disjoint(folder, h5.shape[0])  # a test image listed in train would leak
        for split in splits:
            rows = read_split(folder, split, h5.shape[0])
            if not len(rows):
                raise UserError(
                    f"Dataset {ds}'s '{split}' split is empty ({split_file(folder, split)} lists no image).",
                    "Restore the split file, or choose other --splits.",
                )
            lab = checked_labels(all_labels, rows, label_file, t, split) if supervised else None
            parts.append((h5, rows))
            labels.append(lab if lab is not None else np.full(len(rows), -1, dtype=np.int64))
            src_ds.append(np.full(len(rows), d))
            src_split.append(np.full(len(rows), SPLITS.index(split)))
            src_idx.append(rows)
    n = sum(len(r) for _, r in parts)
    need = n * c * image_size * image_size
    in_ram = need <= ram_budget_gb * 2**30
    return Pool(
        root=root,
        dataset_ids=ids,
        splits=list(splits),
        images=ImageArray(parts, image_size, c, in_ram=in_ram),
        labels=np.concatenate(labels),
        source_ds=np.concatenate(src_ds),
        source_split=np.concatenate(src_split),
        source_idx=np.concatenate(src_idx),
        tasks=tasks,
        channels=c,
        image_size=image_size,
        conversions=conversions,
    )


def load_split(recipe: Recipe, root: Path, split: str, datasets: list[str] | None = None) -> Pool:
    """One labelled split of the recipe's datasets (or ``datasets``), as the recipe's data section says."""
    d = recipe.data
    return load_pool(
        root,
        datasets or d.datasets,
        [split],
        task=d.task,
        image_size=d.image_size,
        channels=d.channels,
        supervised=True,
        ram_budget_gb=d.ram_budget_gb,
    )
