"""`medssl finetune`: the label-efficiency grid (inits x modes x fractions x seeds), one sub-run per cell.

Protocol: only the official *train* split is used for fitting (a stratified label subset of it) and
only *val* for every choice (C, early stopping); the test split is never loaded here (``evaluate``).
How much val a cell may use is ``finetune.val_budget``: ``matched`` (default) = as many val images as
labelled train images (``data.fractions.val_budget``: stratified, nested, per seed), since a low-label
user has no large val set; ``full`` = all of val (optimistic); or a number. With fewer than 2 val
images per class C is chosen by cross-validation on the labelled images (``cell._select_lbfgs``).

- Recipe precedence (``recipe.resolve``): defaults < the pretrain run's recipe (data, model, views)
  < ``--recipe`` < CLI options. A pretrain run is needed for ``init: ssl`` (``--from``, else the
  newest finished one); with only ImageNet/random inits ``data.datasets`` must be given.
- Subsets: ``data.fractions.stratified_subset`` per (fraction, seed): nested across fractions for a
  seed, at least one image per class (logged when this floor raised the count), recorded in the cell's
  ``subset_indices.json`` (pool index, dataset id, row, label).
- Linear mode: the backbone stays frozen in eval mode; train and val features are extracted once per
  (backbone, datasets, split, size) into the feature cache (``features.py``) and every fraction and seed
  reuses them; the head is fitted by ``probes.fit_lbfgs`` (default) or ``probes.fit_sgd``.
  The random-init backbone is one per grid (drawn with ``compute.seed``; saved under
  ``<grid>/backbones/``), so the seeds vary the label subset and the head, not the random features.
- Full mode: ``full_ft.train_cell`` (end-to-end, augmentation, AdamW, early stopping on val).
- kNN mode: weighted kNN on L2-normalised frozen features, the labelled subset as the bank, k =
  ``evaluate.knn_k`` cut to the labelled count; nothing is chosen on val.
- Outputs per cell: run.json (init, mode, fraction, seed, subset size per class, backbone, head),
  ``subset_indices.json``, ``weights/*.safetensors``, ``history.jsonl``, ``metrics.json`` with val
  METRICS. The grid's ``metrics.json`` holds a val summary; ``evaluate`` adds the test split.
- Several processes (torchrun/srun; ``distributed.py``): every rank reads the recipe and data; rank 0
  creates or opens the grid and does all its bookkeeping (locks, cell files, status) and the others get
  its path; full-mode cells train with DDP on all ranks, linear-mode cells run on rank 0 (``cell.py``).
  Every rank logs to its own file (``log.rank<k>.txt``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from medssl_cli import lifecycle
from medssl_cli.barlowtwins.views import flip_warning
from medssl_cli.checks import check_finetune
from medssl_cli.data.domains import resolve_recipe_views
from medssl_cli.data.pool import Pool, load_split
from medssl_cli.data.registry import data_root
from medssl_cli.errors import UserError
from medssl_cli.grids import (
    Cell,
    open_or_create,
    plan_cells,
    refresh_status,
    update_grid,
    write_summary,
)
from medssl_cli.models import FEATURE_DIM
from medssl_cli.readout import backbones
from medssl_cli.recipe import Recipe, diff, merge, override, read_recipe_file, resolve
from medssl_cli.runs import Run, check_name, create_run, locate, resolve_run
from medssl_cli.runtime import compute, distributed, launch
from medssl_cli.runtime.preempt import StopFlag
from medssl_cli.stages.finetune.cell import run_cell
from medssl_cli.stages.finetune.context import Context

LOG = logging.getLogger("medssl")


# --------------------------------------------------------------------------------------------
# Recipe and data


def resolve_recipe(
    recipe_file: Path | None, overrides: dict[str, Any], from_run: str | Path | None, runs_root: Path
) -> tuple[Recipe, Run | None]:
    """defaults < parent pretrain recipe (data, model, views) < recipe file < CLI; the parent when needed."""
    file = read_recipe_file(recipe_file) if recipe_file is not None else {}
    inits = override(merge(Recipe(), file), overrides).finetune.inits
    parent = None
    if "ssl" in inits or from_run is not None:
        parent = resolve_run(from_run, runs_root, "pretrain")
    if (
        parent is None
        and "datasets" not in (file.get("data") or {})
        and overrides.get("data.datasets") is None
    ):
        raise UserError(
            "No datasets: without a pretrain run (--init imagenet/random only) --datasets is required.",
            "Pass e.g. --datasets axial, or set data.datasets in --recipe.",
        )
    # views: full fine-tuning flips and rotates as the parent's view1 (none for the organ planes)
    pr = parent.recipe() if parent is not None else None
    return resolve(recipe_file, overrides, pr, ("data", "model", "views")), parent


# --------------------------------------------------------------------------------------------
# Entry point


def finetune(
    overrides: dict[str, Any],
    *,
    recipe_file: Path | None = None,
    from_run: str | Path | None = None,
    runs_root: Path | str = "runs",
    name: str | None = None,
    data_dir: Path | str | None = None,
    resume: Path | str | None = None,
    grid_dir: Path | str | None = None,
    cell: int | None = None,
) -> Run:
    """Run (or continue) a finetune grid; returns the grid run. See the module docstring."""
    check_name(name)  # before any work: the directory name is made much later
    dist = launch.detect()
    with contextlib.ExitStack() as stack:  # holds the process group (opened once the device is known)
        return _finetune(
            overrides, recipe_file, from_run, runs_root, name, data_dir, resume, grid_dir, cell, dist, stack
        )


def _finetune(
    overrides: dict[str, Any],
    recipe_file: Path | None,
    from_run: str | Path | None,
    runs_root: Path | str,
    name: str | None,
    data_dir: Path | str | None,
    resume: Path | str | None,
    grid_dir: Path | str | None,
    cell: int | None,
    dist: launch.Dist,
    stack: contextlib.ExitStack,
) -> Run:
    runs_root = Path(runs_root)
    existing = Path(resume) if resume is not None else None
    if existing is None and grid_dir is not None and (Path(grid_dir) / "run.json").is_file():
        existing = Path(grid_dir)
    if resume is not None and not (Path(resume) / "run.json").is_file():
        raise UserError(
            f"--resume {resume}: no finetune grid there.", "Pass the grid directory of a finetune run."
        )
    if existing is not None:
        recipe, parent = _reopen(existing, recipe_file, overrides, from_run)
    else:
        recipe, parent = resolve_recipe(recipe_file, overrides, from_run, runs_root)
    check_finetune(recipe)
    stack.enter_context(distributed.session(dist, compute.resolve_device(recipe.compute.device)))
    if "imagenet" in recipe.finetune.inits:
        backbones.require_imagenet()  # fail before anything is written
    cells = plan_cells(recipe.finetune)
    if cell is not None and not 0 <= cell < len(cells):
        raise UserError(
            f"--cell {cell} is out of range: this grid has {len(cells)} cells (0..{len(cells) - 1})."
        )
    recorded = Run(existing).manifest.get("data", {}).get("root") if existing else None
    if recorded is None and parent is not None:
        recorded = parent.manifest.get("data", {}).get("root")
    root = data_root(data_dir, recorded)
    views_line = None
    if existing is None:  # views a parent did not fix (imagenet/random-only grids): the domain's geometry
        recipe, views_line = resolve_recipe_views(recipe, root)
    compute.configure_threads(recipe.compute.threads)
    train, val = load_split(recipe, root, "train"), load_split(recipe, root, "val")
    data = {"root": str(root), "train": train.provenance(), "val": val.provenance()}
    if "ssl" in recipe.finetune.inits and parent is not None:
        backbones.from_pretrain_run(parent, train.channels)  # bad or mismatched weights: fail before writing
    if existing is not None:
        grid = Run(existing)
        _check_same_data(grid, root, {"train": train, "val": val})
    else:
        made = distributed.from_main(
            dist, lambda: str(_create_grid(recipe, parent, cells, data, runs_root, name, grid_dir).path)
        )
        grid = Run(Path(made))
    todo = cells if cell is None else [cells[cell]]
    return _run_grid(grid, recipe, parent, train, val, cells, todo, dist, views_line)


def _reopen(
    path: Path, recipe_file: Path | None, overrides: dict[str, Any], from_run: str | Path | None
) -> tuple[Recipe, Run | None]:
    grid = Run(path)
    info = grid.manifest
    if info.get("stage") != "finetune" or info.get("kind") != "grid":
        raise UserError(
            f"{path} is not a finetune grid (stage {info.get('stage')}, kind {info.get('kind')})."
        )
    stored = grid.recipe()
    parent = Run(locate(info["parent"], path.parent)) if info.get("parent") else None
    if parent is not None and (not (parent.path / "run.json").is_file() or parent.status != "finished"):
        raise UserError(f"The grid's pretrain run {parent.path} is missing or not finished.")
    if from_run is not None and parent is not None and Path(from_run).resolve() != parent.path.resolve():
        named = resolve_run(from_run, path.parent, "pretrain")
        if named.path.resolve() != parent.path.resolve():
            raise UserError(f"Grid {path} was made from {parent.path}, not {from_run}.", "Drop --from.")
    file = read_recipe_file(recipe_file) if recipe_file is not None else {}
    recipe = override(merge(stored, file), overrides)
    changed = diff(stored, recipe)
    if changed:
        raise UserError(
            f"Grid {path} was created with other settings ({', '.join(changed)} differ).",
            "Continue it with the same options (or none), or start a new grid.",
        )
    return stored, parent


def _check_same_data(grid: Run, root: Path, pools: dict[str, Pool]) -> None:
    stored = grid.manifest.get("data", {})
    for split, pool in pools.items():
        if not pool.matches(stored.get(split, {})):
            raise UserError(
                f"The {split} data under {root} differs from what grid {grid.path} used.",
                "Pass the original --data-dir.",
            )


def _create_grid(
    recipe: Recipe,
    parent: Run | None,
    cells: list[Cell],
    data: dict[str, Any],
    runs_root: Path,
    name: str | None,
    grid_dir: Path | str | None,
) -> Run:
    ft = recipe.finetune
    name = name or "-".join([*ft.inits, *ft.modes])
    extra = {
        "kind": "grid",
        "cells": [c.as_dict() for c in cells],
        "data": data,
        "cell_order": "inits x modes x fractions x seeds (seeds fastest); --cell K is 0-based",
    }
    if grid_dir is None:
        return create_run(runs_root, "finetune", recipe, name=name, parent=parent, extra=extra)

    def make(tmp: Path) -> Run:
        return create_run(tmp.parent, "finetune", recipe, name=name, parent=parent, extra=extra, path=tmp)

    grid, created = open_or_create(Path(grid_dir), make)
    if not created:  # another process created it in the meantime: it must be the same grid
        changed = diff(grid.recipe(), recipe)
        if changed:
            raise UserError(f"Grid {grid_dir} exists with other settings ({', '.join(changed)} differ).")
        theirs, ours = grid.manifest.get("parent"), str(parent.path.resolve()) if parent else None
        if theirs != ours:
            raise UserError(
                f"Grid {grid_dir} was made from pretrain run {theirs}, not {ours}.", "Pass that --from."
            )
    return grid


def _run_grid(
    grid: Run,
    recipe: Recipe,
    parent: Run | None,
    train: Pool,
    val: Pool,
    cells: list[Cell],
    todo: list[Cell],
    dist: launch.Dist | None = None,
    views_line: str | None = None,
) -> Run:
    c, dist = recipe.compute, dist or launch.Dist()
    device = distributed.rank_device(dist, compute.resolve_device(c.device))
    bf16 = compute.use_bf16(device, c.precision)
    channels_last = compute.use_channels_last(device, c.channels_last, train.image_size)
    k = train.num_classes
    try:
        with lifecycle.logging_to(grid, dist.rank), StopFlag() as stop:
            ctx = Context(
                recipe, grid, parent, train, val, device, bf16, channels_last, stop, len(cells), dist=dist
            )
            if dist.enabled:
                LOG.info(f"Rank {dist.rank} of {dist.world_size}, {compute.describe_device(device)}")
                if dist.is_main:
                    update_grid(grid, distributed=dist.describe())
            LOG.info(
                f"Finetune grid {grid.path}: {len(cells)} cells ({len(todo)} to consider here); "
                f"train {len(train)} / val {len(val)} images of {', '.join(train.dataset_ids)} at "
                f"{train.image_size} px, {k} classes; {compute.describe_device(device)}, "
                f"{'bf16' if bf16 else 'fp32'}"
            )
            if views_line and "full" in recipe.finetune.modes and dist.is_main:
                LOG.info(f"Full fine-tuning: {views_line}")
            flips = flip_warning(recipe.views.view1.flip_p or 0.0, train.class_names, "views.view1.flip_p")
            if "full" in recipe.finetune.modes and flips and dist.is_main:
                LOG.warning(f"Full fine-tuning: {flips}")
            if "linear" in recipe.finetune.modes:
                LOG.info(
                    f"Linear head: {FEATURE_DIM} x {k} + {k} = {FEATURE_DIM * k + k:,} trainable parameters "
                    f"({recipe.finetune.head}); the backbone is frozen"
                )
            t0 = time.perf_counter()
            ran = [c.name for c in todo if run_cell(ctx, c) == "ran"]
            elapsed = time.perf_counter() - t0
    except BaseException as exc:
        if dist.is_main:  # the grid's status from its cells; unfinished ones as the stop or failure says
            refresh_status(grid, cells, failed=lifecycle.outcome(exc)[0])
        raise
    if not dist.is_main:
        return grid
    timings = _timings(ctx.timings, elapsed, len(ran))
    status = refresh_status(grid, cells)
    update_grid(grid, timings=timings)
    write_summary(grid, "val")
    LOG.info(
        f"Grid {status}: ran {len(ran)} cell(s) in {elapsed:.1f} s; {grid.manifest.get('cells_finished')}/"
        f"{len(cells)} finished. Next: medssl evaluate --from {grid.path}"
    )
    return grid


def _timings(t: dict[str, float], elapsed: float, ran: int) -> dict[str, Any]:
    out: dict[str, Any] = {**t, "cells_run": ran, "wall_s": elapsed}
    if t["linear_fits"]:
        share = t["linear_fit_s"] / t["extraction_s"] if t["extraction_s"] else None
        out["linear_fit_share_of_extraction"] = share
        LOG.info(
            f"Timing: feature extraction {t['extraction_s']:.1f} s; {t['linear_fits']:.0f} linear fits "
            f"{t['linear_fit_s']:.2f} s" + (f" ({share:.0%} of extraction)" if share else "")
        )
    return out
