"""Gaussian blur of a batch with one kernel per sample (the Barlow Twins / BYOL blur), two ways.

The 1-D kernel of sample b is w_b(t) = exp(-t^2 / (2 sigma_b^2)) / sum, t = -r..r (torchvision's
``gaussian_blur``), applied along rows and columns with reflection at the borders (``F.pad`` mode
"reflect": index -1 reads 1, index S reads S - 2). Both implementations compute the same sums in a
different order (they agree to ~1e-7):

- ``conv``: batch x channels as the groups of a depthwise conv (reflect pad, 1 x k conv, pad, k x 1
  conv). Few FLOPs: the faster path on a CPU at 224 px.
- ``matmul``: the blur with its reflection as a banded (S, S) matrix G_b per sample, y = G_b x G_b^T,
  two batched matmuls. 2 S / k times the FLOPs, but matmuls instead of a grouped conv with a
  different filter per group, which GPU libraries run far from their memory bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("conv", "matmul")


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2r+1) normalised weights exp(-t^2 / (2 sigma^2)), t = -r..r (torchvision's kernel)."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    wts = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3).unsqueeze(1)) ** 2)
    return wts / wts.sum(dim=1, keepdim=True)


def _fit(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """Reflection needs r < size: trim the (negligible) tails of longer kernels and renormalise."""
    k = kernels.shape[1]
    r = k // 2
    if r < size:
        return kernels
    cut = r - size + 1
    kernels = kernels[:, cut : k - cut]
    return kernels / kernels.sum(dim=1, keepdim=True)


def blur_matrices(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) matrices G with (G v)_i = sum_t w(t) v[reflect(i + t)]: blur + border reflection.

    G = sum_t w(t) M_t, M_t the 0/1 matrix of the reflected shift by t; the M_t are built once per call
    (k S^2 numbers) and combined by one matmul, so nothing depends on atomics or a scatter order.
    """
    k = kernels.shape[1]
    r = k // 2
    i = torch.arange(size, device=kernels.device)
    src = i.view(1, -1) + torch.arange(-r, r + 1, device=kernels.device).view(-1, 1)  # (k, S)
    src = src.abs()
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)  # reflect without repeating the edge
    shifts = (src.unsqueeze(2) == i.view(1, 1, -1)).to(torch.float32)  # (k, S, S) one-hot rows
    return (kernels @ shifts.view(k, size * size)).view(-1, size, size)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor, impl: str = "conv") -> torch.Tensor:
    """Separable blur of (B, C, H, W) with per-sample 1-D kernels (B, 2r+1), reflect padding.

    ``impl``: "conv" (grouped conv) or "matmul" (banded matrices, square images only); see the module
    docstring.
    """
    b, c, height, width = x.shape
    if kernels.shape[1] // 2 < 1:
        return x
    kernels = _fit(kernels, min(height, width))
    if impl == "matmul":
        if height != width:
            raise ValueError(f"matmul blur needs square images, got {height} x {width}")
        g = blur_matrices(kernels, height).unsqueeze(1)  # (B, 1, S, S), shared by the channels
        return g @ x @ g.transpose(-1, -2)
    if impl != "conv":
        raise ValueError(f"blur impl must be one of {IMPLS}, got {impl!r}")
    k = kernels.shape[1]
    r = k // 2
    wts = kernels.repeat_interleave(c, dim=0)  # (B*C, k)
    y = F.pad(x.reshape(1, b * c, height, width), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, wts.view(b * c, 1, 1, k), groups=b * c)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, wts.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, height, width)
