"""Fast, exact uint8 access to ``images.hdf5``.

MIMeta writes ``images.hdf5`` as one contiguous, uncompressed uint8 dataset, so we memory-map it
at the file offset that h5py reports and read rows with numpy (sorted blocks: sequential I/O), instead
of ``mimeta``'s one-PIL-image-per-item path (1-3 ms each). Pixels are byte-identical to what
``mimeta.MIMeta`` items give (its PIL gray<->RGB conversion is reproduced exactly); a test proves it.

Images are resized once to the recipe's size. ``ImageArray`` is what the stages consume: either all
images in RAM as one (N, C, S, S) uint8 tensor, or, above the RAM budget, a lazy view that reads and
resizes blocks on demand from the memory map (CRC's 16 GB never has to fit in RAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from medssl_cli.errors import UserError

BLOCK = 1024  # rows per read/resize block: bounds the float32 working memory of a resize


@dataclass(frozen=True)
class H5Images:
    """The ``images`` dataset of one ``images.hdf5``: file offset, shape; read with numpy."""

    path: Path
    shape: tuple[int, ...]
    offset: int | None  # None: chunked/compressed (not the official format) -> read through h5py

    @property
    def channels(self) -> int:
        return 1 if len(self.shape) == 3 else int(self.shape[3])

    def memmap(self) -> np.ndarray:
        assert self.offset is not None
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=self.shape)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order) as (n, H, W[, 3]) uint8, read in sorted order."""
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        if self.offset is not None:
            data = np.asarray(self.memmap()[sorted_idx])
        else:
            with h5py.File(self.path, "r") as f:
                uniq, inv = np.unique(sorted_idx, return_inverse=True)
                data = f["images"][uniq][inv]
        out = np.empty_like(data)
        out[order] = data
        return out


def open_h5(path: Path, n_labels: int | None = None) -> H5Images:
    """Open and check ``images.hdf5`` (exists, HDF5, uint8, row count matches the labels)."""
    fix = "Re-download the dataset (or re-run `medssl data synth`)."
    if not path.is_file():
        raise UserError(f"{path} is missing.", fix)
    try:
        with h5py.File(path, "r") as f:
            if "images" not in f:
                raise UserError(f"{path} has no 'images' dataset.", fix)
            d = f["images"]
            shape, dtype = tuple(int(s) for s in d.shape), d.dtype
            offset = d.id.get_offset() if d.chunks is None and d.compression is None else None
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or corrupt).", fix) from None
    if dtype != np.uint8:
        raise UserError(f"{path}: images are {dtype}, MIMeta stores uint8.", fix)
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 3):
        raise UserError(f"{path}: images have shape {shape}; expected (N, H, W) or (N, H, W, 3).", fix)
    if 0 in shape:  # no images, or images of zero height/width
        raise UserError(f"{path}: images have shape {shape}; none can be read.", fix)
    if offset is not None and path.stat().st_size < offset + int(np.prod(shape)):
        raise UserError(f"{path} is truncated (shorter than its {shape[0]} images).", fix)
    if n_labels is not None and n_labels != shape[0]:
        raise UserError(f"{path} holds {shape[0]} images but the task labels list {n_labels}.", fix)
    return H5Images(path, shape, offset)


def to_chw(rows: np.ndarray, channels: int) -> torch.Tensor:
    """(n, H, W[, 3]) uint8 -> (n, C, H, W) uint8 with ``channels`` channels.

    RGB -> gray uses PIL's integer ITU-R 601-2 luma (what ``mimeta`` does via ``Image.convert('L')``);
    gray -> RGB replicates.
    """
    if rows.ndim == 3:
        t = torch.from_numpy(np.ascontiguousarray(rows)).unsqueeze(1)
        return t.expand(-1, 3, -1, -1).contiguous() if channels == 3 else t
    t = torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2)
    if channels == 3:
        return t.contiguous()
    r, g, b = (t[:, i].to(torch.int32) for i in range(3))
    gray = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    return gray.to(torch.uint8).unsqueeze(1)


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (n, C, H, W) uint8 to ``size`` with antialiased bilinear interpolation (no-op if equal)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def read_images(
    h5: H5Images, idx: np.ndarray, size: int, channels: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``idx`` as (n, channels, size, size) uint8, converted and resized in blocks (into ``out``)."""
    if out is None:
        out = torch.empty((len(idx), channels, size, size), dtype=torch.uint8)
    for start in range(0, len(idx), BLOCK):
        sl = slice(start, start + BLOCK)
        out[sl] = resize_uint8(to_chw(h5.rows(idx[sl]), channels), size)
    return out


class ImageArray:
    """Pooled images as (N, C, S, S) uint8: in RAM, or read lazily from memory maps.

    ``arr[idx]`` (idx: LongTensor / ndarray / slice) returns a uint8 tensor either way, so the training
    loops do not care which one they hold.
    """

    def __init__(self, parts: list[tuple[H5Images, np.ndarray]], size: int, channels: int, in_ram: bool):
        self.parts = parts
        self.size = size
        self.channels = channels
        self.offsets = np.cumsum([0] + [len(i) for _, i in parts])
        self.data: torch.Tensor | None = None
        if in_ram and parts:
            # read straight into one tensor: torch.cat of the parts held every image twice at its peak
            self.data = torch.empty((len(self), channels, size, size), dtype=torch.uint8)
            for (h5, i), start in zip(parts, self.offsets[:-1], strict=True):
                read_images(h5, i, size, channels, out=self.data[start : start + len(i)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.channels, self.size, self.size)

    @property
    def in_ram(self) -> bool:
        return self.data is not None

    @property
    def nbytes(self) -> int:
        return len(self) * self.channels * self.size * self.size

    def __getitem__(self, idx: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        if self.data is not None:
            return self.data[idx]
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64)
        out = torch.empty((len(idx), self.channels, self.size, self.size), dtype=torch.uint8)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        for p in np.unique(part):
            sel = np.nonzero(part == p)[0]
            h5, rows = self.parts[p]
            out[torch.from_numpy(sel)] = read_images(
                h5, rows[idx[sel] - self.offsets[p]], self.size, self.channels
            )
        return out
