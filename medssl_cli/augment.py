"""Barlow Twins views on batches of uint8 tensors, with per-sample random parameters.

Every op draws its parameters for the whole batch at once and runs as a few batched tensor kernels on
the input's device: no PIL, no per-image Python loop, no host syncs (no ``.item()``/``.cpu()``), so the
same code serves CPU and CUDA. One ``torch.rand(B, 50)`` draw per view feeds all ops, so a seeded
``torch.Generator`` (on the input's device) reproduces the views exactly, and switching one op off does
not change the random parameters of the others.

Pipeline (Zbontar et al. 2021, appendix; BYOL's augmentations), in this order:

1. RandomResizedCrop + horizontal flip, fused into one ``affine_grid``/``grid_sample`` (bilinear,
   border clamp) per pyramid level. Crop boxes follow torchvision's sampling: 10 attempts of area
   scale ~ U(scale) and aspect ratio log-uniform in ``ratio``, integer box sizes, else its centre-crop
   fallback. Antialiasing: a 2x area-averaged pyramid (mipmap) of the batch is built when the source is
   at least twice ``out_size``; each sample reads the coarsest level at which its crop's shorter side is
   still >= ``out_size``, so bilinear never downsamples by 2x or more (no aliasing from large crops).
2. Colour jitter with probability ``jitter_p``, factors as torchvision's ColorJitter (brightness,
   contrast, saturation ~ U[max(0, 1-a), 1+a], hue ~ U[-h, h]) in a FIXED order brightness, contrast,
   saturation, hue (torchvision permutes per image; a fixed order keeps it sync-free and the ops nearly
   commute). 1-channel data: brightness and contrast only.
3. Grayscale with probability ``grayscale_p`` (3-channel only; torchvision's luma weights).
4. Gaussian blur with probability ``blur_p``, sigma ~ U(blur_sigma) given at 224 px and scaled by
   ``out_size / 224``; separable, reflect-padded, one kernel size (radius ceil(3 sigma_max)) for the
   batch with per-sample weights, run as a grouped conv over batch x channels.
5. Solarize with probability ``solarize_p``: pixels >= 0.5 become 1 - x.

Output: float32 in [0, 1]; ``normalize`` is separate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import UserError
from .recipe import ViewRecipe, ViewsRecipe

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
BLUR_REF_SIZE = 224  # blur_sigma is given in pixels at this image size

# Column layout of the per-view uniform draw (B, _N_UNIFORM).
_ATTEMPTS = 10
_U_SCALE, _U_RATIO, _U_TOP, _U_LEFT = (slice(i * _ATTEMPTS, (i + 1) * _ATTEMPTS) for i in range(4))
_U_FLIP, _U_JITTER, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLAR = range(
    4 * _ATTEMPTS, 4 * _ATTEMPTS + 10
)
_N_UNIFORM = 4 * _ATTEMPTS + 10


# --------------------------------------------------------------------------------------------
# Checks


def check_view(cfg: ViewRecipe, name: str = "views.view") -> None:
    """Raise a UserError naming the recipe key if a view setting is out of range."""

    def pair(key: str, lo_min: float, hi_max: float | None) -> None:
        v = getattr(cfg, key)
        ok = len(v) == 2 and lo_min <= v[0] <= v[1] and (hi_max is None or v[1] <= hi_max)
        if not ok or (key in ("crop_scale", "crop_ratio") and v[0] <= 0):
            bound = f"0 < lo <= hi{f' <= {hi_max}' if hi_max is not None else ''}"
            raise UserError(f"Recipe key '{name}.{key}' must be [lo, hi] with {bound}, got {v}.")

    pair("crop_scale", 0.0, 1.0)
    pair("crop_ratio", 0.0, None)
    pair("blur_sigma", 0.0, None)
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise UserError(f"Recipe key '{name}.{key}' is a probability in [0, 1], got {getattr(cfg, key)}.")
    for key in ("brightness", "contrast", "saturation"):
        if getattr(cfg, key) < 0:
            raise UserError(f"Recipe key '{name}.{key}' must be >= 0, got {getattr(cfg, key)}.")
    if not 0.0 <= cfg.hue <= 0.5:
        raise UserError(f"Recipe key '{name}.hue' must be in [0, 0.5], got {cfg.hue}.")


def _check_input(x: torch.Tensor, out_size: int) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (B, C, H, W) with C in (1, 3), got {x.dtype} {tuple(x.shape)}")
    if out_size < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")


def _rand(x: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, input on {x.device}: use one on the input's")
    return torch.rand(x.shape[0], n, generator=generator, device=x.device)


def _col(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for per-sample broadcasting."""
    return v.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------
# Geometry: RandomResizedCrop + flip


def sample_crop_boxes(
    u: torch.Tensor, height: int, width: int, scale: list[float], ratio: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop boxes (top, left, h, w) as float tensors of integers, torchvision's sampling.

    Up to 10 attempts: area = H*W*U(scale), aspect = exp(U(log ratio)), w = round(sqrt(area*aspect)),
    h = round(sqrt(area/aspect)); the first attempt that fits wins, with top ~ U{0..H-h} and
    left ~ U{0..W-w}. If none fits: the centre crop clamped to the ratio range (torchvision's fallback).
    ``u`` is the (B, 50) uniform block of one view.
    """
    area = float(height * width)
    s = scale[0] + (scale[1] - scale[0]) * u[:, _U_SCALE]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _U_RATIO])
    w = torch.round(torch.sqrt(area * s * aspect))  # round half to even, like Python's round()
    h = torch.round(torch.sqrt(area * s / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    top = torch.floor(u[:, _U_TOP].gather(1, first).squeeze(1) * (height - h + 1))
    left = torch.floor(u[:, _U_LEFT].gather(1, first).squeeze(1) * (width - w + 1))

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    any_ok = ok.any(dim=1)
    h = torch.where(any_ok, h, float(fh))
    w = torch.where(any_ok, w, float(fw))
    top = torch.where(any_ok, top, float((height - fh) // 2))
    left = torch.where(any_ok, left, float((width - fw) // 2))
    return top, left, h, w


def _levels(height: int, width: int, out_size: int) -> int:
    """Number of pyramid levels: level l (size / 2**l) is kept while out_size * 2**l <= min side."""
    n = 1
    while out_size * 2**n <= min(height, width):
        n += 1
    return n


def _half(x: torch.Tensor) -> torch.Tensor:
    """2x area downsample that keeps the image's extent (adaptive pooling handles odd sizes)."""
    return F.adaptive_avg_pool2d(x, (max(1, x.shape[-2] // 2), max(1, x.shape[-1] // 2)))


def resized_crop(
    xf: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    flip: torch.Tensor,
    out_size: int,
) -> torch.Tensor:
    """Crop boxes (pixels) of float images, resized to out_size (bilinear on a mipmap), optionally mirrored.

    align_corners=False maps the box's outer pixel edges to the output's, so a full box at the same
    size is the identity and, when upscaling, this equals bilinear ``F.interpolate``.
    """
    b, c, height, width = xf.shape
    sx = (w / width) * torch.where(flip, -1.0, 1.0)
    sy = h / height
    tx = (2 * left + w) / width - 1
    ty = (2 * top + h) / height - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([sx, zero, tx, zero, sy, ty], dim=1).view(b, 2, 3)
    grid = F.affine_grid(theta, [b, c, out_size, out_size], align_corners=False)

    def sample(img: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)

    y = sample(xf)
    n_levels = _levels(height, width, out_size)
    if n_levels > 1:
        short = torch.minimum(h, w)
        level = sum((short >= out_size * 2**k).to(torch.int64) for k in range(1, n_levels))
        cur = xf
        for k in range(1, n_levels):
            cur = _half(cur)
            y = torch.where(_col(level == k), sample(cur), y)
    return y


# --------------------------------------------------------------------------------------------
# Photometric ops on float [0, 1] batches; factors are (B,) tensors (torchvision's definitions)


def _gray(x: torch.Tensor) -> torch.Tensor:
    wr, wg, wb = GRAY_WEIGHTS
    return wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3]


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * f, clamped to [0, 1]."""
    return (x * _col(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f * x + (1 - f) * mean(gray(x)), clamped; the mean is per image (of the image itself if 1-channel)."""
    if x.shape[1] == 3:
        m = x.mean(dim=(2, 3))
        mean = sum(wt * m[:, i] for i, wt in enumerate(GRAY_WEIGHTS))
    else:
        mean = x.mean(dim=(1, 2, 3))
    f = _col(factor)
    return (f * x + (1 - f) * _col(mean)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f * x + (1 - f) * gray(x), clamped (3-channel)."""
    f = _col(factor)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate hue by f turns (f in [-0.5, 0.5]) in HSV space, keeping saturation and value (3-channel).

    hue sextant h in [0, 6) from the max channel; back to RGB with chroma c = max - min:
    channel_n = v - c * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.amax(dim=1)
    c = v - x.amin(dim=1)
    cs = torch.where(c > 0, c, torch.ones_like(c))  # gray pixels: any hue, c = 0 cancels it
    h = torch.where(v == r, (g - b) / cs, torch.where(v == g, (b - r) / cs + 2, (r - g) / cs + 4))
    h = torch.remainder(h + 6 * factor.view(-1, 1, 1), 6)
    n = 5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(h.unsqueeze(1) + n, 6)
    return (v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma (B,) and a shared kernel of 2*radius+1 taps.

    Weights exp(-t^2 / (2 sigma^2)) normalised to sum 1 (torchvision's kernel), reflect padding. The
    batch and channels become conv groups, so each sample gets its own 1-D kernel in one conv call.
    """
    b, c, height, width = x.shape
    radius = min(radius, height - 1, width - 1)  # reflect padding needs pad < size
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    wts = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3).unsqueeze(1)) ** 2)
    wts = (wts / wts.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, 2r+1)
    k = 2 * radius + 1
    y = F.pad(x.reshape(1, b * c, height, width), (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, wts.view(b * c, 1, 1, k), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, wts.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, height, width)


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _color_jitter(x: torch.Tensor, u: torch.Tensor, cfg: ViewRecipe) -> torch.Tensor:
    """Brightness, contrast (all data), then saturation, hue (3-channel), each on the jittered samples."""
    on = u[:, _U_JITTER] < cfg.jitter_p
    one = torch.ones_like(u[:, 0])

    def factor(col: int, amount: float) -> torch.Tensor:
        return torch.where(on, _uniform(u[:, col], max(0.0, 1.0 - amount), 1.0 + amount), one)

    if cfg.brightness > 0:
        x = adjust_brightness(x, factor(_U_BRIGHT, cfg.brightness))
    if cfg.contrast > 0:
        x = adjust_contrast(x, factor(_U_CONTRAST, cfg.contrast))
    if x.shape[1] == 3:
        if cfg.saturation > 0:
            x = adjust_saturation(x, factor(_U_SAT, cfg.saturation))
        if cfg.hue > 0:
            shifted = adjust_hue(x, _uniform(u[:, _U_HUE], -cfg.hue, cfg.hue))
            x = torch.where(_col(on), shifted, x)  # the HSV round trip is not bit-exact: keep the rest
    return x


# --------------------------------------------------------------------------------------------
# Public entry points


def make_view(
    x: torch.Tensor, cfg: ViewRecipe, out_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One augmented view of a uint8 (B, C, H, W) batch: float32 (B, C, out_size, out_size) in [0, 1]."""
    _check_input(x, out_size)
    check_view(cfg)
    b, c, height, width = x.shape
    u = _rand(x, _N_UNIFORM, generator)

    top, left, h, w = sample_crop_boxes(u, height, width, cfg.crop_scale, cfg.crop_ratio)
    flip = u[:, _U_FLIP] < cfg.flip_p
    y = resized_crop(x.float().div_(255), top, left, h, w, flip, out_size)

    if cfg.jitter_p > 0:
        y = _color_jitter(y, u, cfg)
    if c == 3 and cfg.grayscale_p > 0:
        y = torch.where(_col(u[:, _U_GRAY] < cfg.grayscale_p), _gray(y).expand_as(y), y)
    scale = out_size / BLUR_REF_SIZE
    radius = math.ceil(3 * cfg.blur_sigma[1] * scale)
    if cfg.blur_p > 0 and radius > 0:
        sigma = _uniform(u[:, _U_SIGMA], cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale)
        y = torch.where(_col(u[:, _U_BLUR] < cfg.blur_p), gaussian_blur(y, sigma, radius), y)
    if cfg.solarize_p > 0:
        on = _col(u[:, _U_SOLAR] < cfg.solarize_p) & (y >= 0.5)
        y = torch.where(on, 1 - y, y)
    return y.clamp_(0, 1)


def make_pair(
    x: torch.Tensor, views: ViewsRecipe, out_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of the same batch (view1, view2 recipes), drawn one after the other from ``generator``."""
    check_view(views.view1, "views.view1")
    check_view(views.view2, "views.view2")
    return make_view(x, views.view1, out_size, generator), make_view(x, views.view2, out_size, generator)


def to_float(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """Deterministic eval input: float32 [0, 1], resized to out_size x out_size only if the size differs.

    Same resampling as a full-image crop in ``make_view`` (2x area pyramid, then bilinear), so train
    and eval see identically resized images.
    """
    _check_input(x, out_size)
    xf = x.float().div_(255)
    height, width = xf.shape[-2:]
    if (height, width) == (out_size, out_size):
        return xf
    for _ in range(1, _levels(height, width, out_size)):
        xf = _half(xf)
    return F.interpolate(xf, size=(out_size, out_size), mode="bilinear", align_corners=False)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean[c]) / std[c] per channel; a single value applies to all channels. Returns a new tensor."""
    c = x.shape[1]
    if len(mean) not in (1, c) or len(std) not in (1, c):
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {c} channels")
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return (x - mean[0]) / std[0]
    out = torch.empty_like(x)
    for i in range(c):  # Python scalars per channel: no host-to-device copy of a mean tensor
        out[:, i] = (x[:, i] - mean[i % len(mean)]) / std[i % len(std)]
    return out
