"""One process's work on a finetune grid: shared backbones and features (``Context``) and one cell.

A cell runs under its lock (``grid.try_cell_lock``); an earlier unfinished attempt is deleted first.
Its run directory gets run.json (init, mode, fraction, seed, subset sizes per class, backbone, head),
``subset_indices.json``, ``weights/``, ``history.jsonl`` and ``metrics.json`` (val METRICS); a failure
marks the cell ``failed`` (``interrupted`` on a stop signal) and is re-raised.

Several processes (torchrun/srun, ``ctx.dist``): rank 0 alone decides whether a cell runs, takes its
lock and writes every file; the decision is broadcast (``distributed.from_main``). A full-mode cell then
trains on every rank (DDP, ``full_ft``; the other ranks log to the cell's ``log.rank<k>.txt``); a
linear-mode cell (feature extraction + one L-BFGS / SGD fit, single-process) runs on rank 0 while the
others wait at a barrier (within MEDSSL_DIST_TIMEOUT minutes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from typing import Any

import numpy as np
import torch

from medssl_cli.data.fractions import ValBudget, stratified_subset, val_budget
from medssl_cli.data.pool import Pool
from medssl_cli.grids import Cell, cell_path, cell_status, release, try_cell_lock
from medssl_cli.io import write_json, write_text
from medssl_cli.lifecycle import logging_to, recording
from medssl_cli.models import FEATURE_DIM, save_weights
from medssl_cli.readout.metrics import compute_metrics
from medssl_cli.readout.probes import LinearFit, choose_c_cv, fit_lbfgs, fit_sgd, knn_scores, stratified_folds
from medssl_cli.runs import Run, create_run
from medssl_cli.runtime import distributed
from medssl_cli.runtime.preempt import GRID_KEPT, Interrupted
from medssl_cli.stages.finetune import full_ft
from medssl_cli.stages.finetune.context import Context

LOG = logging.getLogger("medssl")
CV_FOLDS = 5  # at most: fewer when the smallest class has fewer labelled images
FIXED_C = 1.0  # sklearn's default, when nothing can rank C
KNN_VOTE = "weighted exp(cos/0.07)"


# --------------------------------------------------------------------------------------------
# One cell


def run_cell(ctx: Context, cell: Cell) -> str:
    """Run one cell unless it is finished or busy; returns 'ran', 'skipped' or 'busy'."""
    if ctx.dist.enabled:
        return _run_cell_ddp(ctx, cell)
    return _run_cell(ctx, cell)


def _run_cell_ddp(ctx: Context, cell: Cell) -> str:
    """``run_cell`` on every rank of a DDP job: rank 0 opens the cell (``_run_cell`` with the body deferred),
    all ranks agree on it, a full-mode cell trains on all ranks, rank 0 finishes it."""
    d = ctx.dist
    signum = distributed.agreed_stop(d, ctx.stop)
    if signum:
        raise Interrupted(str(ctx.grid.path), signum, cell.index, GRID_KEPT)
    if d.is_main:
        return _run_cell(ctx, cell)  # the peers follow inside _cell_body (``_follow``)
    outcome = distributed.from_main(d, lambda: None)
    if outcome != "ran":
        return str(outcome)
    if cell.mode == "full":
        run = Run(cell_path(ctx.grid.path, cell))
        with logging_to(run, d.rank):
            sub = stratified_subset(ctx.train.labels, cell.fraction, cell.seed, ctx.train.num_classes)
            full_ft.train_cell(ctx, cell, run, sub.indices, _budget(ctx, cell, len(sub.indices)).indices)
    distributed.barrier(d)  # rank 0 writes the cell's results (a linear cell: all of its work)
    return "ran"


def _announce(ctx: Context, outcome: str) -> str:
    """Rank 0 tells the other ranks whether the cell runs (no-op with one process)."""
    if ctx.dist.enabled:
        distributed.from_main(ctx.dist, lambda: outcome)
    return outcome


def _run_cell(ctx: Context, cell: Cell) -> str:
    path = cell_path(ctx.grid.path, cell)
    if cell_status(path) == "finished":
        LOG.info(f"cell {cell.index} {cell.name}: finished before, skipped")
        return _announce(ctx, "skipped")
    if ctx.stop and not ctx.dist.enabled:  # under DDP: agreed on by all ranks in _run_cell_ddp
        raise Interrupted(str(ctx.grid.path), ctx.stop.signum or 0, cell.index, GRID_KEPT)
    lock = try_cell_lock(ctx.grid.path, cell)
    if lock is None:
        LOG.info(f"cell {cell.index} {cell.name}: running in another process, skipped")
        return _announce(ctx, "busy")
    try:
        previous = cell_status(path)
        if previous == "finished":
            return _announce(ctx, "skipped")
        if path.exists():  # a killed or failed attempt: start the cell over
            LOG.info(f"cell {cell.index} {cell.name}: previous attempt ({previous or 'incomplete'}) removed")
            shutil.rmtree(path)
        extra = {"kind": "cell", "grid": str(ctx.grid.path.resolve()), **dataclasses.asdict(cell)}
        run = create_run(
            path.parent, "finetune", ctx.recipe, name=cell.name, parent=ctx.parent, path=path, extra=extra
        )
        if ctx.dist.enabled:
            run.update(distributed=ctx.dist.describe())
        _announce(ctx, "ran")  # after create_run: the peers open the cell directory for their logs
        with recording(run):
            _cell_body(ctx, cell, run)
        distributed.barrier(ctx.dist)
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
    vb = _budget(ctx, cell, len(idx))
    if cell.mode == "linear":
        proba, info = _linear(ctx, cell, run, idx, vb)
    elif cell.mode == "knn":
        proba, info = _knn(ctx, cell, idx, vb)
    else:
        proba, info = full_ft.train_cell(ctx, cell, run, idx, vb.indices)
    y_val = val.labels if vb.indices is None else val.labels[vb.indices]
    metrics = compute_metrics(
        y_val, proba.argmax(1).numpy(), proba.numpy(), names, ci=ctx.recipe.evaluate.ci, seed=cell.seed
    )
    info["val_budget"] = {
        "budget": vb.budget,
        "n_val": vb.n,
        "per_class": {names[c]: n for c, n in vb.per_class.items()},
        "optimistic": vb.optimistic,
        "selection": info.pop("selection"),
    }
    if not vb.enough and cell.mode == "full":
        LOG.warning(
            f"cell {cell.name}: {vb.n} val images ({min(vb.per_class.values())} in the smallest class) to "
            "stop early on: too few to rank epochs reliably (the budget says so in metrics.json)"
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
    """subset_indices.json: one key per line, lists inline (compact even for 85,000 indices)."""
    ids = train.dataset_ids
    fields = {
        "split": "train",
        "fraction": cell.fraction,
        "seed": cell.seed,
        "n": len(idx),
        "datasets": ids,
        "indices": idx.tolist(),  # positions in the pooled train split (datasets in the order above)
        "dataset": [ids[i] for i in train.source_ds[idx]],
        "row": train.source_idx[idx].tolist(),  # row in the dataset's images.hdf5 (and mimeta's index)
        "label": train.labels[idx].tolist(),
    }
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items())
    write_text(run.file("subset_indices.json"), "{\n" + body + "\n}\n")


def _budget(ctx: Context, cell: Cell, n_labelled: int) -> ValBudget:
    """The val images this cell may use (``finetune.val_budget``), drawn per seed."""
    val = ctx.val
    return val_budget(val.labels, ctx.recipe.finetune.val_budget, n_labelled, cell.seed, val.num_classes)


def _cv_folds(y: torch.Tensor, k: int) -> int:
    """Folds of a stratified CV on the labelled images: at most CV_FOLDS, at most the smallest class."""
    return min(CV_FOLDS, int(np.bincount(y.numpy(), minlength=k).min()))


def _select_lbfgs(
    ctx: Context,
    cell: Cell,
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    vb: ValBudget,
    reference: torch.Tensor,
) -> tuple[LinearFit, dict[str, Any]]:
    """Fit the L-BFGS head, C chosen on the budget's val images when they allow it (>= 2 per class),
    else by stratified k-fold cross-validation on the labelled images (k = min(5, smallest class)),
    else (a class with one labelled image) at C = 1."""
    ft, k = ctx.recipe.finetune, ctx.train.num_classes
    if vb.enough or vb.optimistic:  # "full" chooses on the whole val split, however small (as before)
        fit = fit_lbfgs(x, y, xv, yv, k, ft.c_grid, reference=reference)
        return fit, {"method": "val", "n_val": vb.n}
    folds = _cv_folds(y, k)
    if folds >= 2:
        c, table = choose_c_cv(x, y, k, ft.c_grid, folds, cell.seed, reference=reference)
        fit = fit_lbfgs(x, y, xv, yv, k, [c], reference=reference)
        why = f"{folds}-fold cross-validation on the {len(y)} labelled images (val budget below 2 per class)"
        return fit, {"method": "cv", "folds": folds, "C": c, "why": why, "cv": table}
    fit = fit_lbfgs(x, y, xv, yv, k, [FIXED_C], reference=reference)
    why = "a class has one labelled image: no val set or fold can rank C"
    return fit, {"method": "fixed", "C": FIXED_C, "why": why}


def _select_sgd(
    ctx: Context,
    cell: Cell,
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    vb: ValBudget,
    reference: torch.Tensor,
) -> tuple[LinearFit, dict[str, Any]]:
    """Train the SGD head, stopping early on the budget's val images when they allow it (>= 2 per
    class); else the number of epochs is chosen by stratified k-fold cross-validation on the labelled
    images (median of the folds' best epochs) and the head is trained that long on all of them."""
    ft, k = ctx.recipe.finetune, ctx.train.num_classes
    kw = {"lr": ft.lr_head, "weight_decay": ft.weight_decay, "batch_size": ft.batch_size, "seed": cell.seed,
          "reference": reference}  # fmt: skip
    folds = _cv_folds(y, k)
    if vb.enough or vb.optimistic or folds < 2:
        fit = fit_sgd(x, y, xv, yv, k, epochs=ft.epochs, patience=ft.patience, **kw)
        return fit, {"method": "val", "n_val": vb.n, "below_2_per_class": not vb.enough}
    fold = torch.from_numpy(stratified_folds(y.numpy(), folds, cell.seed))
    best = [
        fit_sgd(x[fold != f], y[fold != f], x[fold == f], y[fold == f], k, epochs=ft.epochs,
                patience=ft.patience, **kw).chosen["epoch"]
        for f in range(folds)
    ]  # fmt: skip
    epochs = int(np.median(best))
    # nothing held out any more: trained for the CV's epoch count (the best training-set epoch within it)
    fit = fit_sgd(x, y, x, y, k, epochs=epochs, patience=epochs + 1, **kw)
    why = f"{folds}-fold cross-validation on the {len(y)} labelled images (val budget below 2 per class)"
    return fit, {"method": "cv", "folds": folds, "epochs": epochs, "fold_best_epochs": best, "why": why}


def _knn(ctx: Context, cell: Cell, idx: np.ndarray, vb: ValBudget) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weighted kNN on L2-normalised frozen features (``probes.knn_scores``), k cut to the labelled
    count: nothing is fitted or chosen on val."""
    lb = ctx.backbone(cell.init)
    f_train, f_val = ctx.features(cell.init)
    if vb.indices is not None:
        f_val = f_val[torch.from_numpy(vb.indices)]
    k = min(ctx.recipe.evaluate.knn_k, len(idx))
    labels = torch.from_numpy(ctx.train.labels[idx])
    proba = knn_scores(f_train[torch.from_numpy(idx)], labels, f_val, k=k, num_classes=ctx.train.num_classes)
    knn = {"k": k, "k_requested": ctx.recipe.evaluate.knn_k, "vote": KNN_VOTE, "bank": "the labelled subset"}
    selection = {"method": "none", "why": "kNN has no setting chosen on val"}
    return proba, {"knn": knn, "backbone": lb.info, "selection": selection}


def _linear(
    ctx: Context, cell: Cell, run: Run, idx: np.ndarray, vb: ValBudget
) -> tuple[torch.Tensor, dict[str, Any]]:
    ft, train, val = ctx.recipe.finetune, ctx.train, ctx.val
    lb = ctx.backbone(cell.init)
    f_train, f_val = ctx.features(cell.init)
    y_train, y_val = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    if vb.indices is not None:
        sel = torch.from_numpy(vb.indices)
        f_val, y_val = f_val[sel], y_val[sel]
    k = train.num_classes
    t0 = time.perf_counter()
    key = (cell.init, idx.tobytes(), b"full" if vb.indices is None else vb.indices.tobytes())
    if ft.head == "lbfgs":
        # Deterministic: the same subsets (e.g. fraction 1 for every seed) give the same fit: reuse it.
        fit, selection = ctx.fits.get(key) or _select_lbfgs(
            ctx, cell, f_train[idx], y_train[idx], f_val, y_val, vb, f_train
        )
        ctx.fits[key] = (fit, selection)
    else:
        fit, selection = _select_sgd(ctx, cell, f_train[idx], y_train[idx], f_val, y_val, vb, f_train)
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
    return fit.proba(f_val), {**info, "selection": selection}
