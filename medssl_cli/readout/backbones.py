"""Backbones for fine-tuning and evaluation: which weights, which input normalisation.

Three initialisations (``finetune.inits``), each a torchvision ResNet-18 without its classifier:

- ``ssl``: a pretrain run's ``weights/backbone.safetensors``; channels, gray handling and the
  normalisation come from the file's metadata (x/255, then (x - 0.5)/0.5 per channel).
- ``imagenet``: torchvision's IMAGENET1K_V1 weights from torch hub's local cache (never downloaded;
  ``models.load_imagenet_backbone`` says where to put the file). Always the 3-channel network with
  ImageNet mean/std; 1-channel data is replicated to 3 channels *before* normalisation, so each
  channel gets ImageNet's own statistics (what the weights were trained with).
- ``random``: He-initialised (torchvision's init) from a seeded RNG, normalisation 0.5/0.5.

``LoadedBackbone.key`` is a content hash of the weights (tensor bytes), so a feature cache keyed by it
can never serve features of other weights, whatever the init.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl_cli.barlowtwins.views import normalize
from medssl_cli.errors import UserError, short
from medssl_cli.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SSL_MEAN,
    SSL_STD,
    build_backbone,
    load_backbone,
    load_imagenet_backbone,
    load_weights,
)
from medssl_cli.runs import Run

INITS = ("ssl", "imagenet", "random")


@dataclass
class LoadedBackbone:
    """A backbone (CPU, eval mode) and how to feed it. ``info`` goes into run.json."""

    module: nn.Module
    init: str
    data_channels: int  # channels of the images we feed
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: str  # content hash of the weights
    info: dict[str, Any]

    @property
    def replicate_input(self) -> bool:
        """1-channel data fed to a 3-channel-normalised network (ImageNet init)."""
        return self.data_channels == 1 and len(self.mean) == 3

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (B, C, S, S) -> the network's normalised input."""
        if self.replicate_input:
            x = x.expand(-1, 3, -1, -1)
        return normalize(x, self.mean, self.std)

    def metadata(self) -> dict[str, str]:
        """str -> str entries that a fine-tuned copy of this backbone carries in its safetensors file."""
        return {
            "init": self.init,
            "norm_mean": json.dumps(list(self.mean)),
            "norm_std": json.dumps(list(self.std)),
            "data_channels": str(self.data_channels),
            "source_key": self.key,
        }


def state_hash(state: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """sha256 (first 16 hex digits) over the sorted keys, dtypes, shapes and bytes of a state dict."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        digest.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _finish(
    module: nn.Module,
    init: str,
    data_channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    info: dict[str, Any],
) -> LoadedBackbone:
    module.eval()
    key = state_hash(module)
    info = {"init": init, **info, "norm_mean": list(mean), "norm_std": list(std), "state_hash": key}
    return LoadedBackbone(module, init, data_channels, tuple(mean), tuple(std), key, info)


def _bad_meta(path: Path, key: str, value: object, want: str) -> UserError:
    return UserError(
        f"{path} has unreadable metadata {key}={short(value)} (expected {want}).",
        "The file was damaged or edited: re-run the stage that wrote it.",
    )


def meta_int(
    meta: Mapping[str, str], key: str, path: Path, default: str, allowed: tuple[int, ...] = ()
) -> int:
    """An integer metadata field of a weights file (UserError naming the file, key and value)."""
    raw = meta.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise _bad_meta(path, key, raw, "an integer") from None
    if value < 0 or (allowed and value not in allowed):
        raise _bad_meta(path, key, raw, " or ".join(map(str, allowed)) if allowed else "a count >= 0")
    return value


def meta_norm(
    meta: Mapping[str, str], key: str, path: Path, channels: int, default: float
) -> tuple[float, ...]:
    """``norm_mean``/``norm_std``: a JSON list of ``channels`` finite numbers (std > 0)."""
    raw = meta.get(key)
    if raw is None:
        return (default,) * channels
    try:
        values = json.loads(raw)
        ok = isinstance(values, list) and len(values) == channels
        out = tuple(float(v) for v in values) if ok else ()
    except (TypeError, ValueError):
        ok, out = False, ()
    if not ok or not all(math.isfinite(v) for v in out) or (key == "norm_std" and min(out) <= 0):
        raise _bad_meta(path, key, raw, f"a JSON list of {channels} finite numbers")
    return out


def meta_gray_mode(meta: Mapping[str, str], path: Path) -> str:
    raw = meta.get("gray_mode", "replicate")
    if raw not in ("replicate", "native"):
        raise _bad_meta(path, "gray_mode", raw, "replicate or native")
    return raw


def meta_list(meta: Mapping[str, str], key: str, path: Path) -> list[str]:
    raw = meta.get(key, "[]")
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad_meta(path, key, raw, "a JSON list of names")
    return value


def from_pretrain_run(run: Run, data_channels: int) -> LoadedBackbone:
    """The ssl backbone of a finished pretrain run (channels and normalisation from its metadata)."""
    path = run.file("weights", "backbone.safetensors")
    _, meta = load_weights(path)
    channels = meta_int(meta, "in_channels", path, "", (1, 3))
    if channels != data_channels:
        raise UserError(
            f"Pretrain run {run.path} was trained on {channels}-channel images, but the fine-tuning data "
            f"has {data_channels} channel(s).",
            "Fine-tune on datasets with the same channels (or set data.channels to match).",
        )
    gray_mode = meta_gray_mode(meta, path)
    module, meta = load_backbone(path, channels, gray_mode)  # type: ignore[arg-type]
    mean = meta_norm(meta, "norm_mean", path, channels, SSL_MEAN)
    std = meta_norm(meta, "norm_std", path, channels, SSL_STD)
    info = {
        "source": str(path),
        "pretrain_run": str(run.path.resolve()),
        "gray_mode": gray_mode,
        "in_channels": channels,
        "pretrain_datasets": meta_list(meta, "datasets", path),
        "pretrain_image_size": meta_int(meta, "image_size", path, "0"),
        "input": "as pretrained",
    }
    return _finish(module, "ssl", data_channels, mean, std, info)


def imagenet(data_channels: int) -> LoadedBackbone:
    """torchvision's ImageNet ResNet-18 (3-channel conv1); 1-channel data is replicated to RGB first."""
    module, meta = load_imagenet_backbone(3, "replicate")
    note = (
        "1-channel data replicated to 3 channels, then ImageNet mean/std"
        if data_channels == 1
        else ("RGB with ImageNet mean/std")
    )
    info = {**meta, "source": meta.get("file", ""), "in_channels": 3, "gray_mode": "replicate", "input": note}
    return _finish(module, "imagenet", data_channels, IMAGENET_MEAN, IMAGENET_STD, info)


def random_init(data_channels: int, gray_mode: str, seed: int) -> LoadedBackbone:
    """A randomly initialised backbone, the same for the same seed (torch's RNG, forked)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_backbone(data_channels, gray_mode)  # type: ignore[arg-type]
    info = {
        "source": f"random init (torchvision's init, seed {seed})",
        "seed": seed,
        "gray_mode": gray_mode,
        "in_channels": data_channels,
        "input": "x/255, (x-0.5)/0.5",
    }
    return _finish(
        module, "random", data_channels, (SSL_MEAN,) * data_channels, (SSL_STD,) * data_channels, info
    )


def from_file(path: Path, data_channels: int) -> LoadedBackbone:
    """A backbone saved by medssl with ``LoadedBackbone.metadata()`` (a fine-tuned or saved random one)."""
    _, meta = load_weights(path)
    channels = meta_int(meta, "in_channels", path, "", (1, 3))
    gray_mode = meta_gray_mode(meta, path)
    module, meta = load_backbone(path, channels, gray_mode)  # type: ignore[arg-type]
    saved_for = meta_int(meta, "data_channels", path, str(channels), (1, 3))
    if saved_for != data_channels:
        raise UserError(f"{path} was made for {saved_for}-channel images; this data has {data_channels}.")
    # norm stats are per fed channel: 3 for the ImageNet init on gray data, else the data's channels
    n_norm = 3 if _list_len(meta.get("norm_mean")) == 3 else channels
    mean = meta_norm(meta, "norm_mean", path, n_norm, SSL_MEAN)
    std = meta_norm(meta, "norm_std", path, n_norm, SSL_STD)
    info = {"source": str(path), "in_channels": channels, "gray_mode": gray_mode}
    return _finish(module, meta.get("init", "?"), data_channels, mean, std, info)


def _list_len(raw: str | None) -> int:
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return -1
    return len(value) if isinstance(value, list) else -1


def load(
    init: str,
    *,
    data_channels: int,
    gray_mode: str = "replicate",
    pretrain_run: Run | None = None,
    seed: int = 0,
) -> LoadedBackbone:
    """The backbone for ``init`` (ssl needs ``pretrain_run``)."""
    if init == "ssl":
        if pretrain_run is None:
            raise UserError(
                "--init ssl needs a pretrain run.", "Pass --from RUN, or run `medssl pretrain` first."
            )
        return from_pretrain_run(pretrain_run, data_channels)
    if init == "imagenet":
        return imagenet(data_channels)
    if init == "random":
        return random_init(data_channels, gray_mode, seed)
    raise UserError(f"Unknown init '{init}'.", f"Choose from {', '.join(INITS)}.")


def require_imagenet() -> None:
    """Check the cached ImageNet weights before anything is written: present (else the offline UserError
    naming the cache file), intact (sha256), tensors only (``weights_only``) and fitting ResNet-18."""
    load_imagenet_backbone(3, "replicate")
