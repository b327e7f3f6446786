"""Synthetic datasets in the exact MIMeta on-disk format (mimeta-pytorch 0.0.6).

Written by ``mimeta_format.write_mimeta_dataset`` (the layout is described there).

Generators (numpy only, batched over images, convolutions as real FFTs on a circular grid):
- organs: 11 CT-like classes told apart by structure (thick ring, crescent with vessel dots, lobed
  blob with dark vessels, bean with cortex, lobulated band, bone disc with trabeculae) and by
  lateral context (which side the midline lies on), under random position, scale, rotation, gain,
  window, clutter, blur and noise. One set of items ("patient" x organ) is rendered in three planes.
- crc: 9 H&E-like textures drawn as haematoxylin/eosin densities and turned into RGB with
  Beer-Lambert (I = exp(-OD)) using per-image jittered stain vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UserError
from .mimeta_format import SPLITS, TaskSpec, write_mimeta_dataset

GENERATOR_VERSION = 1
# fmt: off
ORGAN_LABELS = ("heart", "left lung", "right lung", "liver", "spleen", "pancreas", "left kidney",
                "right kidney", "bladder", "left femoral head", "right femoral head")
# fmt: on
CRC_LABELS = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
PLANES = ("axial", "coronal", "sagittal")
# Real organs: 871/156/618 of 1,645, split by CT volume. Real crc: 85,000/15,000/7,180 (79/14/7); the
# test share is raised to 15% so small synthetic sets still give tests enough test images.
ORGAN_FRACTIONS = (0.53, 0.09, 0.38)
CRC_FRACTIONS = (0.71, 0.14, 0.15)
_LEFT, _RIGHT = {1, 6, 9}, {2, 7, 10}  # organ classes with a side
_ALPHA = 0.8
_MIX = 0.5


# ----------------------------------------------------------------------------- shared image tools
def _c(a: Any) -> np.ndarray:
    """Per-image parameter (m,) -> (m,1,1) for broadcasting over pixels."""
    return np.asarray(a, dtype=np.float64)[:, None, None]


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # logistic without overflow


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(s) + 0.5) / s * 2 - 1  # pixel centres in [-1, 1]; x right, y down
    return t[None, None, :], t[None, :, None]


def _frame(xx, yy, cx, cy, theta, sx, sy):
    """Image coords -> object frame (shifted, rotated by theta, scaled by sx, sy per image)."""
    dx, dy = xx - _c(cx), yy - _c(cy)
    c, s = np.cos(_c(theta)), np.sin(_c(theta))
    return (c * dx + s * dy) / _c(sx), (-s * dx + c * dy) / _c(sy)


def _ell(u, v, a, b, soft=0.06, x0=0.0, y0=0.0):
    """Soft filled ellipse (1 inside, 0 outside) of semi-axes a, b centred at (x0, y0)."""
    return _sig((1 - np.sqrt(((u - x0) / a) ** 2 + ((v - y0) / b) ** 2)) / soft)


def _blur(x: np.ndarray, sigma_px, stretch: float = 1.0, theta=0.0) -> np.ndarray:
    """Gaussian blur via the transfer exp(-2 pi^2 sigma^2 f^2); sigma in pixels, scalar or per image,
    ``stretch`` times longer along the direction ``theta`` (anisotropic: streaks)."""
    s = x.shape[-1]
    fy, fx = np.fft.fftfreq(s)[:, None], np.fft.rfftfreq(s)[None, :]
    c, sn = np.cos(np.reshape(theta, (-1, 1, 1))), np.sin(np.reshape(theta, (-1, 1, 1)))
    f2 = (stretch * (c * fx + sn * fy)) ** 2 + (-sn * fx + c * fy) ** 2
    h = np.exp(-2 * np.pi**2 * np.asarray(sigma_px, dtype=np.float64).reshape(-1, 1, 1) ** 2 * f2)
    return np.fft.irfft2(np.fft.rfft2(x) * h, s=(s, s))


def _field(rng, m: int, s: int, sigma_px, stretch: float = 1.0, theta=0.0) -> np.ndarray:
    """Smooth random field with unit std per image (white noise low-passed)."""
    f = _blur(rng.standard_normal((m, s, s)), sigma_px, stretch, theta)
    return (f - f.mean((1, 2), keepdims=True)) / (f.std((1, 2), keepdims=True) + 1e-8)


def _dots(rng, m, s, density, radius_px, elong=1.0, theta=0.0) -> np.ndarray:
    """Random blobs: Bernoulli(density) impulses convolved with a (rotated, elongated) Gaussian."""
    d = (np.arange(s) + s // 2) % s - s // 2
    dx, dy = d[None, None, :].astype(float), d[None, :, None].astype(float)
    c, sn = np.cos(_c(np.broadcast_to(theta, m))), np.sin(_c(np.broadcast_to(theta, m)))
    r = _c(np.broadcast_to(radius_px, m))
    k = np.exp(-0.5 * (((c * dx + sn * dy) / (r * elong)) ** 2 + ((-sn * dx + c * dy) / r) ** 2))
    imp = (rng.random((m, s, s)) < _c(np.broadcast_to(density, m))).astype(float)
    return np.clip(np.fft.irfft2(np.fft.rfft2(imp) * np.fft.rfft2(k), s=(s, s)), 0, 1)


def _down(x: np.ndarray, f: int) -> np.ndarray:
    """Box-average f x f pixel blocks of (n, H, W[, C]) images."""
    n, h, w = x.shape[:3]
    return x if f == 1 else x.reshape(n, h // f, f, w // f, f, *x.shape[3:]).mean((2, 4))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- organs (CT-like)
def _organ(k: int, u, v, mid, rng) -> np.ndarray:
    """Intensity change of organ class k in its frame (u right, v down, unit ~ half the crop).

    ``mid`` (+-1 per image) is the image side of the body midline: concave sides, hila and the
    spine or mediastinum face it, which is what tells left from right organs.
    """
    m, s = len(mid), u.shape[-1]
    px = s / 64.0
    if k == 0:  # heart: thick bright myocardium ring, blood pool, septum; lungs on both sides
        outer, inner = _ell(u, v, 0.5, 0.42), _ell(u, v, 0.33, 0.26, x0=0.04)
        septum = np.exp(-(((u * 0.8 + v * 0.6) / 0.06) ** 2)) * inner
        lungs = _ell(u, v, 0.3, 0.7, x0=1.0) + _ell(u, v, 0.3, 0.7, x0=-1.0)
        return 0.3 * (outer - inner) + 0.12 * inner + 0.15 * septum - 0.35 * lungs
    if k in (1, 2):  # lung: dark crescent open towards the midline, bright vessel dots; mediastinum
        lung = np.clip(_ell(u, v, 0.5, 0.68) - _ell(u, v, 0.36, 0.5, x0=0.4 * mid), 0, 1)
        vessels = _dots(rng, m, s, 0.012, 0.9 * px)
        media = _ell(u, v, 0.22, 0.45, x0=0.9 * mid, y0=0.1)
        return lung * (-0.45 + 0.45 * vessels) + 0.2 * media
    if k == 3:  # liver: big lobed homogeneous blob with thin dark curvy vessels
        phi = np.arctan2(v, u)
        rad = 0.65 * (1 + 0.12 * np.cos(2 * phi + _c(rng.uniform(0, 6.3, m))) + 0.06 * np.cos(3 * phi))
        blob = _sig((1 - np.sqrt(u**2 + v**2) / rad) / 0.06)
        vessels = np.exp(-((_field(rng, m, s, 5 * px) / 0.15) ** 2))
        return blob * (0.16 - 0.18 * vessels)
    if k == 4:  # spleen: small bright comma, fine speckle, concave side medial (image left)
        comma = np.clip(_ell(u, v, 0.32, 0.5) - _ell(u, v, 0.25, 0.38, x0=-0.28), 0, 1)
        return comma * (0.22 + 0.05 * _field(rng, m, s, 0.7 * px))
    if k == 5:  # pancreas: long lobulated band with granular texture
        b = 0.15 * (1 + 0.35 * np.sin(2 * np.pi * 3 * u + _c(rng.uniform(0, 6.3, m))))
        band = _sig((1 - np.sqrt((u / 0.65) ** 2 + (v / b) ** 2)) / 0.08)
        return band * (0.12 + 0.16 * _dots(rng, m, s, 0.05, 0.8 * px))
    if k in (6, 7):  # kidney: bean with bright cortex, hilum notch and spine on the midline side
        bean = np.clip(_ell(u, v, 0.3, 0.46) - _ell(u, v, 0.12, 0.16, x0=0.3 * mid), 0, 1)
        medulla = _ell(u, v, 0.19, 0.32, x0=0.04 * mid)
        spine = _ell(u, v, 0.2, 0.2, x0=0.85 * mid, y0=0.45)
        spine_core = _ell(u, v, 0.13, 0.13, x0=0.85 * mid, y0=0.45)
        return 0.3 * bean - 0.2 * bean * medulla + 0.3 * (spine - spine_core) + 0.1 * spine_core
    if k == 8:  # bladder: dark fluid ellipse with thin bright wall; pelvic bones at both lower corners
        out, inn = _ell(u, v, 0.45, 0.38), _ell(u, v, 0.4, 0.33)
        bones = sum(_ell(u, v, 0.18, 0.18, x0=sx, y0=0.7) for sx in (-0.85, 0.85))
        return 0.2 * (out - inn) - 0.14 * inn + 0.35 * bones
    # femoral head: bright cortex disc with trabecular stripes, acetabulum cup on the midline side,
    # neck running laterally downwards
    head, core = _ell(u, v, 0.32, 0.32), _ell(u, v, 0.25, 0.25)
    trab = 0.5 + 0.5 * np.sin(2 * np.pi * (3.5 * u + 2.5 * v) + _c(rng.uniform(0, 6.3, m)))
    cup = np.clip(_ell(u, v, 0.46, 0.46) - _ell(u, v, 0.38, 0.38), 0, 1) * _sig(8 * u * mid)
    neck = _ell(
        (u + 0.45 * mid) * 0.8 + 0.6 * (v - 0.3), -(u + 0.45 * mid) * 0.6 + 0.8 * (v - 0.3), 0.4, 0.13
    )
    return 0.45 * (head - core) + core * (0.15 + 0.2 * trab) + 0.35 * cup + 0.25 * neck * (1 - head)


def _organ_plane(items: dict, plane: str, size: int, rng) -> np.ndarray:
    """Render every item in one plane; shared item latents, fresh nuisance draws per plane."""
    labels, n = items["labels"], len(items["labels"])
    f = -(-64 // size)  # supersample small sizes (fine textures would alias), then box-average
    s = size * f
    xx, yy = _grid(s)
    pi = PLANES.index(plane)
    # coronal/sagittal: organs look taller (cranio-caudal extent); sagittal hides the left/right axis,
    # so there the side is a weaker cue: a context marker (ring vs filled blob) shown 80% of the time
    stretch = (1.0, 1.3, 1.25)[pi]
    img = np.empty((n, s, s))
    for k in range(len(ORGAN_LABELS)):
        idx = np.flatnonzero(labels == k)
        m = len(idx)
        if not m:
            continue
        sc = items["scale"][idx] * rng.uniform(0.85, 1.15, m)
        theta = rng.uniform(-0.35, 0.35, m)
        cx, cy = rng.uniform(-0.25, 0.25, m), rng.uniform(-0.25, 0.25, m)
        u, v = _frame(xx, yy, cx, cy, theta, sc, sc * stretch)
        side = -1.0 if k in _LEFT else 1.0  # radiological view: patient's left on the image right
        mid = np.full(m, side) if plane != "sagittal" else np.full(m, -1.0)
        delta = _organ(k, u, v, _c(mid), rng)
        if plane == "sagittal" and (k in _LEFT or k in _RIGHT):
            shown = _c(rng.random(m) < 0.8)
            mark = _ell(u, v, 0.24, 0.24, x0=0.7, y0=-0.7)
            if k in _LEFT:
                mark = mark - _ell(u, v, 0.14, 0.14, x0=0.7, y0=-0.7)
            delta = delta + 0.25 * shown * mark
        body = _c(items["bg"][idx] + rng.uniform(-0.08, 0.08, m))
        clutter = 0.07 * _field(rng, m, s, 4 * s / 64)
        for _ in range(3):  # other structures cut by the crop
            a, b = _c(rng.uniform(0.08, 0.35, m)), _c(rng.uniform(0.5, 1.5, m))
            bx, by = _c(rng.uniform(-1, 1, m)), _c(rng.uniform(-1, 1, m))
            clutter += _c(rng.uniform(-0.15, 0.15, m)) * _ell(xx, yy, a, a * b, 0.1, bx, by)
        x = body + _c(items["gain"][idx] * rng.uniform(0.7, 1.3, m)) * delta + clutter
        x = _blur(x, rng.uniform(0.3, 1.1, m) * s / 64)
        lo, gain = rng.uniform(-0.15, 0.15, m), rng.uniform(0.75, 1.3, m)  # random CT window
        img[idx] = (x - _c(lo) - 0.5) * _c(gain) + 0.5
    img = _down(img, f)
    return _to_uint8(img + _c(rng.uniform(0.01, 0.05, n)) * rng.standard_normal(img.shape))


def _organ_items(n: int, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Items = (patient, organ): each patient holds all 11 organs; split by patient (no leak)."""
    if n < 3 * len(ORGAN_LABELS):
        raise UserError(f"Need at least {3 * len(ORGAN_LABELS)} organ items, got {n}.", "Raise --organs.")
    rng = np.random.default_rng([seed, 1000])
    k = len(ORGAN_LABELS)
    n_pat = -(-n // k)
    labels = np.concatenate([rng.permutation(k) for _ in range(n_pat)])[:n]
    patient = np.arange(n) // k
    full = np.arange(n // k)  # patients with every organ: each split gets >= 1 of them
    n_test = max(1, min(round(ORGAN_FRACTIONS[2] * n_pat), len(full) - 2))
    n_val = max(1, min(round(ORGAN_FRACTIONS[1] * n_pat), len(full) - 1 - n_test))
    order = rng.permutation(full)
    test_p, val_p = order[:n_test], order[n_test : n_test + n_val]
    splits = {
        "test": np.flatnonzero(np.isin(patient, test_p)),
        "val": np.flatnonzero(np.isin(patient, val_p)),
    }
    splits["train"] = np.setdiff1d(np.arange(n), np.concatenate([splits["test"], splits["val"]]))
    body = rng.uniform(0.85, 1.15, n_pat)  # patient build and tissue level, shared by its organs
    bg = rng.uniform(0.35, 0.6, n_pat)
    items = {
        "labels": labels,
        "patient": patient,
        "scale": body[patient] * rng.uniform(0.85, 1.15, n),
        "bg": bg[patient],
        "gain": rng.uniform(0.7, 1.3, n),
    }
    return items, splits


# ----------------------------------------------------------------------------- crc (H&E-like)
def _tissue(k: int, rng, m: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin (nuclei, purple) and eosin (stroma, pink) densities of CRC class k."""
    px = s / 64.0 * rng.uniform(0.75, 1.35, m)  # per-image magnification
    theta = rng.uniform(0, np.pi, m)
    xx, yy = _grid(s)
    c, sn = np.cos(_c(theta)), np.sin(_c(theta))
    along, across = (c * xx + sn * yy) * 32 / _c(px), (-sn * xx + c * yy) * 32 / _c(px)  # pixel-ish
    z = np.zeros((m, s, s))
    if k == 0:  # ADI: large empty polygonal fat cells with thin membranes (Voronoi edges)
        seeds = rng.uniform(-1.2, 1.2, (m, 14, 2, 1, 1))
        d = np.sort(
            np.sqrt((xx[:, None] - seeds[:, :, 0]) ** 2 + (yy[:, None] - seeds[:, :, 1]) ** 2), axis=1
        )
        wall = np.exp(-(((d[:, 1] - d[:, 0]) * 32 / _c(px) / 1.2) ** 2))
        return 0.2 * wall * _dots(rng, m, s, 0.01, 1.2 * px), 0.05 + 0.55 * wall
    if k == 1:  # BACK: flat, nearly empty glass, slight gradient or grey haze
        return z + 0.02, 0.04 + 0.03 * _field(rng, m, s, 12) * 0.5 + _c(rng.uniform(0, 0.12, m))
    if k == 2:  # DEB: scattered fragments of nuclei and eosin on a pale background
        frag = _sig((_field(rng, m, s, 1.5 * px) - 1.6) * 4) * (_field(rng, m, s, 6) > 0)
        eo = 0.2 + 0.35 * frag * _c(rng.uniform(0.5, 1.5, m))
        return 0.7 * _dots(rng, m, s, 0.006, 0.8 * px) + 0.4 * frag, eo
    if k == 3:  # LYM: dense small dark round nuclei
        return 1.3 * _dots(rng, m, s, 0.05, 1.0 * px), z + 0.15
    if k == 4:  # MUC: pale bluish-pink wisps (level lines of a streaky field)
        wisp = np.exp(-((_field(rng, m, s, 3 * px, 3.0, theta) / 0.3) ** 2))
        return 0.08 + 0.2 * wisp, 0.08 + 0.2 * wisp
    if k == 5:  # MUS: long parallel eosinophilic fibres with elongated nuclei along them
        fib = 0.5 + 0.5 * np.sin(2 * np.pi * across / 3.0)
        return 0.9 * _dots(rng, m, s, 0.006, 0.9 * px, 3.5, theta), 0.55 + 0.3 * fib
    if k == 6:  # NORM: glands = rings of nuclei around a pale lumen, in pink stroma
        h, e = 0.6 * _dots(rng, m, s, 0.004, px), z + 0.45
        for _ in range(3):
            gx, gy = _c(rng.uniform(-0.8, 0.8, m)), _c(rng.uniform(-0.8, 0.8, m))
            r = _c(rng.uniform(0.22, 0.4, m))
            ring = _ell(xx, yy, r, r * 0.8, 0.08, gx, gy) - _ell(xx, yy, r * 0.65, r * 0.5, 0.08, gx, gy)
            lumen = _ell(xx, yy, r * 0.6, r * 0.45, 0.08, gx, gy)
            h = np.maximum(h, ring * (0.5 + 0.8 * _dots(rng, m, s, 0.08, 0.9 * px)))
            e = e * (1 - lumen) * (1 - 0.5 * ring)
        return h, e
    if k == 7:  # STR: wavy, looser fibres with sparse spindle nuclei
        warp = 2.5 * np.sin(2 * np.pi * along / _c(rng.uniform(12, 24, m)) + _c(rng.uniform(0, 6.3, m)))
        fib = 0.5 + 0.5 * np.sin(2 * np.pi * (across + warp) / 4.0)
        return 0.7 * _dots(rng, m, s, 0.003, 0.7 * px, 3.0, theta), 0.3 + 0.3 * fib
    # TUM: crowded, large, irregular nuclei (blobs broken by noise)
    nuc = _dots(rng, m, s, 0.03, 2.0 * px)
    nuc = _sig((nuc + 0.25 * _field(rng, m, s, px) - 0.45) * 8)
    return 1.1 * nuc, 0.3 + 0.1 * _field(rng, m, s, 3)


def _tissues(labels: np.ndarray, rng, s: int) -> tuple[np.ndarray, np.ndarray]:
    h, e = np.empty((len(labels), s, s)), np.empty((len(labels), s, s))
    for k in range(len(CRC_LABELS)):
        idx = np.flatnonzero(labels == k)
        if len(idx):
            h[idx], e[idx] = _tissue(k, rng, len(idx), s)
    return h, e


def _crc_images(labels: np.ndarray, test: np.ndarray, size: int, rng) -> np.ndarray:
    n, f = len(labels), -(-64 // size)
    s = size * f
    h, e = _tissues(labels, rng, s)
    # real patches often hold some other tissue: in _MIX of them a blob of another class covers
    # 10-40% of the patch (the label stays the majority tissue)
    mixed = np.flatnonzero(rng.random(n) < _MIX)
    other = (labels[mixed] + rng.integers(1, len(CRC_LABELS), len(mixed))) % len(CRC_LABELS)
    h2, e2 = _tissues(other, rng, s)
    field = _field(rng, len(mixed), s, 6 * s / 64)
    rank = ((1 - rng.uniform(0.1, 0.4, len(mixed))) * (s * s - 1)).astype(int)
    cut = np.sort(field.reshape(len(mixed), -1), axis=1)[np.arange(len(mixed)), rank]
    mask = _sig((field - _c(cut)) * 6)
    h[mixed], e[mixed] = h[mixed] * (1 - mask) + h2 * mask, e[mixed] * (1 - mask) + e2 * mask
    # stain vectors (optical density per unit stain in R, G, B), jittered per image; the test split
    # comes from another "centre" (like CRC-VAL-HE-7K): a mild shift towards haematoxylin/purple
    hv = np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.07, (n, 3))
    ev = np.array([0.07, 0.99, 0.11]) + rng.normal(0, 0.07, (n, 3))
    is_test = np.isin(np.arange(n), test)
    hv[is_test] += [0.08, 0.04, -0.04]
    ev[is_test] *= 0.9
    # stain amount: pull each image's mean density part of the way (power ALPHA) to a random target
    # drawn alike for all classes, so mean colour alone says little and texture has to do the work
    target = np.exp(rng.uniform(np.log(0.5), np.log(2.0), (n, 2))) * [0.3, 0.4]
    mean = np.stack([h.mean((1, 2)), e.mean((1, 2))], 1) + 0.02
    amt = 1.6 * (target / mean) ** _ALPHA
    od = h[..., None] * (amt[:, 0, None, None, None] * np.abs(hv)[:, None, None, :])
    od += e[..., None] * (amt[:, 1, None, None, None] * np.abs(ev)[:, None, None, :])
    od = _blur(od.transpose(0, 3, 1, 2).reshape(n * 3, s, s), np.repeat(rng.uniform(0.2, 0.8, n), 3))
    rgb = np.exp(-od.reshape(n, 3, s, s).transpose(0, 2, 3, 1)) * _c(rng.uniform(0.85, 1.0, n))[..., None]
    rgb = _down(rgb, f)
    rgb += rng.uniform(0.005, 0.03, (n, 1, 1, 1)) * rng.standard_normal(rgb.shape)
    return _to_uint8(rgb)


def _stratified(labels: np.ndarray, fractions, rng) -> dict[str, np.ndarray]:
    """Per class: test and val get round(fraction) but at least 1; the rest is train."""
    out = {s: [] for s in SPLITS}
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test, n_val = (max(1, round(f * len(idx))) for f in (fractions[2], fractions[1]))
        out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test : n_test + n_val])
        out["train"].append(idx[n_test + n_val :])
    return {s: np.sort(np.concatenate(v)) for s, v in out.items()}


# ----------------------------------------------------------------------------- entry point
def make_synthetic(
    root: Path,
    *,
    organs: int = 600,
    crc: int = 900,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    which: tuple[str, ...] = ("organs", "crc"),
    ids: str = "synthetic",
) -> list[str]:
    """Write the synthetic organ planes and/or crc under ``root``; returns the ids written.

    ``organs`` is the number of items per plane; ``ids="real"`` uses the real ids (``organs_axial``,
    ..., ``crc``) instead of ``synthetic_*`` (info.yaml still says ``synthetic: true``). Same seed,
    same bytes.
    """
    root = Path(root)
    if unknown := set(which) - {"organs", "crc"}:
        raise UserError(f"Unknown synthetic dataset(s) {sorted(unknown)}.", "Choose from: organs, crc.")
    if ids not in ("synthetic", "real"):
        raise UserError(f"Unknown ids style {ids!r}.", "Use 'synthetic' or 'real'.")
    if size < 16:
        raise UserError(f"Image size {size} is too small.", "Use --size 16 or more.")
    if "crc" in which and crc < 3 * len(CRC_LABELS):  # every class in every split needs 3 per class
        raise UserError(f"Need at least {3 * len(CRC_LABELS)} crc images, got {crc}.", "Raise --crc.")
    pre = "synthetic_" if ids == "synthetic" else ""
    plan = [f"{pre}organs_{p}" for p in PLANES] if "organs" in which else []
    plan += [f"{pre}crc"] if "crc" in which else []
    if not overwrite and (taken := [i for i in plan if (root / i).exists()]):
        raise UserError(
            f"Dataset folder(s) already exist under {root}: {', '.join(taken)}.", "Pass --overwrite."
        )
    about = f"generated by medssl {__version__} (synthetic generator v{GENERATOR_VERSION}, seed {seed})"
    gen = {"name": "medssl.data.synth", "version": GENERATOR_VERSION, "seed": seed, "size": size}
    written = []
    if "organs" in which:
        items, splits = _organ_items(organs, seed)  # checks the count before anything is written
        plane_ids = plan[:3]
        names = dict(enumerate(ORGAN_LABELS))
        for pi, plane in enumerate(PLANES):
            images = _organ_plane(items, plane, size, np.random.default_rng([seed, 2000 + pi]))
            extra = {
                "name": f"Synthetic {plane.capitalize()} Organ Slices",
                "domain": "Synthetic abdominal CT",
                "description": f"Synthetic data {about}: CT-like {plane} slices of 11 organ classes, the "
                "same (patient, organ) items in all three planes, split by patient.",
                "synthetic": True,
                "generator": gen,
                "subject_overlaps": [i for i in plane_ids if i != plane_ids[pi]],
            }
            task = TaskSpec("organ label", "MULTICLASS_CLASSIFICATION", names, items["labels"])
            write_mimeta_dataset(root, plane_ids[pi], images, [task], splits, extra, overwrite=overwrite)
            written.append(plane_ids[pi])
    if "crc" in which:
        rng = np.random.default_rng([seed, 3000])
        labels = rng.permutation(np.arange(crc) % len(CRC_LABELS))
        splits = _stratified(labels, CRC_FRACTIONS, rng)
        images = _crc_images(labels, splits["test"], size, rng)
        extra = {
            "name": "Synthetic Colorectal Cancer Histopathology",
            "domain": "Synthetic histopathology",
            "description": f"Synthetic data {about}: H&E-like patches of 9 tissue classes; the test "
            "split has a mild stain shift (another 'centre').",
            "synthetic": True,
            "generator": gen,
        }
        task = TaskSpec("tissue class", "MULTICLASS_CLASSIFICATION", dict(enumerate(CRC_LABELS)), labels)
        write_mimeta_dataset(root, plan[-1], images, [task], splits, extra, overwrite=overwrite)
        written.append(plan[-1])
    return written
