"""`medssl evaluate`: test (or val) metrics of finetune cells, and a kNN probe of a pretrain run.

Head probe (default): ``--from`` a finetune grid (every finished cell) or one cell; default the newest
finished grid under the runs root. The test split is loaded here and only here. Linear cells reuse the
cached frozen features of their backbone (its weights hash must match the one the cell was trained
on); fully fine-tuned cells run their own saved backbone. Per cell: METRICS under the split's key in
``<cell>/metrics.json`` and ``<cell>/plots/confusion_<split>.png``; per grid: the summary in
``<grid>/metrics.json`` (mean ± std over seeds). Evaluate writes into the finetune run it evaluates
(that is where the metrics belong) and nowhere else.

kNN probe (``--probe knn``): ``--from`` a pretrain run; k = ``evaluate.knn_k`` (20) nearest neighbours
by cosine similarity of L2-normalised frozen features, weighted votes (``probes.py``); memory bank =
the whole labelled train split, queries = the test (or val) split. Stages never write into their
parent, so the result is a new run ``<runs root>/evaluate-knn[-<name>]-<stamp>/`` (``kind: knn``) with
``metrics.json`` and ``plots/confusion_<split>.png``.

Leakage guard (``leakage.py``) before anything is computed or written: an ssl backbone must not have
seen the evaluated images or their subjects; ``--allow-leakage`` overrides, recorded as
``leakage_override: true`` with the overlaps in metrics.json.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import torch

from medssl_cli import __version__
from medssl_cli.data import leakage
from medssl_cli.data.pool import Pool, load_split
from medssl_cli.data.registry import data_root
from medssl_cli.errors import UserError
from medssl_cli.grids import finished_cells, grid_lock, write_summary
from medssl_cli.io import read_json, write_json
from medssl_cli.lifecycle import logging_to, recording
from medssl_cli.models import load_weights
from medssl_cli.readout import backbones
from medssl_cli.readout.backbones import LoadedBackbone
from medssl_cli.readout.features import cached, extract
from medssl_cli.readout.metrics import compute_metrics, plot_confusion
from medssl_cli.readout.probes import knn_scores
from medssl_cli.recipe import SECTIONS, Recipe, resolve
from medssl_cli.runs import (
    Run,
    create_run,
    feature_cache_dir,
    find_latest,
    locate,
    resolve_run,
)
from medssl_cli.runtime import compute

LOG = logging.getLogger("medssl")


def _recipe(base: Recipe, recipe_file: Path | None, overrides: dict[str, Any]) -> Recipe:
    """Every section of the evaluated run's recipe < recipe file < CLI (``recipe.resolve``)."""
    return resolve(recipe_file, overrides, base, SECTIONS)


def _device(recipe: Recipe, size: int) -> tuple[torch.device, bool, bool]:
    c = recipe.compute
    device = compute.resolve_device(c.device)
    return (
        device,
        compute.use_bf16(device, c.precision),
        compute.use_channels_last(device, c.channels_last, size),
    )


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
    device, bf16, channels_last = _device(recipe, pool.image_size)
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
        return self.feats[key]

    def _features(self, lb: LoadedBackbone, cache: bool) -> torch.Tensor:
        if cache:
            fs = cached(
                feature_cache_dir(self.grid.path.parent),
                lb,
                self.pool,
                device=self.device,
                bf16=self.bf16,
                channels_last=self.channels_last,
                desc=f"{lb.init} features",
            )
            LOG.info(
                f"{lb.init} features of {len(self.pool)} images "
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


def _evaluate_cell(ev: _Evaluator, c: dict[str, Any], run: Run, split: str, leak: dict[str, Any]) -> None:
    pool = ev.pool
    trained = run.manifest.get("backbone", {})
    feats = ev.frozen(c["init"], trained) if c["mode"] == "linear" else ev.fine_tuned(run)
    state, _ = load_weights(run.file("weights", "head.safetensors"))
    w, b = state["weight"].float(), state["bias"].float()
    if w.shape != (pool.num_classes, feats.shape[1]):
        raise UserError(
            f"{run.path}/weights/head.safetensors has shape {tuple(w.shape)}; expected "
            f"({pool.num_classes}, {feats.shape[1]})."
        )
    proba = torch.softmax(feats @ w.T + b, dim=1)
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


# --------------------------------------------------------------------------------------------
# kNN probe of a pretrain run


def knn_probe(
    overrides: dict[str, Any],
    *,
    from_run: str | Path | None,
    runs_root: Path | str,
    data_dir: Path | str | None = None,
    name: str | None = None,
    recipe_file: Path | None = None,
) -> dict[str, Any]:
    """kNN (k = evaluate.knn_k) of a pretrain run's frozen features: train split -> test/val split."""
    runs_root = Path(runs_root)
    pre = resolve_run(from_run, runs_root, "pretrain")
    recipe = _recipe(pre.recipe(), recipe_file, overrides)
    split, k = recipe.evaluate.split, recipe.evaluate.knn_k
    if k < 1:
        raise UserError(f"--k (evaluate.knn_k) must be >= 1, got {k}.", "E.g. --k 20.")
    root = data_root(data_dir, pre.manifest.get("data", {}).get("root"))
    compute.configure_threads(recipe.compute.threads)
    bank, queries = load_split(recipe, root, "train"), load_split(recipe, root, split)
    if k > len(bank):  # knn_scores would clamp silently: record the k actually used
        LOG.info(
            f"kNN: k = {k} is more than the {len(bank)} train images in the bank; using k = {len(bank)}."
        )
        k = len(bank)
    what = f"the {split} split of {', '.join(queries.dataset_ids)}"
    leak = leakage.check(pre, queries.seen(), root, recipe.evaluate.allow_leakage, what)
    lb = backbones.from_pretrain_run(pre, bank.channels)
    device, bf16, channels_last = _device(recipe, bank.image_size)
    extra = {
        "kind": "knn",
        "split": split,
        "probe": {
            "k": k,
            "k_requested": recipe.evaluate.knn_k,
            "vote": "weighted exp(cos/0.07)",
            "bank": "train",
        },
        "data": {"root": str(root), "train": bank.provenance(), split: queries.provenance()},
    }
    run = create_run(
        runs_root, "evaluate", recipe, name=f"knn-{name}" if name else "knn", parent=pre, extra=extra
    )
    with recording(run):
        cache = feature_cache_dir(runs_root)
        f_bank = cached(
            cache, lb, bank, device=device, bf16=bf16, channels_last=channels_last, desc="train features"
        )
        f_q = cached(
            cache,
            lb,
            queries,
            device=device,
            bf16=bf16,
            channels_last=channels_last,
            desc=f"{split} features",
        )
        scores = knn_scores(
            f_bank.features, torch.from_numpy(bank.labels), f_q.features, k=k, num_classes=bank.num_classes
        )
        metrics = compute_metrics(
            queries.labels,
            scores.argmax(1).numpy(),
            scores.numpy(),
            queries.class_names,
            ci=recipe.evaluate.ci,
        )
        write_json(
            run.file("metrics.json"),
            {
                split: metrics,
                "probe": extra["probe"],
                "leakage_override": bool(leak.get("override")),
                "leakage": {split: leak},
            },
        )
        title = f"kNN (k={k}) of {pre.path.name} - {split}, accuracy {metrics['accuracy']:.3f}"
        title = ("SYNTHETIC DATA - " if queries.synthetic else "") + title
        plot_confusion(
            metrics["confusion"], queries.class_names, run.file("plots", f"confusion_{split}.png"), title
        )
        run.set_status(
            "finished", accuracy=metrics["accuracy"], balanced_accuracy=metrics["balanced_accuracy"]
        )
        lo, hi = metrics["accuracy_ci"]
        LOG.info(
            f"kNN probe (k={k}) of {pre.path.name} on {what}: accuracy {metrics['accuracy']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], balanced {metrics['balanced_accuracy']:.3f}. Run: {run.path}"
        )
    return {"run": str(run.path), split: metrics}
