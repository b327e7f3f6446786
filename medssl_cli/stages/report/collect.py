"""Read run directories into plain records for the report; every problem becomes a listed entry.

Nothing here raises on a damaged or unfinished run: a run or cell that is not finished, a cell that
the grid's run.json plans but that is absent, a missing metrics file or plot, all end up in
``Collection.problems`` ("Missing or failed" in the report), never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medssl_cli.errors import short
from medssl_cli.io import read_json
from medssl_cli.recipe import METHOD_NAMES
from medssl_cli.runs import locate

SKIP_STAGES = ("report", "demo", "embed")  # this command's outputs, the demo wrapper, exported features


@dataclass
class Collection:
    scope: str
    runs_root: Path
    pretrain: list[dict[str, Any]] = field(default_factory=list)
    grids: list[dict[str, Any]] = field(default_factory=list)
    knn: list[dict[str, Any]] = field(default_factory=list)
    tsne: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, where: str, what: str, status: str | None = None, detail: str | None = None) -> None:
        self.problems.append({"where": where, "what": what, "status": status, "detail": detail})

    @property
    def empty(self) -> bool:
        return not (self.pretrain or self.grids or self.knn or self.tsne)


def _json(path: Path) -> tuple[Any, str | None]:
    try:
        return read_json(path), None
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except (ValueError, OSError) as exc:
        return None, f"{path.name} unreadable ({type(exc).__name__})"


def synthetic_map(ids: list[str], provenance: dict[str, Any] | None) -> dict[str, bool]:
    """{dataset id: synthetic?} from a provenance's "synthetic" map (ids named synthetic_* always are)."""
    recorded = (provenance or {}).get("synthetic") or {}
    recorded = recorded if isinstance(recorded, dict) else {}
    return {d: bool(recorded.get(d)) or d.startswith("synthetic_") for d in ids}


def _recipe_value(run_dir: Path, section: str, key: str | None) -> Any:
    """recipe.yaml's ``section.key`` (``key`` None: the whole section); None if unreadable."""
    try:
        data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
        part = data.get(section) or {}
        return part if key is None else part.get(key)
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def grid_settings(ft: dict[str, Any] | None) -> str | None:
    """The training settings a methods section needs, per mode of the grid (from its finetune recipe)."""
    if not isinstance(ft, dict):
        return None
    parts = []
    modes = ft.get("modes") or []
    if "linear" in modes and ft.get("head") == "sgd":
        parts.append(
            f"linear: SGD head (AdamW), lr {ft.get('lr_head')}, weight decay {ft.get('weight_decay')}, "
            f"batch {ft.get('batch_size')}, up to {ft.get('epochs')} epochs, early stopping on val "
            f"(patience {ft.get('patience')})"
        )
    elif "linear" in modes:
        parts.append(f"linear: L-BFGS logistic regression, C from {ft.get('c_grid')} chosen on val")
    if "knn" in modes:
        parts.append(
            "knn: weighted kNN (cosine, k = evaluate.knn_k cut to the labelled count), nothing chosen"
        )
    if "full" in modes:
        parts.append(
            f"full: AdamW, lr backbone {ft.get('lr_backbone')} / head {ft.get('lr_head')}, weight decay "
            f"{ft.get('weight_decay')}, batch {ft.get('batch_size')}, up to {ft.get('epochs')} epochs, early "
            f"stopping on val (patience {ft.get('patience')})"
        )
    return "; ".join(parts) or None


def _file(path: Path) -> str | None:
    return str(path) if path.is_file() else None


def _base(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    parent = info.get("parent")
    return {
        "name": path.name,
        "path": str(path),
        "stage": info.get("stage"),
        "status": info.get("status", "?"),
        "parent": parent,
        "parent_name": Path(parent).name if parent else None,
        "recipe_hash": info.get("recipe_hash"),
        "versions": info.get("versions") or {},
        "started": info.get("started"),
        "error": info.get("error"),
    }


def read_pretrain(path: Path, info: dict[str, Any], col: Collection) -> dict[str, Any]:
    data = info.get("data") or {}
    metrics = info.get("metrics")
    if metrics is None:
        metrics, err = _json(path / "metrics.json")
        if err and info.get("status") == "finished":
            col.problem(path.name, f"pretrain run without metrics ({err})", info.get("status"))
    metrics = metrics or {}
    rec = {
        **_base(path, info),
        "datasets": list(data.get("datasets") or []),
        "synthetic": synthetic_map(list(data.get("datasets") or []), data),
        "splits": list(data.get("splits") or []),
        "n_images": data.get("n_images"),
        "image_size": data.get("image_size"),
        "epochs": metrics.get("epochs"),
        "epochs_planned": _recipe_value(path, "pretrain", "epochs"),
        "batch_size": _recipe_value(path, "pretrain", "batch_size"),
        "final_loss": metrics.get("final_loss"),
        "first_epoch_loss": metrics.get("first_epoch_loss"),
        "samples_per_s": metrics.get("samples_per_s"),
        "train_time_s": metrics.get("train_time_s"),
        "knn_val_accuracy": metrics.get("knn_val_accuracy"),
        "rankme": metrics.get("rankme"),
        "rankme_peak": metrics.get("rankme_peak"),
        "rankme_init": metrics.get("rankme_init"),
        "rankme_collapsed": metrics.get("rankme_collapsed"),
        "method": method_name(info),
        "device": info.get("device"),
        "precision": info.get("precision"),
        "loss_png": _file(path / "plots" / "loss.png"),
    }
    if rec["status"] == "finished" and rec["loss_png"] is None:
        col.problem(path.name, "pretrain run without plots/loss.png", rec["status"])
    return rec


def _cell(grid: Path, planned: dict[str, Any], col: Collection) -> dict[str, Any]:
    name = planned.get("name", "?")
    path = grid / "cells" / name
    rec: dict[str, Any] = {
        "name": name,
        "index": planned.get("index"),
        "init": planned.get("init"),
        "mode": planned.get("mode"),
        "fraction": planned.get("fraction"),
        "seed": planned.get("seed"),
        "path": str(path),
        "status": "absent",
        "metrics": {},
        "leakage_override": False,
        "confusion_png": {},
        "predictions": {},
    }
    where = f"{grid.name}/cells/{name}"
    info, err = _json(path / "run.json")
    if info is None:
        col.problem(
            where, "cell planned in the grid's run.json but absent" if not path.exists() else err, "absent"
        )
        return rec
    rec["status"] = info.get("status", "?")
    subset = info.get("subset") or {}
    rec.update(
        n_train=subset.get("n"), floor_raised=bool(subset.get("floor_raised")), error=info.get("error")
    )
    if rec["status"] != "finished":
        col.problem(where, "cell not finished", rec["status"], info.get("error"))
        return rec
    m, err = _json(path / "metrics.json")
    if m is None:
        col.problem(where, f"finished cell without metrics ({err})", rec["status"])
        return rec
    rec["metrics"] = {s: m[s] for s in ("val", "test") if isinstance(m.get(s), dict)}
    rec["leakage_override"] = bool(m.get("leakage_override"))
    rec["n_train"] = rec["n_train"] or (m.get("cell") or {}).get("n_train")
    rec["confusion_png"] = {
        s: str(path / "plots" / f"confusion_{s}.png")
        for s in ("val", "test")
        if (path / "plots" / f"confusion_{s}.png").is_file()
    }
    rec["predictions"] = {
        s: str(path / f"predictions_{s}.csv")
        for s in ("val", "test")
        if (path / f"predictions_{s}.csv").is_file()
    }
    return rec


def method_name(info: dict[str, Any]) -> str:
    """ "Barlow Twins" / "VICReg" / "SimCLR": a pretrain run's method, from its run.json."""
    method = str((info.get("method") or {}).get("method") or "barlow_twins")
    return METHOD_NAMES.get(method, method)


def _method_name(info: dict[str, Any], grid: Path) -> str:
    """The method of the grid's pretrain run, for the grid's ssl rows."""
    parent = info.get("parent")
    pinfo, _ = (
        _json(locate(parent, grid.parent) / "run.json")
        if isinstance(parent, str) and parent
        else (None, None)
    )
    return method_name(pinfo if isinstance(pinfo, dict) else {})


def read_grid(path: Path, info: dict[str, Any], col: Collection) -> dict[str, Any]:
    data = info.get("data") or {}
    train = data.get("train") or {}
    planned = info.get("cells") or []
    cells = [_cell(path, c, col) for c in planned]
    rec = {
        **_base(path, info),
        "datasets": list(train.get("datasets") or []),
        "data_root": data.get("root"),
        "synthetic": synthetic_map(list(train.get("datasets") or []), train),
        "class_names": train.get("class_names"),
        "n_train_split": train.get("n_images"),
        "n_val": (data.get("val") or {}).get("n_images"),
        "head": _recipe_value(path, "finetune", "head"),
        # grids from before the budget existed chose on the whole val split: "full"
        "val_budget": str(_recipe_value(path, "finetune", "val_budget") or "full"),
        "ssl_name": _method_name(info, path),
        "settings": grid_settings(_recipe_value(path, "finetune", None)),
        "cells_planned": len(planned),
        "cells": cells,
    }
    if not planned:
        col.problem(path.name, "finetune grid lists no cells in its run.json", rec["status"])
    finished = [c for c in cells if c["status"] == "finished"]
    with_test = [c for c in finished if "test" in c["metrics"]]
    if finished and not with_test:
        col.problem(
            path.name,
            "no cell has TEST metrics: the comparison table shows VAL metrics",
            rec["status"],
            f"run `medssl evaluate --from {path}`",
        )
    elif with_test:
        for c in finished:
            if "test" not in c["metrics"]:
                col.problem(
                    f"{path.name}/cells/{c['name']}", "finished cell without test metrics", "finished"
                )
    return rec


def read_knn(path: Path, info: dict[str, Any], col: Collection) -> dict[str, Any]:
    split = info.get("split", "test")
    prov = (info.get("data") or {}).get(split) or {}
    m, err = _json(path / "metrics.json")
    if m is None and info.get("status") == "finished":
        col.problem(path.name, f"kNN probe run without metrics ({err})", info.get("status"))
    m = m or {}
    return {
        **_base(path, info),
        "split": split,
        "k": (info.get("probe") or {}).get("k"),
        "datasets": list(prov.get("datasets") or []),
        "synthetic": synthetic_map(list(prov.get("datasets") or []), prov),
        "metrics": m.get(split),
        "leakage_override": bool(m.get("leakage_override")),
        "confusion_png": _file(path / "plots" / f"confusion_{split}.png"),
    }


def read_tsne(path: Path, info: dict[str, Any], col: Collection) -> dict[str, Any]:
    m, err = _json(path / "metrics.json")
    rec = {**_base(path, info), "split": info.get("split"), "png": _file(path / "plots" / "tsne.png")}
    if info.get("status") == "finished":
        if m is None:
            col.problem(path.name, f"t-SNE run without metrics ({err})", info.get("status"))
        if rec["png"] is None:
            col.problem(path.name, "t-SNE run without plots/tsne.png", info.get("status"))
    m = m or {}
    ids = list(m.get("datasets") or [])
    rec.update(
        n=m.get("n"),
        datasets=ids,
        synthetic={d: bool((m.get("synthetic") or {}).get(d)) or d.startswith("synthetic_") for d in ids},
        backbones=m.get("backbones") or [],
        knn_k=(m.get("knn") or {}).get("k"),
        perplexity=(m.get("tsne") or {}).get("perplexity"),
        perplexity_requested=(m.get("tsne") or {}).get("perplexity_requested"),
        chance_accuracy=m.get("chance_accuracy"),
        leakage_override=bool(m.get("leakage_override")),
    )
    return rec


def _add(col: Collection, path: Path, info: dict[str, Any]) -> None:
    stage, status = info.get("stage"), info.get("status", "?")
    if stage in SKIP_STAGES:
        return
    if status != "finished" and not (stage == "finetune" and info.get("kind") == "grid"):
        col.problem(path.name, f"{stage} run not finished", status, info.get("error"))
    if stage == "pretrain":
        col.pretrain.append(read_pretrain(path, info, col))
    elif stage == "finetune" and info.get("kind") == "grid":
        grid = read_grid(path, info, col)
        if status != "finished":  # counted from the cells: a killed grid never wrote its totals
            n_done = sum(c["status"] == "finished" for c in grid["cells"])
            col.problem(
                path.name,
                "finetune grid not finished",
                status,
                f"{n_done} of {grid['cells_planned']} cells finished",
            )
        col.grids.append(grid)
    elif stage == "evaluate" and info.get("kind") == "knn":
        col.knn.append(read_knn(path, info, col))
    elif stage == "tsne":
        col.tsne.append(read_tsne(path, info, col))
    else:
        col.problem(
            path.name, f"unrecognised run (stage {stage}, kind {info.get('kind')}); not reported", status
        )


def _add_checked(col: Collection, path: Path, info: dict[str, Any]) -> None:
    """``_add``; a run whose files parse but hold the wrong types is listed, never a traceback."""
    try:
        _add(col, path, info)
    except Exception as exc:  # noqa: BLE001 - any damage in a run's files becomes a listed problem
        col.problem(path.name, f"damaged run files ({type(exc).__name__}: {short(str(exc), 120)})")


def _sort(col: Collection) -> Collection:
    for items in (col.pretrain, col.grids, col.knn, col.tsne):
        items.sort(key=lambda r: (r.get("started") or "", r["name"]))
    return col


def collect_root(runs_root: Path) -> Collection:
    """Every run directly under ``runs_root`` (hidden folders such as .cache are not runs)."""
    col = Collection(scope=f"all runs under {runs_root}", runs_root=runs_root)
    if not runs_root.is_dir():
        return col
    for d in sorted(p for p in runs_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info, err = _json(d / "run.json")
        if not isinstance(info, dict):
            col.problem(d.name, f"not a readable run ({err or 'run.json is not an object'})")
            continue
        _add_checked(col, d, info)
    return _sort(col)


def collect_grid(grid: Path) -> Collection:
    """One finetune grid, its pretrain run, and the t-SNE / kNN runs of that pretrain run beside it."""
    col = Collection(scope=f"finetune grid {grid}", runs_root=grid.parent)
    info, err = _json(grid / "run.json")
    if not isinstance(info, dict) or info.get("stage") != "finetune" or info.get("kind") != "grid":
        from medssl_cli.errors import UserError

        raise UserError(f"--from {grid} is not a finetune grid ({err or 'stage/kind differ'}).")
    _add_checked(col, grid, info)
    parent_name = info.get("parent")
    parent = locate(parent_name, grid.parent) if isinstance(parent_name, str) and parent_name else None
    if parent is not None:
        pinfo, perr = _json(parent / "run.json")
        if isinstance(pinfo, dict):
            _add_checked(col, parent, pinfo)
        else:
            col.problem(parent.name, f"the grid's pretrain run is missing ({perr})")
        for d in sorted(p for p in grid.parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
            sinfo, _ = _json(d / "run.json")
            if not isinstance(sinfo, dict) or sinfo.get("stage") not in ("tsne", "evaluate"):
                continue
            sparent = sinfo.get("parent")
            if (
                isinstance(sparent, str)
                and sparent
                and locate(sparent, grid.parent).resolve() == parent.resolve()
            ):
                _add_checked(col, d, sinfo)
    return _sort(col)
