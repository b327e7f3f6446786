"""Official split files, read and checked by medssl (not by ``mimeta``, which turns every problem into
"split not found", a traceback, or a silent wrap-around).

Format (MIMeta): ``splits/{train,val,test}.txt``, one image per line as ``images/000123.tiff``; only the
number matters (``mimeta`` parses ``int(line.split("/")[-1].split(".")[0])``). Blank lines are skipped
(editors add them). Anything else is refused with the file and line number: a line without an image
number, a negative number, a number beyond the images stored, the same image twice. Rows come back
sorted, as ``mimeta`` returns them. ``check_disjoint`` refuses a dataset whose split files share images:
a test image in a train split would end up in pretraining and in the probe's training set.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medssl_cli.errors import UserError

SPLITS = ("train", "val", "test")
_ID = re.compile(r"^(?:.*/)?(-?\d+)(?:\.[A-Za-z0-9]+)?$")  # images/000123.tiff, 000123.tiff, 123
_FIX = "Restore the split files from the MIMeta download (one 'images/NNNNNN.tiff' line per image)."


def split_file(folder: Path, split: str) -> Path:
    return Path(folder) / "splits" / f"{split}.txt"


def read_split(folder: Path, split: str, n_images: int) -> np.ndarray:
    """Sorted unique int64 rows of ``split``; a missing, unreadable or malformed file is a UserError."""
    path = split_file(folder, split)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a split file.", _FIX)
    if not path.is_file():
        raise UserError(
            f"Dataset {Path(folder).name} has no '{split}' split ({path} is missing).",
            "Use the official MIMeta folder, or choose other --splits.",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text.", _FIX) from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror}).", _FIX) from None
    rows: list[int] = []
    first_line: dict[int, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        m = _ID.match(line)
        if m is None:
            bad = line if len(line) <= 60 else line[:57] + "..."
            raise UserError(f"{path}, line {number}: '{bad}' names no image number.", _FIX)
        row = int(m.group(1))
        if row < 0:  # mimeta would index from the end: the wrong image, silently
            raise UserError(f"{path}, line {number}: negative image number {row}.", _FIX)
        if row >= n_images:
            raise UserError(
                f"{path}, line {number}: image {row} is beyond the {n_images} images stored "
                f"(ids 0-{n_images - 1}).",
                _FIX,
            )
        if row in first_line:
            raise UserError(
                f"{path}, line {number}: image {row} is listed twice (first on line {first_line[row]}).", _FIX
            )
        first_line[row] = number
        rows.append(row)
    return np.sort(np.asarray(rows, dtype=np.int64))


def check_disjoint(folder: Path, n_images: int) -> None:
    """Refuse a dataset whose split files share images (one line naming the files and the count)."""
    present = [s for s in SPLITS if split_file(folder, s).exists()]  # a directory there is refused
    rows = {s: read_split(folder, s, n_images) for s in present}
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            shared = np.intersect1d(rows[a], rows[b], assume_unique=True)
            if len(shared):
                raise UserError(
                    f"{split_file(folder, a)} and {split_file(folder, b)} share {len(shared)} image(s) "
                    f"(e.g. {', '.join(str(r) for r in shared[:3])}): one split's images would leak into the "
                    "other.",
                    "Restore the official split files; splits must not overlap.",
                )
