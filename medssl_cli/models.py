"""Networks and their weight files: ResNet-18 backbone, Barlow Twins projector, linear head.

Weights are stored as safetensors (a header plus raw tensors, no code), never as pickles: a planted or
damaged file can only fail to load, never run anything. Every file carries str->str metadata
(``backbone_meta``) so a later stage rebuilds the same network (channels, gray handling) or refuses a
file made for another one. ImageNet weights are the one exception: torchvision ships them as a pickle,
read from torch hub's cache with ``torch.load(weights_only=True)`` (tensors only, no code execution).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torchvision
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torchvision.models.resnet import BasicBlock

from medssl_cli.errors import UserError
from medssl_cli.io import write_safetensors

ARCH = "resnet18"
FEATURE_DIM = 512
# Input normalisation after x/255: medssl's own backbones (pretrained or random) see (x - 0.5) / 0.5 per
# channel; torchvision's ImageNet weights see ImageNet's mean and std (what they were trained with).
SSL_MEAN, SSL_STD = 0.5, 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys of the weights metadata that must agree between a file and the network it is loaded into.
CHECKED_KEYS = ("arch", "in_channels", "conv1_channels")
GrayMode = Literal["replicate", "native"]


# --------------------------------------------------------------------------------------------
# Backbone


def _check_channels(in_channels: int, gray_mode: str) -> None:
    if in_channels not in (1, 3):
        raise UserError(f"Images must have 1 or 3 channels, got {in_channels}.")
    if gray_mode not in ("replicate", "native"):
        raise UserError(f"model.gray_mode must be 'replicate' or 'native', got {gray_mode!r}.")


def conv1_channels(in_channels: int, gray_mode: str) -> int:
    """Input channels of the first convolution: 3 unless 1-channel data uses a native 1-channel conv1."""
    return 1 if in_channels == 1 and gray_mode == "native" else 3


class ResNetBackbone(torchvision.models.ResNet):
    """torchvision ResNet-18 without its classifier (``fc = Identity``): images -> 512-d features.

    A subclass rather than a wrapper so the state-dict keys stay torchvision's (``conv1.weight``, ...).
    With ``replicate_gray`` a 1-channel input is repeated to 3 channels before the 3-channel conv1, so
    ImageNet weights apply unchanged.
    """

    def __init__(self, in_channels: int = 3, gray_mode: GrayMode = "replicate") -> None:
        _check_channels(in_channels, gray_mode)
        super().__init__(BasicBlock, [2, 2, 2, 2])  # = torchvision.models.resnet18(weights=None)
        self.fc = nn.Identity()
        self.in_channels = in_channels
        self.gray_mode = gray_mode
        self.replicate_gray = in_channels == 1 and gray_mode == "replicate"
        if conv1_channels(in_channels, gray_mode) == 1:
            self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"backbone built for {self.in_channels} channels got input of shape {tuple(x.shape)}"
            )
        if self.replicate_gray:
            # Keep the memory format the weights use (channels_last when enabled) for the fast conv path.
            cl = self.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = x.expand(-1, 3, -1, -1).contiguous(memory_format=fmt)
        return super().forward(x)


def build_backbone(in_channels: int, gray_mode: GrayMode = "replicate") -> ResNetBackbone:
    """Randomly initialised ResNet-18 backbone (512-d output) for ``in_channels``-channel images."""
    return ResNetBackbone(in_channels, gray_mode)


def backbone_meta(in_channels: int, gray_mode: str, image_size: int) -> dict[str, str]:
    """Metadata for a backbone's weight file (safetensors metadata must be str -> str)."""
    _check_channels(in_channels, gray_mode)
    return {
        "arch": ARCH,
        "in_channels": str(in_channels),
        "conv1_channels": str(conv1_channels(in_channels, gray_mode)),
        "gray_mode": gray_mode,
        "image_size": str(image_size),
        "feature_dim": str(FEATURE_DIM),
    }


# --------------------------------------------------------------------------------------------
# Heads


def check_projector(dims: Iterable[int]) -> None:
    """``model.projector``: at least one layer, every size a positive integer (UserError naming the key)."""
    dims = list(dims)
    if not dims:
        raise UserError(
            "Recipe key 'model.projector' needs at least one layer size, e.g. [2048, 2048, 2048]."
        )
    bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int) or d < 1]
    if bad:
        raise UserError(
            f"Recipe key 'model.projector' must list layer sizes >= 1, got {dims}.",
            "E.g. [2048, 2048, 2048].",
        )


class Projector(nn.Sequential):
    """Barlow Twins projector (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021).

    Layout for ``dims = [d1, ..., dk]`` on ``in_dim`` features: (Linear, BatchNorm1d, ReLU) for every
    layer but the last, then a plain Linear. As in the official implementation no Linear has a bias:
    the hidden ones are followed by BatchNorm (a bias would be cancelled), and the last one feeds the
    loss's affine-free batch standardisation (likewise). Default 512-2048-2048-2048: 9,445,376 params.
    """

    def __init__(self, dims: Iterable[int] = (2048, 2048, 2048), in_dim: int = FEATURE_DIM) -> None:
        dims = list(dims)
        check_projector(dims)
        sizes = [in_dim, *dims]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU()]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        super().__init__(*layers)


class PretrainNet(nn.Module):
    """Backbone followed by projector: images -> embeddings for the Barlow Twins loss."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def build_pretrain_net(in_channels: int, gray_mode: GrayMode, projector: Iterable[int]) -> PretrainNet:
    return PretrainNet(build_backbone(in_channels, gray_mode), Projector(projector))


class LinearHead(nn.Linear):
    """Linear read-out on frozen or fine-tuned features: 512 x n_classes + n_classes parameters."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__(in_dim, n_classes)


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# ImageNet weights (torchvision's ResNet18_Weights.IMAGENET1K_V1), from the local cache only

IMAGENET_WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


def imagenet_cache_path() -> Path:
    """Where torch hub caches torchvision's ResNet-18 ImageNet weights (honours TORCH_HOME)."""
    filename = os.path.basename(urlparse(IMAGENET_WEIGHTS.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _check_sha256(path: Path) -> str:
    """torch hub's convention: the file name ends in ``-<sha256 prefix>.pth``; verify it."""
    m = re.search(r"-([a-f0-9]+)\.", path.name)
    if not m:
        return "not checked"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(m.group(1)):
        raise UserError(
            f"ImageNet weights file {path} is damaged (its sha256 does not start with {m.group(1)}).",
            f"Delete it and copy a fresh download of {IMAGENET_WEIGHTS.url} there.",
        )
    return m.group(1)


def load_imagenet_backbone(
    in_channels: int, gray_mode: GrayMode = "replicate", path: Path | None = None, check_hash: bool = True
) -> tuple[ResNetBackbone, dict[str, str]]:
    """ResNet-18 backbone with torchvision's IMAGENET1K_V1 weights, read from torch hub's cache.

    Never downloads (the machines have no internet). For 1-channel data, "replicate" keeps the RGB
    conv1 (the forward repeats gray to RGB); "native" sums conv1's weights over the RGB input
    channels, which gives exactly the same output on a gray image repeated to RGB. Returns the backbone
    and a str->str record of what was done, for the run's metadata.
    """
    _check_channels(in_channels, gray_mode)
    path = Path(path) if path is not None else imagenet_cache_path()
    if not path.is_file():
        raise UserError(
            f"ImageNet weights not found at {path} (no download: this machine may have no internet).",
            f"On a machine with internet download {IMAGENET_WEIGHTS.url} and copy it to that path, "
            "or set TORCH_HOME to a directory whose hub/checkpoints/ holds it.",
        )
    sha = _check_sha256(path) if check_hash else "not checked"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable pickle: corrupt, truncated, or not a state dict
        raise UserError(
            f"ImageNet weights file {path} cannot be read ({type(exc).__name__}).",
            f"Replace it with a fresh download of {IMAGENET_WEIGHTS.url}.",
        ) from None
    dropped = [k for k in state if k.startswith("fc.")]
    for k in dropped:
        del state[k]
    if conv1_channels(in_channels, gray_mode) == 1:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
        conv1_note = "summed over the RGB input channels (1-channel conv1)"
    elif in_channels == 1:
        conv1_note = "kept RGB; gray input repeated to 3 channels"
    else:
        conv1_note = "kept RGB"
    backbone = build_backbone(in_channels, gray_mode)
    _load_state(backbone, state, str(path))
    info = {
        "init": "imagenet",
        "weights": f"torchvision ResNet18_Weights.IMAGENET1K_V1 ({IMAGENET_WEIGHTS.url})",
        "file": str(path),
        "sha256_prefix": sha,
        "conv1": conv1_note,
        "dropped": ", ".join(dropped) or "none",
    }
    return backbone, info


# --------------------------------------------------------------------------------------------
# Our weight files: safetensors with metadata


def save_weights(
    path: str | os.PathLike[str],
    module_or_state: nn.Module | Mapping[str, torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """Write a module's (or a state dict's) tensors and ``metadata`` as safetensors, atomically."""
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata must map str to str, got {bad!r}")
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    # safetensors wants contiguous CPU tensors (channels_last weights are stored in the standard layout).
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    write_safetensors(path, tensors, dict(metadata))


def load_weights(
    path: str | os.PathLike[str], expect: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors weight file: (state dict on CPU, metadata).

    Anything that is not a complete safetensors file is a UserError; nothing in the file is ever
    executed. With ``expect``, its ``CHECKED_KEYS`` (arch, in_channels, conv1_channels) must match the
    file's metadata; other keys of ``expect`` (e.g. image_size) are ignored.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"Weights file not found: {p}.", "Check the run directory, or re-run the stage that writes it."
        )
    try:
        with safe_open(str(p), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError):
        raise UserError(
            f"{p} is not a safetensors file (truncated or wrong format); re-run the stage that wrote it."
        ) from None
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(
            f"{p} holds NaN or infinite values in {len(bad)} tensor(s) (e.g. {bad[0]}).",
            "The weights are damaged or came from a diverged run: re-run the stage that wrote them.",
        )
    for key in CHECKED_KEYS:
        if expect is not None and key in expect and metadata.get(key) != expect[key]:
            got, want = metadata.get(key), expect[key]
            raise UserError(
                f"{p} holds weights for {key}={got!r}, but this run needs {key}={want!r}.",
                "Use weights made for the same data channels and model.gray_mode.",
            )
    return state, metadata


def _load_state(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load; a mismatch is one short line (torch's own message lists every key, over many lines)."""
    problems = state_problems(module, state)
    if problems:
        raise UserError(
            f"Weights in {source} do not fit the {ARCH} network: {problems}.",
            "Use weights written by medssl for the same architecture and channels.",
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise UserError(f"Weights in {source} do not fit the network: {' '.join(first)}") from None


def state_problems(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """How ``state`` differs from ``module``'s keys and shapes, in one line ("" when it fits)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    return "; ".join(
        f"{label} {len(keys)} (e.g. {keys[0]})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
        if keys
    )


def load_backbone(
    path: str | os.PathLike[str], in_channels: int, gray_mode: GrayMode
) -> tuple[ResNetBackbone, dict[str, str]]:
    """Backbone rebuilt from a weight file written by ``save_weights`` (checked against the data)."""
    expect = backbone_meta(in_channels, gray_mode, 0)
    state, metadata = load_weights(path, expect)
    backbone = build_backbone(in_channels, gray_mode)
    _load_state(backbone, state, str(path))
    return backbone, metadata
