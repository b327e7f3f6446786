"""Frozen-backbone features, extracted once and cached.

``extract`` runs a backbone over uint8 images in batches: eval mode (BatchNorm uses its running
statistics, no update), ``torch.inference_mode``, bf16 autocast and channels_last where ``compute``
says so; features come back as float32 on the CPU. The caller's train/eval mode is restored.

``cached`` stores a split's features under ``<runs root>/.cache/features/<key>.safetensors``, the key
a hash of (backbone weights hash, dataset ids, split, images fingerprint (the rows and a sample of the
pixels: ``Pool.fingerprint``), image size, channels, normalisation, precision). The file is written
atomically and built under an exclusive file lock, so concurrent grid cells (a SLURM array) extract a
split once and never read half a file. A damaged cache file is ignored and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from medssl_cli.barlowtwins.views import normalize, to_float
from medssl_cli.console import progress
from medssl_cli.data.pool import Pool
from medssl_cli.io import write_safetensors
from medssl_cli.models import FEATURE_DIM
from medssl_cli.readout.backbones import LoadedBackbone
from medssl_cli.runtime.compute import autocast

LOG = logging.getLogger("medssl")
FEATURES_VERSION = 1  # bump when extraction changes in a way that changes the numbers
Norm = tuple[Sequence[float], Sequence[float]]


def extract(
    backbone: torch.nn.Module,
    images: torch.Tensor | object,
    norm: Norm,
    *,
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    batch_size: int = 256,
    show_progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """(N, D) float32 CPU features of uint8 images (a (N,C,S,S) tensor or a ``data.images.ImageArray``).

    ``norm`` = (mean, std) per channel; 1-channel images with a 3-value norm are replicated to 3
    channels before normalising (ImageNet init on gray data).
    """
    mean, std = tuple(norm[0]), tuple(norm[1])
    n = len(images)  # type: ignore[arg-type]
    was_training = backbone.training
    backbone.eval()
    out: list[torch.Tensor] = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t0 = time.perf_counter()
    try:
        # No bar at all when hidden: a second live display inside a caller's bar would be an error.
        bar = progress("images") if show_progress else None
        with bar if bar is not None else contextlib.nullcontext(), torch.inference_mode():
            task = bar.add_task(desc, total=n, rate=0.0, info="") if bar is not None else None
            for s in range(0, n, batch_size):
                x = images[s : s + batch_size]  # type: ignore[index]
                if device.type == "cuda" and not x.is_cuda:
                    # From pageable memory the copy would block the host until the GPU is idle: pinned +
                    # non_blocking lets the host prepare the next batch while this one runs.
                    x = x.pin_memory()
                x = to_float(x.to(device, non_blocking=True), x.shape[-1])
                if x.shape[1] == 1 and len(mean) == 3:
                    x = x.expand(-1, 3, -1, -1)
                x = normalize(x, mean, std).contiguous(memory_format=fmt)
                with autocast(device, bf16):
                    f = backbone(x)
                out.append(f.float())  # kept on the device: one copy back at the end, not a sync per batch
                if bar is not None and task is not None:
                    done = min(n, s + batch_size)
                    bar.update(task, completed=done, rate=done / max(time.perf_counter() - t0, 1e-9))
    finally:
        backbone.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out).cpu()


@dataclass
class FeatureSet:
    features: torch.Tensor  # (N, D) float32
    path: Path
    hit: bool  # read from the cache
    seconds: float  # extraction (or read) time


def cache_key(lb: LoadedBackbone, pool: Pool, bf16: bool) -> str:
    blob = {
        "version": FEATURES_VERSION,
        "backbone": lb.key,
        "datasets": pool.dataset_ids,
        "splits": pool.splits,
        "images": pool.fingerprint(),
        "image_size": pool.image_size,
        "channels": pool.channels,
        "mean": list(lb.mean),
        "std": list(lb.std),
        "precision": "bf16" if bf16 else "fp32",
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def cached(
    cache_dir: Path,
    lb: LoadedBackbone,
    pool: Pool,
    *,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    batch_size: int = 256,
    desc: str = "features",
) -> FeatureSet:
    """Features of every image in ``pool`` for backbone ``lb``, from the cache or extracted into it."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(lb, pool, bf16)
    path = cache_dir / f"{key}.safetensors"
    meta = {
        "backbone": lb.key,
        "init": lb.init,
        "datasets": json.dumps(pool.dataset_ids),
        "splits": json.dumps(pool.splits),
        "image_size": str(pool.image_size),
        "precision": "bf16" if bf16 else "fp32",
        "images": pool.fingerprint(),
    }
    t0 = time.perf_counter()
    with open(cache_dir / f"{key}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # waits while another process extracts this split
        try:
            # Only the lock holder writes this key: a temporary of it is an orphan of a killed process.
            for stale in cache_dir.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            feats = _read(path, meta, torch.from_numpy(pool.source_idx.copy()))
            if feats is not None:
                return FeatureSet(feats, path, True, time.perf_counter() - t0)
            module = lb.module.to(
                device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            feats = extract(
                module,
                pool.images,
                (lb.mean, lb.std),
                device=device,
                bf16=bf16,
                channels_last=channels_last,
                batch_size=batch_size,
                desc=desc,
            )
            lb.module.to("cpu", memory_format=torch.contiguous_format)
            tensors = {"features": feats.contiguous(), "source_idx": torch.from_numpy(pool.source_idx.copy())}
            write_safetensors(path, tensors, meta)
            return FeatureSet(feats, path, False, time.perf_counter() - t0)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read(path: Path, meta: dict[str, str], source_idx: torch.Tensor) -> torch.Tensor | None:
    """The cached features when the file is exactly what ``cached`` would write now, else None (rebuilt).

    Checked: its metadata (backbone hash, datasets, splits, size, precision, images fingerprint), its
    image rows, and the features' shape and values (float32, one 512-d row per image, all finite): a
    cache file swapped, edited or written by another version is never served.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = dict(fh.metadata() or {})
        tensors = load_file(str(path))
        feats, rows = tensors["features"], tensors["source_idx"]
    except (SafetensorError, OSError, KeyError):
        LOG.warning(f"Feature cache {path} is unreadable; extracting again.")
        return None
    n = len(source_idx)
    problem = next((f"metadata {k}" for k, v in meta.items() if stored.get(k) != v), None)
    if problem is None and (feats.dtype != torch.float32 or tuple(feats.shape) != (n, FEATURE_DIM)):
        problem = (
            f"features of shape {tuple(feats.shape)} ({feats.dtype}), expected ({n}, {FEATURE_DIM}) float32"
        )
    if problem is None and not torch.equal(rows.to(torch.int64), source_idx.to(torch.int64)):
        problem = "other image rows"
    if problem is None and not bool(torch.isfinite(feats).all()):
        problem = "NaN or infinite features"
    if problem is not None:
        LOG.warning(f"Feature cache {path} does not match ({problem}); extracting again.")
        return None
    return feats
