"""`medssl finetune`: the label-efficiency grid (inits x modes x fractions x seeds), one sub-run per cell.

Protocol: only the official *train* split is used for fitting (a stratified label subset of it) and
only *val* for every choice (C, early stopping); the test split is never loaded here (``evaluate``).

- Recipe precedence: defaults < the pretrain run's recipe (data and model sections) < ``--recipe``
  < CLI options. A pretrain run is needed for ``init: ssl`` (``--from``, else the newest finished one);
  with only ImageNet/random inits ``data.datasets`` must be given.
- Subsets: ``data.fractions.stratified_subset`` per (fraction, seed): nested across fractions for a
  seed, at least one image per class (logged when this floor raised the count), recorded in the cell's
  ``subset_indices.json`` (pool index, dataset id, row, label).
- Linear mode: the backbone stays frozen in eval mode; train and val features are extracted once per
  (backbone, datasets, split, size) into the feature cache (``features.py``) and every fraction and seed
  reuses them; the head is fitted by ``probes.fit_lbfgs`` (default) or ``probes.fit_sgd``.
  The random-init backbone is one per grid (drawn with ``compute.seed``; saved under
  ``<grid>/backbones/``), so the seeds vary the label subset and the head, not the random features.
- Full mode: ``full_ft.train_cell`` (end-to-end, augmentation, AdamW, early stopping on val).
- Outputs per cell: run.json (init, mode, fraction, seed, subset size per class, backbone, head),
  ``subset_indices.json``, ``weights/*.safetensors``, ``history.jsonl``, ``metrics.json`` with val
  METRICS. The grid's ``metrics.json`` holds a val summary; ``evaluate`` adds the test split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import backbones, compute
from ..backbones import LoadedBackbone
from ..data.fractions import parse_fraction, stratified_subset
from ..data.pool import Pool, load_pool
from ..data.registry import resolve_root
from ..errors import UserError
from ..features import cached
from ..io import write_json, write_text
from ..metrics import compute_metrics
from ..models import backbone_meta, save_weights
from ..preempt import Interrupted, StopFlag
from ..probes import LinearFit, fit_lbfgs, fit_sgd
from ..recipe import Recipe, merge, override, read_recipe_file
from ..runs import Run, attach_log, create_run, detach_log, resolve_run
from . import full_ft
from .grid import (
    Cell,
    cell_path,
    cell_status,
    open_or_create,
    plan_cells,
    recipe_diff,
    refresh_status,
    release,
    try_cell_lock,
    update_grid,
)
from .summary import write_summary

LOG = logging.getLogger("medssl")
FEATURE_DIM = 512


# --------------------------------------------------------------------------------------------
# Recipe and data


def resolve_recipe(
    recipe_file: Path | None, overrides: dict[str, Any], from_run: str | Path | None, runs_root: Path
) -> tuple[Recipe, Run | None]:
    """defaults < parent pretrain recipe (data, model) < recipe file < CLI; the parent when needed."""
    file = read_recipe_file(recipe_file) if recipe_file is not None else {}
    inits = override(merge(Recipe(), file), overrides).finetune.inits
    parent = None
    if "ssl" in inits or from_run is not None:
        parent = resolve_run(from_run, runs_root, "pretrain")
    recipe = Recipe()
    if parent is not None:
        pr = parent.recipe()
        recipe = merge(recipe, {"data": dataclasses.asdict(pr.data), "model": dataclasses.asdict(pr.model)})
    elif "datasets" not in (file.get("data") or {}) and overrides.get("data.datasets") is None:
        raise UserError(
            "No datasets: without a pretrain run (--init imagenet/random only) --datasets is required.",
            "Pass e.g. --datasets axial, or set data.datasets in --recipe.",
        )
    return override(merge(recipe, file), overrides), parent


def check_recipe(recipe: Recipe) -> None:
    ft = recipe.finetune
    for key in ("inits", "modes", "fractions", "seeds"):
        values = getattr(ft, key)
        if not values:
            raise UserError(f"Recipe key 'finetune.{key}' is empty.", "Give at least one value.")
        if len(set(values)) != len(values):
            raise UserError(f"finetune.{key} lists a value twice: {values}.", "Remove the repeat.")
    for f in ft.fractions:
        parse_fraction(f)
    if any(s < 0 for s in ft.seeds):
        raise UserError(f"Seeds must be >= 0, got {ft.seeds}.", "Use e.g. --seeds 0,1,2.")
    for key in ("epochs", "batch_size", "patience"):
        if getattr(ft, key) < 1:
            raise UserError(f"Recipe key 'finetune.{key}' must be >= 1, got {getattr(ft, key)}.")
    for key in ("lr_head", "lr_backbone"):
        if not getattr(ft, key) > 0:
            raise UserError(f"Recipe key 'finetune.{key}' must be > 0, got {getattr(ft, key)}.")
    if any(not c > 0 for c in ft.c_grid) or not ft.c_grid:
        raise UserError(f"finetune.c_grid must be positive numbers, got {ft.c_grid}.")


def data_root(data_dir: Path | str | None, recorded: str | None) -> Path:
    """--data-dir, else $MEDSSL_DATA, else the root the parent run recorded (if it exists), else default."""
    if data_dir is None and not os.environ.get("MEDSSL_DATA") and recorded and Path(recorded).is_dir():
        return resolve_root(recorded)
    return resolve_root(data_dir)


def load_split(recipe: Recipe, root: Path, split: str, datasets: list[str] | None = None) -> Pool:
    d = recipe.data
    return load_pool(
        root,
        datasets or d.datasets,
        [split],
        task=d.task,
        image_size=d.image_size,
        channels=d.channels,
        supervised=True,
        ram_budget_gb=d.ram_budget_gb,
    )


# --------------------------------------------------------------------------------------------
# Shared state of one process working on a grid


@dataclass
class Context:
    recipe: Recipe
    grid: Run
    parent: Run | None
    train: Pool
    val: Pool
    device: torch.device
    bf16: bool
    channels_last: bool
    stop: StopFlag
    n_cells: int
    loaded: dict[str, LoadedBackbone] = field(default_factory=dict)
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fits: dict[tuple[str, bytes], LinearFit] = field(default_factory=dict)
    timings: dict[str, float] = field(
        default_factory=lambda: {"extraction_s": 0.0, "linear_fit_s": 0.0, "linear_fits": 0}
    )

    @property
    def cache_dir(self) -> Path:
        return self.grid.path.parent / ".cache" / "features"

    def backbone(self, init: str) -> LoadedBackbone:
        if init not in self.loaded:
            lb = backbones.load(
                init,
                data_channels=self.train.channels,
                gray_mode=self.recipe.model.gray_mode,
                pretrain_run=self.parent,
                seed=self.recipe.compute.seed,
            )
            if init == "random":  # saved, so that evaluate uses exactly these weights
                path = self.grid.file("backbones", f"random-seed{self.recipe.compute.seed}.safetensors")
                if not path.exists():
                    gm = lb.info["gray_mode"]
                    meta = {**backbone_meta(self.train.channels, gm, self.train.image_size), **lb.metadata()}
                    save_weights(path, lb.module, meta)
                lb.info["source"] = str(path)
            LOG.info(f"Backbone '{init}': {lb.info.get('source')} ({lb.info.get('input')})")
            self.loaded[init] = lb
        return self.loaded[init]

    def features(self, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        if init not in self.feats:
            lb = self.backbone(init)
            out = []
            for split, pool in (("train", self.train), ("val", self.val)):
                fs = cached(
                    self.cache_dir,
                    lb,
                    pool,
                    device=self.device,
                    bf16=self.bf16,
                    channels_last=self.channels_last,
                    batch_size=256,
                    desc=f"{init} {split} features",
                )
                how = "read from the cache" if fs.hit else f"extracted in {fs.seconds:.1f} s"
                LOG.info(f"{init} features, {split}: {len(pool)} images {how} ({fs.path.name})")
                if not fs.hit:
                    self.timings["extraction_s"] += fs.seconds
                out.append(fs.features)
            self.feats[init] = (out[0], out[1])
        return self.feats[init]


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
    check_recipe(recipe)
    cells = plan_cells(recipe.finetune)
    if cell is not None and not 0 <= cell < len(cells):
        raise UserError(
            f"--cell {cell} is out of range: this grid has {len(cells)} cells (0..{len(cells) - 1})."
        )
    recorded = Run(existing).manifest.get("data", {}).get("root") if existing else None
    if recorded is None and parent is not None:
        recorded = parent.manifest.get("data", {}).get("root")
    root = data_root(data_dir, recorded)
    compute.configure_threads(recipe.compute.threads)
    train, val = load_split(recipe, root, "train"), load_split(recipe, root, "val")
    data = {"root": str(root), "train": train.provenance(), "val": val.provenance()}
    if existing is not None:
        grid = Run(existing)
        _check_same_data(grid, data)
    else:
        grid = _create_grid(recipe, parent, cells, data, runs_root, name, grid_dir)
    todo = cells if cell is None else [cells[cell]]
    return _run_grid(grid, recipe, parent, train, val, cells, todo)


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
    parent = Run(Path(info["parent"])) if info.get("parent") else None
    if parent is not None and (not (parent.path / "run.json").is_file() or parent.status != "finished"):
        raise UserError(f"The grid's pretrain run {parent.path} is missing or not finished.")
    if from_run is not None and parent is not None and Path(from_run).resolve() != parent.path.resolve():
        named = resolve_run(from_run, path.parent, "pretrain")
        if named.path.resolve() != parent.path.resolve():
            raise UserError(f"Grid {path} was made from {parent.path}, not {from_run}.", "Drop --from.")
    file = read_recipe_file(recipe_file) if recipe_file is not None else {}
    recipe = override(merge(stored, file), overrides)
    diff = recipe_diff(stored, recipe)
    if diff:
        raise UserError(
            f"Grid {path} was created with other settings ({', '.join(diff)} differ).",
            "Continue it with the same options (or none), or start a new grid.",
        )
    return stored, parent


def _check_same_data(grid: Run, data: dict[str, Any]) -> None:
    stored = grid.manifest.get("data", {})
    for split in ("train", "val"):
        if stored.get(split, {}).get("fingerprint") != data[split]["fingerprint"]:
            raise UserError(
                f"The {split} data under {data['root']} differs from what grid {grid.path} used.",
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
        diff = recipe_diff(grid.recipe(), recipe)
        if diff:
            raise UserError(f"Grid {grid_dir} exists with other settings ({', '.join(diff)} differ).")
    return grid


def _run_grid(
    grid: Run, recipe: Recipe, parent: Run | None, train: Pool, val: Pool, cells: list[Cell], todo: list[Cell]
) -> Run:
    c = recipe.compute
    device = compute.resolve_device(c.device)
    bf16 = compute.use_bf16(device, c.precision)
    channels_last = compute.use_channels_last(device, c.channels_last, train.image_size)
    handler = attach_log(grid)
    k = train.num_classes
    try:
        with StopFlag() as stop:
            ctx = Context(recipe, grid, parent, train, val, device, bf16, channels_last, stop, len(cells))
            LOG.info(
                f"Finetune grid {grid.path}: {len(cells)} cells ({len(todo)} to consider here); "
                f"train {len(train)} / val {len(val)} images of {', '.join(train.dataset_ids)} at "
                f"{train.image_size} px, {k} classes; {compute.describe_device(device)}, "
                f"{'bf16' if bf16 else 'fp32'}"
            )
            if "linear" in recipe.finetune.modes:
                LOG.info(
                    f"Linear head: {FEATURE_DIM} x {k} + {k} = {FEATURE_DIM * k + k:,} trainable parameters "
                    f"({recipe.finetune.head}); the backbone is frozen"
                )
            t0 = time.perf_counter()
            ran = [c.name for c in todo if _run_cell(ctx, c) == "ran"]
            elapsed = time.perf_counter() - t0
    except (Interrupted, KeyboardInterrupt):
        refresh_status(grid, cells, failed="interrupted")
        raise
    except BaseException:
        refresh_status(grid, cells, failed="failed")
        raise
    finally:
        detach_log(handler)
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


# --------------------------------------------------------------------------------------------
# One cell


def _run_cell(ctx: Context, cell: Cell) -> str:
    path = cell_path(ctx.grid.path, cell)
    if cell_status(path) == "finished":
        LOG.info(f"cell {cell.index} {cell.name}: finished before, skipped")
        return "skipped"
    if ctx.stop:
        raise Interrupted(str(ctx.grid.path), ctx.stop.signum or 0, cell.index)
    lock = try_cell_lock(ctx.grid.path, cell)
    if lock is None:
        LOG.info(f"cell {cell.index} {cell.name}: running in another process, skipped")
        return "busy"
    try:
        previous = cell_status(path)
        if previous == "finished":
            return "skipped"
        if path.exists():  # a killed or failed attempt: start the cell over
            LOG.info(f"cell {cell.index} {cell.name}: previous attempt ({previous or 'incomplete'}) removed")
            shutil.rmtree(path)
        extra = {"kind": "cell", "grid": str(ctx.grid.path.resolve()), **dataclasses.asdict(cell)}
        run = create_run(
            path.parent, "finetune", ctx.recipe, name=cell.name, parent=ctx.parent, path=path, extra=extra
        )
        handler = attach_log(run)
        try:
            _cell_body(ctx, cell, run)
        except Interrupted:
            run.set_status("interrupted")
            raise
        except UserError as exc:
            run.set_status("failed", error=exc.line())
            raise
        except BaseException as exc:
            run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            detach_log(handler)
        return "ran"
    finally:
        release(lock)


def _cell_body(ctx: Context, cell: Cell, run: Run) -> None:
    t0 = time.perf_counter()
    train, val = ctx.train, ctx.val
    names = train.class_names
    sub = stratified_subset(train.labels, cell.fraction, cell.seed, train.num_classes)
    idx = sub.indices
    if sub.floor_raised:
        LOG.warning(
            f"cell {cell.name}: fraction {cell.fraction:g} asks for {sub.requested} of {len(train)} images; "
            f"the one-image-per-class floor raised it to {len(idx)}"
        )
    _write_subset(run, train, idx, cell)
    subset = {
        "n": len(idx),
        "per_class": {names[c]: n for c, n in sub.per_class.items()},
        "requested": sub.requested,
        "floor_raised": sub.floor_raised,
    }
    run.update(
        subset=subset, data={"root": str(train.root), "train": train.provenance(), "val": val.provenance()}
    )
    if cell.mode == "linear":
        proba, info = _linear(ctx, cell, run, idx)
    else:
        proba, info = full_ft.train_cell(ctx, cell, run, idx)
    y_val = val.labels
    metrics = compute_metrics(
        y_val, proba.argmax(1).numpy(), proba.numpy(), names, ci=ctx.recipe.evaluate.ci, seed=cell.seed
    )
    summary = {**cell.as_dict(), "n_train": len(idx), **info}
    write_json(run.file("metrics.json"), {"cell": summary, "val": metrics, "leakage_override": False})
    run.set_status("finished", time_s=time.perf_counter() - t0, val_accuracy=metrics["accuracy"], **info)
    LOG.info(
        f"cell {cell.index + 1}/{ctx.n_cells} {cell.name}: {len(idx)} labelled images, val accuracy "
        f"{metrics['accuracy']:.3f}, balanced {metrics['balanced_accuracy']:.3f}"
        + (f" (C={info['chosen']['C']:g})" if "C" in info.get("chosen", {}) else "")
    )


def _write_subset(run: Run, train: Pool, idx: np.ndarray, cell: Cell) -> None:
    ids = train.dataset_ids
    write_json(
        run.file("subset_indices.json"),
        {
            "split": "train",
            "fraction": cell.fraction,
            "seed": cell.seed,
            "n": len(idx),
            "indices": idx.tolist(),  # positions in the pooled train split (datasets in the order below)
            "dataset": [ids[i] for i in train.source_ds[idx]],
            "row": train.source_idx[idx].tolist(),  # row in the dataset's images.hdf5
            "label": train.labels[idx].tolist(),
            "datasets": ids,
        },
    )


def _linear(ctx: Context, cell: Cell, run: Run, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
    ft, train, val = ctx.recipe.finetune, ctx.train, ctx.val
    lb = ctx.backbone(cell.init)
    f_train, f_val = ctx.features(cell.init)
    y_train, y_val = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    k = train.num_classes
    t0 = time.perf_counter()
    key = (cell.init, idx.tobytes())
    if ft.head == "lbfgs":
        # Deterministic: the same subset (e.g. fraction 1 for every seed) gives the same fit, so reuse it.
        fit = ctx.fits.get(key) or fit_lbfgs(
            f_train[idx], y_train[idx], f_val, y_val, k, ft.c_grid, reference=f_train
        )
        ctx.fits[key] = fit
    else:
        fit = fit_sgd(
            f_train[idx],
            y_train[idx],
            f_val,
            y_val,
            k,
            epochs=ft.epochs,
            lr=ft.lr_head,
            weight_decay=ft.weight_decay,
            batch_size=ft.batch_size,
            patience=ft.patience,
            seed=cell.seed,
            reference=f_train,
        )
    fit_s = time.perf_counter() - t0
    ctx.timings["linear_fit_s"] += fit_s
    ctx.timings["linear_fits"] += 1
    write_text(run.file("history.jsonl"), "".join(json.dumps(h) + "\n" for h in fit.history))
    params = FEATURE_DIM * k + k
    meta = {
        "kind": "linear_head",
        "in_dim": str(FEATURE_DIM),
        "num_classes": str(k),
        "class_names": json.dumps(train.class_names),
        "init": cell.init,
        "backbone_key": lb.key,
        "head": ft.head,
        "chosen": json.dumps(fit.chosen),
    }
    save_weights(run.file("weights", "head.safetensors"), fit.state_dict(), meta)
    info = {"head": ft.head, "chosen": fit.chosen, "params": params, "fit_s": fit_s, "backbone": lb.info}
    return fit.proba(f_val), info
