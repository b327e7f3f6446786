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

import numpy as np

from medssl_cli import __version__
from medssl_cli.data import synth_tools as st
from medssl_cli.data.mimeta_format import SPLITS, TaskSpec, write_mimeta_dataset
from medssl_cli.errors import UserError
from medssl_cli.io import writable_dir

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
MAX_SIZE = 512  # px; the generators hold whole batches in float64 (crc: ~180 bytes per pixel per image)
_PEAK_BYTES_PER_PIXEL = {"organs": 50, "crc": 180}  # measured peak memory per (supersampled) pixel


# ----------------------------------------------------------------------------- organs (CT-like)
def _organ(k: int, u, v, mid, rng) -> np.ndarray:
    """Intensity change of organ class k in its frame (u right, v down, unit ~ half the crop).

    ``mid`` (+-1 per image) is the image side of the body midline: concave sides, hila and the
    spine or mediastinum face it, which is what tells left from right organs.
    """
    m, s = len(mid), u.shape[-1]
    px = s / 64.0
    if k == 0:  # heart: thick bright myocardium ring, blood pool, septum; lungs on both sides
        outer, inner = st.ell(u, v, 0.5, 0.42), st.ell(u, v, 0.33, 0.26, x0=0.04)
        septum = np.exp(-(((u * 0.8 + v * 0.6) / 0.06) ** 2)) * inner
        lungs = st.ell(u, v, 0.3, 0.7, x0=1.0) + st.ell(u, v, 0.3, 0.7, x0=-1.0)
        return 0.3 * (outer - inner) + 0.12 * inner + 0.15 * septum - 0.35 * lungs
    if k in (1, 2):  # lung: dark crescent open towards the midline, bright vessel dots; mediastinum
        lung = np.clip(st.ell(u, v, 0.5, 0.68) - st.ell(u, v, 0.36, 0.5, x0=0.4 * mid), 0, 1)
        vessels = st.dots(rng, m, s, 0.012, 0.9 * px)
        media = st.ell(u, v, 0.22, 0.45, x0=0.9 * mid, y0=0.1)
        return lung * (-0.45 + 0.45 * vessels) + 0.2 * media
    if k == 3:  # liver: big lobed homogeneous blob with thin dark curvy vessels
        phi = np.arctan2(v, u)
        rad = 0.65 * (1 + 0.12 * np.cos(2 * phi + st.col(rng.uniform(0, 6.3, m))) + 0.06 * np.cos(3 * phi))
        blob = st.sig((1 - np.sqrt(u**2 + v**2) / rad) / 0.06)
        vessels = np.exp(-((st.field(rng, m, s, 5 * px) / 0.15) ** 2))
        return blob * (0.16 - 0.18 * vessels)
    if k == 4:  # spleen: small bright comma, fine speckle, concave side medial (image left)
        comma = np.clip(st.ell(u, v, 0.32, 0.5) - st.ell(u, v, 0.25, 0.38, x0=-0.28), 0, 1)
        return comma * (0.22 + 0.05 * st.field(rng, m, s, 0.7 * px))
    if k == 5:  # pancreas: long lobulated band with granular texture
        b = 0.15 * (1 + 0.35 * np.sin(2 * np.pi * 3 * u + st.col(rng.uniform(0, 6.3, m))))
        band = st.sig((1 - np.sqrt((u / 0.65) ** 2 + (v / b) ** 2)) / 0.08)
        return band * (0.12 + 0.16 * st.dots(rng, m, s, 0.05, 0.8 * px))
    if k in (6, 7):  # kidney: bean with bright cortex, hilum notch and spine on the midline side
        bean = np.clip(st.ell(u, v, 0.3, 0.46) - st.ell(u, v, 0.12, 0.16, x0=0.3 * mid), 0, 1)
        medulla = st.ell(u, v, 0.19, 0.32, x0=0.04 * mid)
        spine = st.ell(u, v, 0.2, 0.2, x0=0.85 * mid, y0=0.45)
        spine_core = st.ell(u, v, 0.13, 0.13, x0=0.85 * mid, y0=0.45)
        return 0.3 * bean - 0.2 * bean * medulla + 0.3 * (spine - spine_core) + 0.1 * spine_core
    if k == 8:  # bladder: dark fluid ellipse with thin bright wall; pelvic bones at both lower corners
        out, inn = st.ell(u, v, 0.45, 0.38), st.ell(u, v, 0.4, 0.33)
        bones = sum(st.ell(u, v, 0.18, 0.18, x0=sx, y0=0.7) for sx in (-0.85, 0.85))
        return 0.2 * (out - inn) - 0.14 * inn + 0.35 * bones
    # femoral head: bright cortex disc with trabecular stripes, acetabulum cup on the midline side,
    # neck running laterally downwards
    head, core = st.ell(u, v, 0.32, 0.32), st.ell(u, v, 0.25, 0.25)
    trab = 0.5 + 0.5 * np.sin(2 * np.pi * (3.5 * u + 2.5 * v) + st.col(rng.uniform(0, 6.3, m)))
    cup = np.clip(st.ell(u, v, 0.46, 0.46) - st.ell(u, v, 0.38, 0.38), 0, 1) * st.sig(8 * u * mid)
    neck = st.ell(
        (u + 0.45 * mid) * 0.8 + 0.6 * (v - 0.3), -(u + 0.45 * mid) * 0.6 + 0.8 * (v - 0.3), 0.4, 0.13
    )
    return 0.45 * (head - core) + core * (0.15 + 0.2 * trab) + 0.35 * cup + 0.25 * neck * (1 - head)


def _organ_plane(items: dict, plane: str, size: int, rng) -> np.ndarray:
    """Render every item in one plane; shared item latents, fresh nuisance draws per plane."""
    labels, n = items["labels"], len(items["labels"])
    f = -(-64 // size)  # supersample small sizes (fine textures would alias), then box-average
    s = size * f
    xx, yy = st.grid(s)
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
        u, v = st.frame(xx, yy, cx, cy, theta, sc, sc * stretch)
        side = -1.0 if k in _LEFT else 1.0  # radiological view: patient's left on the image right
        mid = np.full(m, side) if plane != "sagittal" else np.full(m, -1.0)
        delta = _organ(k, u, v, st.col(mid), rng)
        if plane == "sagittal" and (k in _LEFT or k in _RIGHT):
            shown = st.col(rng.random(m) < 0.8)
            mark = st.ell(u, v, 0.24, 0.24, x0=0.7, y0=-0.7)
            if k in _LEFT:
                mark = mark - st.ell(u, v, 0.14, 0.14, x0=0.7, y0=-0.7)
            delta = delta + 0.25 * shown * mark
        body = st.col(items["bg"][idx] + rng.uniform(-0.08, 0.08, m))
        clutter = 0.07 * st.field(rng, m, s, 4 * s / 64)
        for _ in range(3):  # other structures cut by the crop
            a, b = st.col(rng.uniform(0.08, 0.35, m)), st.col(rng.uniform(0.5, 1.5, m))
            bx, by = st.col(rng.uniform(-1, 1, m)), st.col(rng.uniform(-1, 1, m))
            clutter += st.col(rng.uniform(-0.15, 0.15, m)) * st.ell(xx, yy, a, a * b, 0.1, bx, by)
        x = body + st.col(items["gain"][idx] * rng.uniform(0.7, 1.3, m)) * delta + clutter
        x = st.blur(x, rng.uniform(0.3, 1.1, m) * s / 64)
        lo, gain = rng.uniform(-0.15, 0.15, m), rng.uniform(0.75, 1.3, m)  # random CT window
        img[idx] = (x - st.col(lo) - 0.5) * st.col(gain) + 0.5
    img = st.down(img, f)
    return st.to_uint8(img + st.col(rng.uniform(0.01, 0.05, n)) * rng.standard_normal(img.shape))


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
    xx, yy = st.grid(s)
    c, sn = np.cos(st.col(theta)), np.sin(st.col(theta))
    along, across = (c * xx + sn * yy) * 32 / st.col(px), (-sn * xx + c * yy) * 32 / st.col(px)  # pixel-ish
    z = np.zeros((m, s, s))
    if k == 0:  # ADI: large empty polygonal fat cells with thin membranes (Voronoi edges)
        seeds = rng.uniform(-1.2, 1.2, (m, 14, 2, 1, 1))
        d = np.sort(
            np.sqrt((xx[:, None] - seeds[:, :, 0]) ** 2 + (yy[:, None] - seeds[:, :, 1]) ** 2), axis=1
        )
        wall = np.exp(-(((d[:, 1] - d[:, 0]) * 32 / st.col(px) / 1.2) ** 2))
        return 0.2 * wall * st.dots(rng, m, s, 0.01, 1.2 * px), 0.05 + 0.55 * wall
    if k == 1:  # BACK: flat, nearly empty glass, slight gradient or grey haze
        return z + 0.02, 0.04 + 0.03 * st.field(rng, m, s, 12) * 0.5 + st.col(rng.uniform(0, 0.12, m))
    if k == 2:  # DEB: scattered fragments of nuclei and eosin on a pale background
        frag = st.sig((st.field(rng, m, s, 1.5 * px) - 1.6) * 4) * (st.field(rng, m, s, 6) > 0)
        eo = 0.2 + 0.35 * frag * st.col(rng.uniform(0.5, 1.5, m))
        return 0.7 * st.dots(rng, m, s, 0.006, 0.8 * px) + 0.4 * frag, eo
    if k == 3:  # LYM: dense small dark round nuclei
        return 1.3 * st.dots(rng, m, s, 0.05, 1.0 * px), z + 0.15
    if k == 4:  # MUC: pale bluish-pink wisps (level lines of a streaky field)
        wisp = np.exp(-((st.field(rng, m, s, 3 * px, 3.0, theta) / 0.3) ** 2))
        return 0.08 + 0.2 * wisp, 0.08 + 0.2 * wisp
    if k == 5:  # MUS: long parallel eosinophilic fibres with elongated nuclei along them
        fib = 0.5 + 0.5 * np.sin(2 * np.pi * across / 3.0)
        return 0.9 * st.dots(rng, m, s, 0.006, 0.9 * px, 3.5, theta), 0.55 + 0.3 * fib
    if k == 6:  # NORM: glands = rings of nuclei around a pale lumen, in pink stroma
        h, e = 0.6 * st.dots(rng, m, s, 0.004, px), z + 0.45
        for _ in range(3):
            gx, gy = st.col(rng.uniform(-0.8, 0.8, m)), st.col(rng.uniform(-0.8, 0.8, m))
            r = st.col(rng.uniform(0.22, 0.4, m))
            ring = st.ell(xx, yy, r, r * 0.8, 0.08, gx, gy) - st.ell(xx, yy, r * 0.65, r * 0.5, 0.08, gx, gy)
            lumen = st.ell(xx, yy, r * 0.6, r * 0.45, 0.08, gx, gy)
            h = np.maximum(h, ring * (0.5 + 0.8 * st.dots(rng, m, s, 0.08, 0.9 * px)))
            e = e * (1 - lumen) * (1 - 0.5 * ring)
        return h, e
    if k == 7:  # STR: wavy, looser fibres with sparse spindle nuclei
        period, phase = st.col(rng.uniform(12, 24, m)), st.col(rng.uniform(0, 6.3, m))
        warp = 2.5 * np.sin(2 * np.pi * along / period + phase)
        fib = 0.5 + 0.5 * np.sin(2 * np.pi * (across + warp) / 4.0)
        return 0.7 * st.dots(rng, m, s, 0.003, 0.7 * px, 3.0, theta), 0.3 + 0.3 * fib
    # TUM: crowded, large, irregular nuclei (blobs broken by noise)
    nuc = st.dots(rng, m, s, 0.03, 2.0 * px)
    nuc = st.sig((nuc + 0.25 * st.field(rng, m, s, px) - 0.45) * 8)
    return 1.1 * nuc, 0.3 + 0.1 * st.field(rng, m, s, 3)


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
    field = st.field(rng, len(mixed), s, 6 * s / 64)
    rank = ((1 - rng.uniform(0.1, 0.4, len(mixed))) * (s * s - 1)).astype(int)
    cut = np.sort(field.reshape(len(mixed), -1), axis=1)[np.arange(len(mixed)), rank]
    mask = st.sig((field - st.col(cut)) * 6)
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
    od = st.blur(od.transpose(0, 3, 1, 2).reshape(n * 3, s, s), np.repeat(rng.uniform(0.2, 0.8, n), 3))
    rgb = np.exp(-od.reshape(n, 3, s, s).transpose(0, 2, 3, 1)) * st.col(rng.uniform(0.85, 1.0, n))[..., None]
    rgb = st.down(rgb, f)
    rgb += rng.uniform(0.005, 0.03, (n, 1, 1, 1)) * rng.standard_normal(rgb.shape)
    return st.to_uint8(rgb)


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
def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), else None (unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(organs: int, crc: int, size: int) -> None:
    """Refuse a generation whose peak memory would exceed what is available (it would be killed)."""
    s = size * -(-64 // size)  # small sizes are supersampled to 64 px
    need = max(_PEAK_BYTES_PER_PIXEL["organs"] * organs, _PEAK_BYTES_PER_PIXEL["crc"] * crc) * s * s
    free = _available_memory()
    if free is not None and need > free:
        raise UserError(
            f"Generating {organs} organ items and {crc} crc images at --size {size} needs about "
            f"{need / 2**30:.1f} GiB of memory; {free / 2**30:.1f} GiB are available.",
            "Use a smaller --size or fewer --organs/--crc images.",
        )


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
    if size > MAX_SIZE:  # generation works in float64 on whole batches: memory grows with size^2
        raise UserError(
            f"Image size {size} is too large (at most {MAX_SIZE}; MIMeta images are 224 px).",
            f"Use --size {MAX_SIZE} or less.",
        )
    if "organs" in which and organs < 3 * len(ORGAN_LABELS):
        raise UserError(
            f"Need at least {3 * len(ORGAN_LABELS)} organ items, got {organs}.", "Raise --organs."
        )
    if "crc" in which and crc < 3 * len(CRC_LABELS):  # every class in every split needs 3 per class
        raise UserError(f"Need at least {3 * len(CRC_LABELS)} crc images, got {crc}.", "Raise --crc.")
    _check_memory(organs if "organs" in which else 0, crc if "crc" in which else 0, size)
    pre = "synthetic_" if ids == "synthetic" else ""
    plan = [f"{pre}organs_{p}" for p in PLANES] if "organs" in which else []
    plan += [f"{pre}crc"] if "crc" in which else []
    if not overwrite and (taken := [i for i in plan if (root / i).exists()]):
        raise UserError(
            f"Dataset folder(s) already exist under {root}: {', '.join(taken)}.", "Pass --overwrite."
        )
    writable_dir(root, "--out")  # a file or a read-only place: say so before minutes of generating
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
