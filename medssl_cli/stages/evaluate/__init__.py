"""`medssl evaluate`: test (or val) metrics of finetune cells, and a kNN probe of a pretrain run.

Head probe (default): ``--from`` a finetune grid (every finished cell) or one cell; default the newest
finished grid under the runs root. The test split is loaded here and only here. Linear cells reuse the
cached frozen features of their backbone (its weights hash must match the one the cell was trained
on); fully fine-tuned cells run their own saved backbone. Per cell: METRICS under the split's key in
``<cell>/metrics.json`` and ``<cell>/plots/confusion_<split>.png``; per grid: the summary in
``<grid>/metrics.json`` (mean ± std over seeds). Evaluate writes into the finetune run it evaluates
(that is where the metrics belong) and nowhere else.

kNN probe (``--probe knn``, ``knn_probe.py``): ``--from`` a pretrain run; a new run
``<runs root>/evaluate-knn[-<name>]-<stamp>/``.

Leakage guard (``leakage.py``) before anything is computed or written: an ssl backbone must not have
seen the evaluated images or their subjects; ``--allow-leakage`` overrides, recorded as
``leakage_override: true`` with the overlaps in metrics.json.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl_cli import __version__
from medssl_cli.data import leakage
from medssl_cli.data.pool import Pool, load_split
from medssl_cli.data.registry import data_root
from medssl_cli.errors import UserError
from medssl_cli.grids import finished_cells, grid_lock, write_summary
from medssl_cli.io import read_json, write_json
from medssl_cli.lifecycle import logging_to
from medssl_cli.models import load_weights
from medssl_cli.readout import backbones
from medssl_cli.readout.backbones import LoadedBackbone
from medssl_cli.readout.features import cached, extract
from medssl_cli.readout.metrics import compute_metrics, plot_confusion
from medssl_cli.readout.probes import knn_scores
from medssl_cli.recipe import SECTIONS, Recipe, resolve
from medssl_cli.runs import (
    Run,
    feature_cache_dir,
    find_latest,
    locate,
)
from medssl_cli.runtime import compute
from medssl_cli.stages.evaluate.knn_probe import knn_probe
from medssl_cli.stages.evaluate.predictions import write_predictions

LOG = logging.getLogger("medssl")


def _recipe(base: Recipe, recipe_file: Path | None, overrides: dict[str, Any]) -> Recipe:
    """Every section of the evaluated run's recipe < recipe file < CLI (``recipe.resolve``)."""
    return resolve(recipe_file, overrides, base, SECTIONS)


def evaluate(
    overrides: dict[str, Any],
    *,
    from_run: str | Path | None = None,
    runs_root: Path | str = "runs",
    probe: str = "head",
    data_dir: Path | str | None = None,
    name: str | None = None,
    recipe_file: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a finetune grid/cell (``probe="head"``) or a pretrain run (``probe="knn"``)."""
    if probe == "knn":
        return knn_probe(
            overrides,
            from_run=from_run,
            runs_root=runs_root,
            data_dir=data_dir,
            name=name,
            recipe_file=recipe_file,
        )
    if probe != "head":
        raise UserError(
            f"Unknown probe '{probe}'.", "Use --probe head (finetune runs) or --probe knn (pretrain run)."
        )
    grid, cells = grid_and_cells(from_run, Path(runs_root))
    recipe = _recipe(grid.recipe(), recipe_file, overrides)
    if recipe.data != grid.recipe().data or recipe.model != grid.recipe().model:
        raise UserError(
            "Evaluating a finetune grid uses the grid's own data and model settings.",
            "Drop the data/model keys from --recipe (for other data, fine-tune again).",
        )
    split = recipe.evaluate.split
    info = grid.manifest
    root = data_root(data_dir, info.get("data", {}).get("root"))
    compute.configure_threads(recipe.compute.threads)
    pool = load_split(recipe, root, split)
    trained_on = info.get("data", {}).get("train", {}).get("class_names")
    if trained_on is not None and trained_on != pool.class_names:
        raise UserError(
            f"The {split} data's classes differ from the classes grid {grid.path.name} was trained on."
        )
    parent = Run(locate(info["parent"], grid.path.parent)) if info.get("parent") else None
    ssl_cells = [c for c, _ in cells if c["init"] == "ssl"]
    what = f"the {split} split of {', '.join(pool.dataset_ids)}"
    leak = leakage.check(
        parent if ssl_cells else None, pool.seen(), root, recipe.evaluate.allow_leakage, what
    )
    no_leak = leakage.check(None, {}, root, True, what)
    device, bf16, channels_last = compute.settings_for(recipe.compute, pool.image_size)
    with logging_to(grid):
        LOG.info(f"Evaluating {len(cells)} cell(s) of {grid.path.name} on {what} ({len(pool)} images)")
        if leak.get("override"):
            LOG.warning(f"Leakage override: {leak['overlaps']}")
        ev = _Evaluator(recipe, grid, parent, pool, device, bf16, channels_last)
        for c, run in cells:
            _evaluate_cell(ev, c, run, split, leak if c["init"] == "ssl" else no_leak)
        summary = write_summary(grid, split)
        _log_groups(summary, split)
    return summary


def grid_and_cells(
    from_run: str | Path | None, runs_root: Path
) -> tuple[Run, list[tuple[dict[str, Any], Run]]]:
    """(grid, [(cell dict, finished cell run)]) for --from GRID_OR_CELL (default: newest finished grid)."""
    if from_run is None:
        grid = find_latest(runs_root, "finetune")
        return grid, finished_cells(grid)
    p = Path(from_run)
    if not p.exists() and (runs_root / p).exists():
        p = runs_root / p
    if not (p / "run.json").is_file():
        raise UserError(f"--from {from_run}: no run there.", "Pass a finetune grid or cell directory.")
    run = Run(p)
    info = run.manifest
    if info.get("stage") != "finetune":
        hint = (
            "For a pretrain run use --probe knn."
            if info.get("stage") == "pretrain"
            else "Pass a finetune run."
        )
        raise UserError(f"--from {from_run} is a {info.get('stage')} run, not a finetune run.", hint)
    if info.get("kind") == "cell":
        if info.get("status") != "finished":
            raise UserError(
                f"Cell {p} is {info.get('status')}, not finished.", "Resume its grid with --resume."
            )
        cell = {k: info[k] for k in ("index", "name", "init", "mode", "fraction", "seed")}
        # the grid the cell lies in (cells/<name> below it), which is where a moved or copied grid is
        grid_dir = p.parent.parent
        if not (grid_dir / "run.json").is_file() or Run(grid_dir).manifest.get("kind") != "grid":
            grid_dir = locate(info["grid"], p.parent.parent.parent)
        return Run(grid_dir), [(cell, run)]
    cells = finished_cells(run)
    if not cells:
        raise UserError(
            f"Grid {p} has no finished cell yet.", f"Finish it first: medssl finetune --resume {p}."
        )
    total = len(info.get("cells", []))
    if len(cells) < total:
        LOG.warning(f"Grid {p.name}: only {len(cells)} of {total} cells finished; evaluating those")
    return run, cells


class _Evaluator:
    """Backbones and features shared by the cells of one evaluation."""

    def __init__(
        self,
        recipe: Recipe,
        grid: Run,
        parent: Run | None,
        pool: Pool,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
    ) -> None:
        self.recipe, self.grid, self.parent, self.pool = recipe, grid, parent, pool
        self.device, self.bf16, self.channels_last = device, bf16, channels_last
        self.feats: dict[str, torch.Tensor] = {}
        self.loaded: dict[str, LoadedBackbone] = {}
        self.train_feats: dict[str, torch.Tensor] = {}
        self._train: Pool | None = None

    def bank(self, init: str, trained: dict[str, Any], run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        """A kNN cell's memory bank: frozen train features and labels of its labelled subset (the rows
        its ``subset_indices.json`` records, checked against the train split's labels)."""
        self.frozen(init, trained)  # loads (and checks) the backbone
        key = trained.get("state_hash", "")
        if self._train is None:
            self._train = load_split(self.recipe, self.pool.root, "train")
        train = self._train
        if key not in self.train_feats:
            self.train_feats[key] = self._features(self.loaded[key], cache=True, pool=train)
        sub = read_json(run.file("subset_indices.json"))
        idx = np.asarray(sub.get("indices", []), dtype=np.int64)
        ok = len(idx) and idx.min() >= 0 and idx.max() < len(train)
        if not ok or train.labels[idx].tolist() != sub.get("label"):
            raise UserError(
                f"{run.file('subset_indices.json')} does not match the train split of {self.pool.root}.",
                "Evaluate with the data the grid was fine-tuned on, or fine-tune again.",
            )
        return self.train_feats[key][torch.from_numpy(idx)], torch.from_numpy(train.labels[idx])

    def frozen(self, init: str, trained: dict[str, Any]) -> torch.Tensor:
        """Features of the pool from the frozen backbone a linear cell was trained on (hash checked)."""
        key = trained.get("state_hash", "")
        if key not in self.feats:
            c = self.pool.channels
            if init == "ssl":
                if self.parent is None:
                    raise UserError(f"Grid {self.grid.path} has no pretrain run recorded for its ssl cells.")
                lb = backbones.from_pretrain_run(self.parent, c)
            elif init == "imagenet":
                lb = backbones.imagenet(c)
            else:  # the grid's own copy (the recorded path may be relative, or from before a move)
                recorded = Path(trained.get("source", ""))
                lb = backbones.from_file(self.grid.file("backbones", recorded.name), c)
            if key and lb.key != key:
                raise UserError(
                    f"The {init} backbone ({lb.info.get('source')}) is not the one the cells were trained on "
                    f"(weights hash {lb.key} != {key}).",
                    "Restore the original weights, or fine-tune again.",
                )
            self.feats[key] = self._features(lb, cache=True)
            self.loaded[key] = lb
        return self.feats[key]

    def _features(self, lb: LoadedBackbone, cache: bool, pool: Pool | None = None) -> torch.Tensor:
        pool = pool or self.pool
        if cache:
            fs = cached(
                feature_cache_dir(self.grid.path.parent),
                lb,
                pool,
                device=self.device,
                bf16=self.bf16,
                channels_last=self.channels_last,
                desc=f"{lb.init} features",
            )
            LOG.info(
                f"{lb.init} features of {len(pool)} images "
                + ("read from the cache" if fs.hit else f"extracted in {fs.seconds:.1f} s")
            )
            return fs.features
        module = lb.module.to(self.device)
        return extract(
            module,
            self.pool.images,
            (lb.mean, lb.std),
            device=self.device,
            bf16=self.bf16,
            channels_last=self.channels_last,
            desc=f"{lb.init} fine-tuned features",
        )

    def fine_tuned(self, run: Run) -> torch.Tensor:
        lb = backbones.from_file(run.file("weights", "backbone.safetensors"), self.pool.channels)
        return self._features(lb, cache=False)


def _cell_proba(ev: _Evaluator, c: dict[str, Any], run: Run) -> torch.Tensor:
    """Class probabilities of the evaluated images: head on frozen (linear) or fine-tuned (full)
    features, or the kNN vote shares of the cell's labelled subset (knn)."""
    pool = ev.pool
    trained = run.manifest.get("backbone", {})
    if c["mode"] == "knn":
        bank, labels = ev.bank(c["init"], trained, run)
        k = int((run.manifest.get("knn") or {}).get("k") or min(ev.recipe.evaluate.knn_k, len(labels)))
        return knn_scores(bank, labels, ev.frozen(c["init"], trained), k=k, num_classes=pool.num_classes)
    feats = ev.frozen(c["init"], trained) if c["mode"] == "linear" else ev.fine_tuned(run)
    state, _ = load_weights(run.file("weights", "head.safetensors"))
    w, b = state["weight"].float(), state["bias"].float()
    if w.shape != (pool.num_classes, feats.shape[1]):
        raise UserError(
            f"{run.path}/weights/head.safetensors has shape {tuple(w.shape)}; expected "
            f"({pool.num_classes}, {feats.shape[1]})."
        )
    return torch.softmax(feats @ w.T + b, dim=1)


def _evaluate_cell(ev: _Evaluator, c: dict[str, Any], run: Run, split: str, leak: dict[str, Any]) -> None:
    pool = ev.pool
    proba = _cell_proba(ev, c, run)
    metrics = compute_metrics(
        pool.labels,
        proba.argmax(1).numpy(),
        proba.numpy(),
        pool.class_names,
        ci=ev.recipe.evaluate.ci,
        seed=int(c["seed"]),
    )
    evaluated = {
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "medssl": __version__,
        "data": pool.provenance()["fingerprint"],
        "datasets": pool.dataset_ids,
        "ci": ev.recipe.evaluate.ci,
    }
    metrics["predictions"] = write_predictions(run.file(f"predictions_{split}.csv"), pool, proba)
    record_cell_metrics(ev.grid.path, run.file("metrics.json"), split, metrics, leak, evaluated)
    title = f"{c['name']} - {split} ({metrics['n']} images), accuracy {metrics['accuracy']:.3f}"
    title = ("SYNTHETIC DATA - " if pool.synthetic else "") + title
    plot_confusion(metrics["confusion"], pool.class_names, run.file("plots", f"confusion_{split}.png"), title)
    lo, hi = metrics["accuracy_ci"]
    LOG.info(
        f"{c['name']}: {split} accuracy {metrics['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], balanced "
        f"{metrics['balanced_accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, AUROC "
        + (f"{metrics['auroc']:.3f}" if metrics["auroc"] is not None else "n/a")
    )


def record_cell_metrics(
    grid: Path,
    path: Path,
    split: str,
    metrics: dict[str, Any],
    leak: dict[str, Any],
    evaluated: dict[str, Any],
) -> None:
    """Add ``split``'s metrics to a cell's metrics.json. Read-modify-write under the grid lock: two
    evaluates of one grid (--split test and val at once) would otherwise each write back the file they
    read and drop the other's split."""
    with grid_lock(grid):
        m = read_json(path) if path.exists() else {}
        m[split] = metrics
        m["leakage_override"] = bool(m.get("leakage_override")) or bool(leak.get("override"))
        m.setdefault("leakage", {})[split] = leak
        m.setdefault("evaluated", {})[split] = evaluated
        write_json(path, m)


def _log_groups(summary: dict[str, Any], split: str) -> None:
    for g in summary["groups"]:
        a = g["accuracy"]
        spread = f" ± {a['std']:.3f} ({a['n']} seeds)" if a["std"] is not None else f" ({a['n']} seed)"
        LOG.info(
            f"{g['init']:>8} {g['mode']:<6} fraction {g['fraction']:<6g} {split} accuracy "
            f"{a['mean']:.3f}{spread}"
        )
