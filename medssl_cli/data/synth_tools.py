"""Image primitives of the synthetic generators (``synth.py``): numpy only, batched over images.

Per-image parameters broadcast as (m, 1, 1); convolutions are real FFTs on a circular grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def col(a: Any) -> np.ndarray:
    """Per-image parameter (m,) -> (m,1,1) for broadcasting over pixels."""
    return np.asarray(a, dtype=np.float64)[:, None, None]


def sig(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # logistic without overflow


def grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(s) + 0.5) / s * 2 - 1  # pixel centres in [-1, 1]; x right, y down
    return t[None, None, :], t[None, :, None]


def frame(xx, yy, cx, cy, theta, sx, sy):
    """Image coords -> object frame (shifted, rotated by theta, scaled by sx, sy per image)."""
    dx, dy = xx - col(cx), yy - col(cy)
    c, s = np.cos(col(theta)), np.sin(col(theta))
    return (c * dx + s * dy) / col(sx), (-s * dx + c * dy) / col(sy)


def ell(u, v, a, b, soft=0.06, x0=0.0, y0=0.0):
    """Soft filled ellipse (1 inside, 0 outside) of semi-axes a, b centred at (x0, y0)."""
    return sig((1 - np.sqrt(((u - x0) / a) ** 2 + ((v - y0) / b) ** 2)) / soft)


def blur(x: np.ndarray, sigma_px, stretch: float = 1.0, theta=0.0) -> np.ndarray:
    """Gaussian blur via the transfer exp(-2 pi^2 sigma^2 f^2); sigma in pixels, scalar or per image,
    ``stretch`` times longer along the direction ``theta`` (anisotropic: streaks)."""
    s = x.shape[-1]
    fy, fx = np.fft.fftfreq(s)[:, None], np.fft.rfftfreq(s)[None, :]
    c, sn = np.cos(np.reshape(theta, (-1, 1, 1))), np.sin(np.reshape(theta, (-1, 1, 1)))
    f2 = (stretch * (c * fx + sn * fy)) ** 2 + (-sn * fx + c * fy) ** 2
    h = np.exp(-2 * np.pi**2 * np.asarray(sigma_px, dtype=np.float64).reshape(-1, 1, 1) ** 2 * f2)
    return np.fft.irfft2(np.fft.rfft2(x) * h, s=(s, s))


def field(rng, m: int, s: int, sigma_px, stretch: float = 1.0, theta=0.0) -> np.ndarray:
    """Smooth random field with unit std per image (white noise low-passed)."""
    f = blur(rng.standard_normal((m, s, s)), sigma_px, stretch, theta)
    return (f - f.mean((1, 2), keepdims=True)) / (f.std((1, 2), keepdims=True) + 1e-8)


def dots(rng, m, s, density, radius_px, elong=1.0, theta=0.0) -> np.ndarray:
    """Random blobs: Bernoulli(density) impulses convolved with a (rotated, elongated) Gaussian."""
    d = (np.arange(s) + s // 2) % s - s // 2
    dx, dy = d[None, None, :].astype(float), d[None, :, None].astype(float)
    c, sn = np.cos(col(np.broadcast_to(theta, m))), np.sin(col(np.broadcast_to(theta, m)))
    r = col(np.broadcast_to(radius_px, m))
    k = np.exp(-0.5 * (((c * dx + sn * dy) / (r * elong)) ** 2 + ((-sn * dx + c * dy) / r) ** 2))
    imp = (rng.random((m, s, s)) < col(np.broadcast_to(density, m))).astype(float)
    return np.clip(np.fft.irfft2(np.fft.rfft2(imp) * np.fft.rfft2(k), s=(s, s)), 0, 1)


def down(x: np.ndarray, f: int) -> np.ndarray:
    """Box-average f x f pixel blocks of (n, H, W[, C]) images."""
    n, h, w = x.shape[:3]
    return x if f == 1 else x.reshape(n, h // f, f, w // f, f, *x.shape[3:]).mean((2, 4))


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
