"""`medssl data import`: a user's own images as a MIMeta-format dataset, so every stage works on it.

Sources: a folder with one sub-folder per class (``<src>/<class>/<image>``), or a CSV with columns
``path`` and ``label`` and optionally ``subject`` (patient/volume id) and ``split`` (train/val/test);
relative paths are relative to the CSV's folder. PNG, JPEG, TIFF and BMP are read with Pillow (a
torchvision dependency already); DICOM is not read (convert to PNG first, e.g. with pydicom or
dcm2niix: one line says so). 16-bit images are scaled to 8 bits (value / 257).

Images are resized to ``size`` x ``size`` with medssl's own filter (``images.resize_uint8``: torch's
antialiased bilinear); without ``size`` they must all share one square size. Channels: 1 when every
image is grayscale (or RGB with equal channels), else 3; ``channels`` forces either.

Splits: the CSV's ``split`` column when given (every row, train/val/test); else drawn with a fixed
seed, stratified by class, **by subject** when subject ids exist (all images of a subject in one split)
and by image otherwise, ``val`` and ``test`` fractions of each class (default 15% each, at least one
subject or image per class in every split). The method goes into ``info.yaml`` (``split_method``).

Bad input is one UserError line, and nothing is written: the dataset is built beside the root and
renamed into place (``mimeta_format.write_mimeta_dataset``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medssl_cli.data.images import resize_uint8
from medssl_cli.data.mimeta_format import TaskSpec, write_mimeta_dataset
from medssl_cli.errors import UserError, short

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class Item:
    path: Path
    label: str
    subject: str | None = None
    split: str | None = None


def from_folder(src: Path) -> list[Item]:
    """One sub-folder per class; images directly inside each."""
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [
        Item(f, c.name)
        for c in classes
        for f in sorted(c.iterdir())
        if f.is_file() and not f.name.startswith(".")
    ]
    if not items:
        raise UserError(
            f"{src} holds no images in class sub-folders.", "Lay it out as <folder>/<class>/<image>."
        )
    return items


def from_csv(path: Path) -> list[Item]:
    """Rows of ``path,label[,subject][,split]``."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"Cannot read {path} as a CSV ({type(exc).__name__}).") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise UserError(f"{path} needs a header with 'path' and 'label' columns (optional: subject, split).")
    items = []
    for i, r in enumerate(rows, start=2):
        if not (r.get("path") or "").strip() or not (r.get("label") or "").strip():
            raise UserError(f"{path}, line {i}: empty path or label.")
        p = Path(r["path"].strip())
        items.append(
            Item(
                p if p.is_absolute() else path.parent / p,
                r["label"].strip(),
                (r.get("subject") or "").strip() or None,
                (r.get("split") or "").strip() or None,
            )
        )
    return items


def _check(items: list[Item]) -> None:
    paths = [str(i.path.resolve()) for i in items]
    dup = next((p for p in paths if paths.count(p) > 1), None)
    if dup:
        raise UserError(f"Image {short(dup, 120)} is listed twice.", "List every image once.")
    if len({i.label for i in items}) < 2:
        raise UserError(f"All {len(items)} images have one label ({items[0].label!r}): nothing to classify.")
    given = {i.split for i in items}
    if given != {None} and (None in given or not given <= {"train", "val", "test"}):
        bad = sorted(str(s) for s in given - {"train", "val", "test"})
        raise UserError(f"Split column: every row needs train, val or test (found {bad}).")
    seen: dict[str, str] = {}
    for i in items:
        if i.subject and i.split:
            if seen.setdefault(i.subject, i.split) != i.split:
                raise UserError(
                    f"Subject {i.subject!r} is in two splits ({seen[i.subject]} and {i.split}): its images "
                    "would leak between them.",
                    "Put all images of a subject in one split, or drop the split column.",
                )


def _read(path: Path) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() in DICOM_SUFFIXES:
        raise UserError(
            f"{path} is DICOM, which medssl does not read.",
            "Convert to PNG first (e.g. with pydicom or dcm2niix), then import the PNGs.",
        )
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                return np.clip(a / 257.0, 0, 255).round().astype(np.uint8)
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if "A" in im.mode or im.mode in ("P", "CMYK", "YCbCr") else "L")
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(
            f"Cannot read image {path} ({type(exc).__name__}).", "Remove or replace the file."
        ) from None


def _draw_splits(
    labels: np.ndarray, subjects: list[str], val: float, test: float, seed: int
) -> dict[str, np.ndarray]:
    """Stratified by class; by subject when ``subjects`` has ids (a subject's class: its first image's)."""
    units: dict[str, list[int]] = {}
    for i, s in enumerate(subjects):
        units.setdefault(s, []).append(i)
    by_class: dict[int, list[str]] = {}
    for u, members in units.items():
        by_class.setdefault(int(labels[members[0]]), []).append(u)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c, us in sorted(by_class.items()):
        if len(us) < 3:
            what = "subjects" if len(units) < len(labels) else "images"
            raise UserError(
                f"Class {c} has {len(us)} {what}; every split needs one, so at least 3.",
                "Add images, or give the splits in a CSV split column.",
            )
        order = [us[k] for k in np.random.default_rng([seed, c]).permutation(len(us))]
        n_test = max(1, int(round(test * len(us))))
        n_val = max(1, int(round(val * len(us))))
        if n_test + n_val >= len(us):
            n_test = n_val = 1
        for name, part in (
            ("test", order[:n_test]),
            ("val", order[n_test : n_test + n_val]),
            ("train", order[n_test + n_val :]),
        ):
            out[name] += [i for u in part for i in units[u]]
    return {k: np.sort(np.array(v, dtype=np.int64)) for k, v in out.items()}


def import_images(
    root: Path,
    dataset_id: str,
    *,
    folder: Path | None = None,
    csv_path: Path | None = None,
    size: int | None = None,
    channels: str = "auto",
    domain: str = "Unknown",
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import ``folder`` or ``csv_path`` as ``<root>/<dataset_id>``; returns the dataset folder."""
    if not dataset_id or not all(ch.isalnum() or ch in "_-." for ch in dataset_id) or dataset_id[0] == ".":
        raise UserError(
            f"Dataset id {dataset_id!r}: use letters, digits, '_', '-' and '.'.", "E.g. --id my_xray"
        )
    if (folder is None) == (csv_path is None):
        raise UserError("Give either a folder of class sub-folders or --csv FILE, not both or neither.")
    src = Path(folder or csv_path)  # type: ignore[arg-type]
    if not src.exists():
        raise UserError(f"{src} does not exist.")
    if size is not None and not 8 <= size <= 1024:
        raise UserError(f"--size {size} is not supported.", "Use 8 to 1024 pixels (MIMeta: 224).")
    if channels not in ("auto", "1", "3"):
        raise UserError(f"--channels {channels!r}: use auto, 1 or 3.")
    if not (0 < val < 0.5 and 0 < test < 0.5):
        raise UserError("--val and --test are fractions between 0 and 0.5.")
    items = from_folder(src) if folder is not None else from_csv(src)
    _check(items)
    arrays = [_read(i.path) for i in items]
    shapes = sorted({a.shape[:2] for a in arrays})
    if size is None and (len(shapes) > 1 or shapes[0][0] != shapes[0][1]):
        raise UserError(
            f"The images have {len(shapes)} size(s) (e.g. {shapes[0][1]}x{shapes[0][0]}); without --size "
            "they must share one square size.",
            "Pass --size, e.g. --size 224 (MIMeta's).",
        )
    gray = all(
        a.ndim == 2 or (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]))
        for a in arrays
    )
    c = (1 if gray else 3) if channels == "auto" else int(channels)
    out = np.empty((len(arrays), *(2 * [size or shapes[0][0]]), *([3] if c == 3 else [])), dtype=np.uint8)
    for k, a in enumerate(arrays):
        if c == 1 and a.ndim == 3:  # colour forced to gray: torchvision's luma weights
            a = np.clip(a @ np.array([0.2989, 0.587, 0.114]), 0, 255).round().astype(np.uint8)
        a = a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2)
        x = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)[None]
        x = x[:, :1] if c == 1 else x  # three equal channels here
        y = resize_uint8(x, size) if size is not None else x
        out[k] = y[0, 0].numpy() if c == 1 else y[0].permute(1, 2, 0).numpy()
    names = sorted({i.label for i in items})
    labels = np.array([names.index(i.label) for i in items], dtype=np.int64)
    if items[0].split is not None:
        splits = {
            s: np.array([k for k, i in enumerate(items) if i.split == s], dtype=np.int64)
            for s in ("train", "val", "test")
        }
        method = "given (CSV split column)"
    else:
        subjects = [i.subject or f"image:{k}" for k, i in enumerate(items)]
        by_subject = any(i.subject for i in items)
        splits = _draw_splits(labels, subjects, val, test, seed)
        method = (
            f"drawn by {'subject' if by_subject else 'image'}, stratified by class, val {val:g} / test "
            f"{test:g}, seed {seed}"
        )
    task = TaskSpec("class", "MULTICLASS_CLASSIFICATION", dict(enumerate(names)), labels)
    extra = {
        "domain": domain,
        "description": f"imported by medssl from {src}",
        "split_method": method,
        "source": str(src),
    }
    return write_mimeta_dataset(root, dataset_id, out, [task], splits, extra, overwrite=overwrite)
