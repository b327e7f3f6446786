"""Photometric ops of the Barlow Twins views on float [0, 1] batches, IN PLACE (trailing underscore;
``views.make_view`` owns its buffers). Factors are (B,) tensors; definitions as torchvision's
``adjust_*`` and ``solarize``.

On this CPU build fresh large tensors cost page faults, and boolean masks, torch.where and index ops
(max with indices, argmax, gather) are 5-50x slower than float arithmetic: so per-sample on/off is an
identity factor or a 0/1 lerp weight, and masks are built from float sign().
"""

from __future__ import annotations

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def _col(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for per-sample broadcasting."""
    return v.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    wr, wg, wb = GRAY_WEIGHTS
    return (x[:, 0:1] * wr).add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def adjust_brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * f, clamped to [0, 1]."""
    return x.mul_(_col(factor)).clamp_(0, 1)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f * x + (1 - f) * mean(gray(x)), clamped; the mean is per image (of the image itself if 1-channel)."""
    if x.shape[1] == 3:
        m = x.mean(dim=(2, 3))
        mean = sum(wt * m[:, i] for i, wt in enumerate(GRAY_WEIGHTS))
    else:
        mean = x.mean(dim=(1, 2, 3))
    return x.mul_(_col(factor)).add_(_col((1 - factor) * mean)).clamp_(0, 1)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f * x + (1 - f) * gray(x), clamped (3-channel)."""
    gray = _gray(x).mul_(_col(1 - factor))
    return x.mul_(_col(factor)).add_(gray).clamp_(0, 1)


def adjust_hue_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate hue by f turns (f in [-0.5, 0.5]) in HSV space, keeping saturation and value (3-channel).

    Value v = max, chroma c = max - min, hue sextant h = (G - B) / c if R is the max, else
    (B - R) / c + 2 if G is, else (R - G) / c + 4 (ties give the same h). Back to RGB:
    channel_n = v - c * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1 for R, G, B
    (the closed form of the HSV-to-RGB sextant table).
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.amax(dim=1)
    c = v - x.amin(dim=1)
    is_r = torch.sign(r - v).add_(1)  # 1 where R is the max (r - v <= 0), else 0
    is_g = torch.sign(g - v).add_(1).mul_(1 - is_r)
    # h * c = C + is_r * (A - C) + is_g * (B - C) with A = G - B, B = B - R + 2c, C = R - G + 4c
    hc = (r - g).add_(c, alpha=4)
    hc.addcmul_(is_r, (2 * g - b - r).sub_(c, alpha=4))
    hc.addcmul_(is_g, (b + g - 2 * r).sub_(c, alpha=2))
    h = hc.div_(c.clamp(min=1e-12)).add_(6 * factor.view(-1, 1, 1))  # gray: c = 0 cancels h below
    n = 5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = h.unsqueeze(1) + n
    q = torch.mul(k, 1 / 6).floor_()
    k.sub_(q, alpha=6)  # mod 6 (torch.remainder is slow on CPU)
    tri = torch.minimum(k, torch.neg(k, out=q).add_(4), out=q).clamp_(0, 1)
    return torch.addcmul(v.unsqueeze(1), c.unsqueeze(1), tri, value=-1, out=x)


def solarize_(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Pixels >= 0.5 become 1 - x in samples where ``on`` (B,) is true: x - on * relu(2x - 1)."""
    return x.addcmul_(torch.relu_(x * 2 - 1), _col(on.to(x.dtype)), value=-1)
