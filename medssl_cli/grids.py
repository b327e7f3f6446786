"""Finetune grid bookkeeping: cells, their order, their status, and safe sharing between processes.

A grid is one run directory (``stage: finetune``, ``kind: grid``) with one sub-run per cell under
``cells/<init>-<mode>-f<fraction>-s<seed>/``. Cell order (and so the ``--cell`` index, 0-based) is
fixed: inits x modes x fractions x seeds, in the order the recipe lists them, seeds varying fastest.

Several processes may share one grid (``--grid-dir DIR --cell $SLURM_ARRAY_TASK_ID``):

- creating the grid is race-safe: each process builds the directory under a temporary name and renames
  it into place (atomic; the loser finds the winner's grid). A folder that already exists without a
  run.json (e.g. made for SLURM logs) is adopted by whichever process first creates ``.grid-claim``
  in it (``O_EXCL``); the others wait for its run.json.
- a cell is run under an exclusive, non-blocking lock (``.locks/<cell>.lock``): a cell that another
  process is running is skipped, and a cell whose run.json does not say ``finished`` (a killed run) is
  deleted and run again. The grid's own run.json is only updated under ``.locks/grid.lock``.

Locks are ``flock`` locks: reliable on local disks and on cluster file systems mounted with flock
support; the rename-based creation does not depend on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from medssl_cli.errors import UserError
from medssl_cli.io import read_json, write_json
from medssl_cli.readout.metrics import summarize
from medssl_cli.recipe import FinetuneRecipe
from medssl_cli.runs import Run

CLAIM = ".grid-claim"
WAIT_S = 120.0  # how long a process waits for another one to finish creating a shared grid


@dataclass(frozen=True)
class Cell:
    index: int
    init: str
    mode: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.init}-{self.mode}-f{self.fraction:g}-s{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, **dataclasses.asdict(self)}


def plan_cells(ft: FinetuneRecipe) -> list[Cell]:
    """All cells in their fixed order: inits x modes x fractions x seeds (seeds fastest)."""
    cells = []
    for init in ft.inits:
        for mode in ft.modes:
            for fraction in ft.fractions:
                for seed in ft.seeds:
                    cells.append(Cell(len(cells), init, mode, float(fraction), int(seed)))
    names: dict[str, Cell] = {}
    for c in cells:  # a cell's directory is its name: two cells with one name would share one run
        if c.name in names:
            a, b = names[c.name], c
            raise UserError(
                f"Fractions {a.fraction!r} and {b.fraction!r} name the same cell ({c.name}): fractions must "
                "differ in their first 6 significant digits.",
                "Remove one of them from --fraction.",
            )
        names[c.name] = c
    return cells


def cell_path(grid: Path, cell: Cell) -> Path:
    return Path(grid) / "cells" / cell.name


def cell_status(path: Path) -> str | None:
    """The cell run's status, or None when it never started (or its run.json is unreadable)."""
    try:
        return read_json(path / "run.json").get("status")
    except (FileNotFoundError, ValueError):
        return None


def open_or_create(path: Path, make: Callable[[Path], Run]) -> tuple[Run, bool]:
    """The grid at ``path``, created with ``make(tmp_dir)`` if it is not there yet. Returns (run, created)."""
    path = Path(path)
    if (path / "run.json").is_file():
        return Run(path), False
    try:  # the grid is built beside its final place: that folder must take files
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise UserError(
            f"--grid-dir {path} cannot be created: {path.parent} is not writable ({exc.strerror or exc}).",
            "Pass a --grid-dir inside a writable folder.",
        ) from None
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    make(tmp)
    (tmp / CLAIM).touch()  # so that a process adopting a pre-existing folder never overwrites this grid
    try:
        os.rename(tmp, path)  # atomic; fails if ``path`` exists and is not empty
        return Run(path), True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:  # ``path`` exists: another process won the rename, or the folder was made beforehand
        fd = os.open(path / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
        return _wait_for(path), False
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Grid directory {path} exists and cannot be used ({exc.strerror}).") from None
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == "run.json"):  # run.json last
        if item.name != CLAIM:
            os.replace(item, path / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return Run(path), True


def _wait_for(path: Path) -> Run:
    deadline = time.monotonic() + WAIT_S
    while not (path / "run.json").is_file():
        if time.monotonic() > deadline:
            raise UserError(
                f"{path} is claimed as a grid directory but has no run.json after {WAIT_S:.0f} s.",
                "Remove the folder (or its .grid-claim file) and start again.",
            )
        time.sleep(0.2)
    return Run(path)


@contextlib.contextmanager
def grid_lock(grid: Path) -> Iterator[None]:
    """Exclusive (blocking) lock for read-modify-write of the grid's shared files."""
    locks = Path(grid) / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / "grid.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def try_cell_lock(grid: Path, cell: Cell) -> IO[str] | None:
    """A held non-blocking lock on the cell (release with ``release``), or None if another process has it."""
    locks = Path(grid) / ".locks"
    locks.mkdir(exist_ok=True)
    fh = open(locks / f"{cell.name}.lock", "a+")  # noqa: SIM115 - held while the cell runs
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fh


def release(fh: IO[str]) -> None:
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    fh.close()


def update_grid(grid: Run, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the grid's run.json under the grid lock."""
    with grid_lock(grid.path):
        return grid.update(**fields)


def refresh_status(grid: Run, cells: list[Cell], failed: str | None = None) -> str:
    """Count finished cells; the grid is ``finished`` when all are. Returns the grid's status."""
    with grid_lock(grid.path):
        done = [c.name for c in cells if cell_status(cell_path(grid.path, c)) == "finished"]
        fields: dict[str, Any] = {"cells_finished": len(done), "cells_total": len(cells)}
        if len(done) == len(cells):
            grid.set_status("finished", **fields)
        elif failed is not None:
            grid.set_status(failed, **fields)
        else:
            grid.update(status="running", **fields)
        return grid.manifest["status"]


def finished_cells(grid: Run) -> list[tuple[dict[str, Any], Run]]:
    """(cell dict from the grid's run.json, cell run) for every finished cell, in grid order."""
    out = []
    for c in grid.manifest.get("cells", []):
        path = grid.path / "cells" / c["name"]
        if cell_status(path) == "finished":
            out.append((c, Run(path)))
    return out


# --------------------------------------------------------------------------------------------
# Grid-level metrics.json: per-cell metrics of one split and their mean ± std over seeds.
#
# ``<grid>/metrics.json`` = {split: {"cells": [...], "groups": [...], "written": time}}, one entry per
# split (``val`` from finetune, ``test`` from evaluate). A group is one (init, mode, fraction); its
# statistics are over the seeds (sample std, ddof = 1).

KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def write_summary(grid: Run, split: str) -> dict[str, Any]:
    """Collect ``split`` metrics of every finished cell into the grid's metrics.json (under the grid lock)."""
    cells = []
    for c, run in finished_cells(grid):
        try:
            m = read_json(run.file("metrics.json"))
        except (FileNotFoundError, ValueError):
            continue
        if split not in m:
            continue
        s = m[split]
        cells.append(
            {
                "name": c["name"],
                "index": c["index"],
                "init": c["init"],
                "mode": c["mode"],
                "fraction": c["fraction"],
                "seed": c["seed"],
                "n_train": m.get("cell", {}).get("n_train"),
                "n": s["n"],
                **{k: s.get(k) for k in KEYS},
                "accuracy_ci": s.get("accuracy_ci"),
                "leakage_override": bool(m.get("leakage_override")),
            }
        )
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in cells:
        groups.setdefault((row["init"], row["mode"], row["fraction"]), []).append(row)
    group_rows = [
        {
            "init": i,
            "mode": mo,
            "fraction": f,
            "seeds": [r["seed"] for r in rows],
            "n_train": [r["n_train"] for r in rows],
            **{k: summarize([r[k] for r in rows]) for k in KEYS},
        }
        for (i, mo, f), rows in groups.items()
    ]
    entry = {
        "cells": cells,
        "groups": group_rows,
        "written": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    with grid_lock(grid.path):
        path = grid.file("metrics.json")
        try:
            data = read_json(path)
        except (FileNotFoundError, ValueError):
            data = {}
        data[split] = entry
        write_json(path, data)
    return entry
