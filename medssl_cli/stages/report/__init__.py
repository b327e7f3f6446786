"""`medssl report`: one Markdown + one self-contained HTML report and a summary.json over finished runs.

Scope: every run directly under the runs root (default), or one finetune grid with its pretrain run
and the t-SNE / kNN runs of that pretrain run (``from_grid``). Steps: ``report.collect`` reads the runs
(problems are listed, never skipped), ``report.aggregate`` computes mean / std / t-CI over seeds from
the cells' TEST metrics (val only when no cell has test metrics, flagged), ``report.figures`` draws
the accuracy-vs-fraction plot, ``report.sections`` lays out the content and ``report.render`` writes
it. Figures are copied into ``<out>/plots/`` (report.md links them there; report.html embeds them).

Output: ``--out DIR``, else a new run ``<runs root>/report-<name>-<stamp>/``. Reports are never
collected into later reports. Every file is written atomically.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from pathlib import Path
from typing import Any

from medssl_cli.errors import UserError, short
from medssl_cli.io import writable_dir, write_bytes, write_json, write_text
from medssl_cli.readout.metrics import check_confusion
from medssl_cli.recipe import Recipe
from medssl_cli.runs import Run, create_run, versions
from medssl_cli.stages.report import aggregate, paired, sections
from medssl_cli.stages.report.collect import Collection, collect_grid, collect_root
from medssl_cli.stages.report.figures import fraction_plot
from medssl_cli.stages.report.render import to_html, to_markdown

LOG = logging.getLogger("medssl")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _copy(src: str | None, out: Path, rel: str) -> str | None:
    """Copy a figure into the report directory; the relative path, or None if there is none."""
    if not src or not Path(src).is_file():
        return None
    write_bytes(out / rel, Path(src).read_bytes())
    return rel


def _synthetic(col: Collection) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for r in [*col.pretrain, *col.grids, *col.knn, *col.tsne]:
        for d, s in (r.get("synthetic") or {}).items():
            out[d] = out.get(d, False) or bool(s)
    return out


def _confusions(grid: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """Per init x mode: the finished cell with the largest fraction and the lowest seed (seed 0)."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for c in grid["cells"]:
        if split not in c["metrics"]:
            continue
        key = (c["init"], c["mode"])
        rank = (-float(c["fraction"]), c["seed"])
        if key not in best or rank < (-float(best[key]["fraction"]), best[key]["seed"]):
            best[key] = c
    return list(best.values())


def _grid_figures(g: dict[str, Any], out: Path, primary: bool) -> None:
    grid, split = g["grid"], g["split"]
    synthetic = any(grid["synthetic"].values())
    rel = "plots/fraction_accuracy.png" if primary else f"plots/fraction_accuracy-{_safe(grid['name'])}.png"
    n_eval = sorted({n for r in g["rows"] for n in r["n_eval"]})
    title = (
        ("SYNTHETIC DATA - " if synthetic else "")
        + ("VALIDATION (model-selection split, optimistic) - " if g["fallback"] else "")
        + f"{split} accuracy vs label fraction: {', '.join(grid['datasets'])} ({split} split, "
        + f"n = {'/'.join(map(str, n_eval)) or '?'}), grid {grid['name']}"
    )
    fraction_plot(g["rows"], out / rel, title, grid=grid)
    g["img_fraction"] = rel
    g["img_confusions"] = []
    for c in _confusions(grid, split):
        target = f"plots/confusion-{_safe(grid['name'])}-{_safe(c['name'])}-{split}.png"
        src = c["confusion_png"].get(split)
        if src:
            _copy(src, out, target)
        elif c["metrics"][split].get("confusion"):  # no PNG (e.g. val): draw it from the stored matrix
            from medssl_cli.readout.metrics import plot_confusion

            m = c["metrics"][split]
            title = f"{c['name']} - {split} ({m.get('n')} images), accuracy {m.get('accuracy') or 0:.3f}"
            title = ("SYNTHETIC DATA - " if synthetic else "") + title
            plot_confusion(m["confusion"], m["class_names"], out / target, title)
        else:
            continue
        g["img_confusions"].append((c["name"], target))


def _trial(col: Collection, grid: dict[str, Any] | None = None) -> None:
    """Lay out a one-run collection without writing anything (raises what a damaged run would raise)."""
    grids = []
    if grid is not None:
        split, fallback = aggregate.choose_split(grid["cells"])
        rows = aggregate.group_cells(grid["cells"], split) if split else []
        grids.append({"grid": grid, "split": split, "fallback": fallback, "rows": rows})
        for c in grid["cells"]:  # what _grid_figures reads
            m = c["metrics"].get(split) if split else None
            if m and m.get("confusion") and not c["confusion_png"].get(split):
                check_confusion(m["confusion"], m["class_names"])
    blocks = [
        *sections.protocol(col, grids),
        *sections.pretraining(col),
        *sections.label_efficiency(grids),
        *sections.knn_probes(col),
        *sections.tsne(col),
        *sections.provenance(col, {}, _synthetic(col)),
    ]
    to_markdown(blocks)


def _paired(grid: dict[str, Any], split: str) -> dict[str, Any] | None:
    """The grid's paired comparisons (``paired.compare_grid``); unreadable predictions: a warning."""
    try:
        return paired.compare_grid(grid, split)
    except (OSError, ValueError, KeyError) as exc:
        LOG.warning(f"Paired comparisons of {grid['name']} skipped: predictions unreadable ({exc})")
        return None


def screen(col: Collection) -> Collection:
    """Move every run whose files parse but crash the report's code (wrong types, edited values) to
    "Missing or failed", so one damaged file never stops the report of the others."""
    for attr in ("pretrain", "grids", "knn", "tsne"):
        keep = []
        for rec in getattr(col, attr):
            one = Collection(scope=col.scope, runs_root=col.runs_root, **{attr: [rec]})
            try:
                _trial(one, rec if attr == "grids" else None)
            except Exception as exc:  # noqa: BLE001 - listed with its type and message
                detail = short(f"{type(exc).__name__}: {exc}", 160)
                col.problem(
                    str(rec.get("name")), "damaged run files: not reported", rec.get("status"), detail
                )
            else:
                keep.append(rec)
        setattr(col, attr, keep)
    return col


def build(col: Collection, out: Path) -> dict[str, Any]:
    """Aggregate, draw and copy figures into ``out``, render report.md / report.html / summary.json."""
    col = screen(col)
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    env = versions()
    synthetic = _synthetic(col)
    grids = []
    newest = col.grids[-1]["name"] if col.grids else None
    for grid in col.grids:
        split, fallback = aggregate.choose_split(grid["cells"])
        rows = aggregate.group_cells(grid["cells"], split) if split else []
        g = {"grid": grid, "split": split, "fallback": fallback, "rows": rows}
        if rows:
            _grid_figures(g, out, primary=grid["name"] == newest)
            g["paired"] = _paired(grid, split)
        grids.append(g)
    for p in col.pretrain:
        p["img_loss"] = _copy(p.get("loss_png"), out, f"plots/loss-{_safe(p['name'])}.png")
    for t in col.tsne:
        t["img_tsne"] = _copy(t.get("png"), out, f"plots/tsne-{_safe(t['name'])}.png")

    blocks = [
        *sections.header(col, generated, env, synthetic),
        *sections.protocol(col, grids),
        *sections.pretraining(col),
        *sections.label_efficiency(grids),
        *paired.blocks(grids),
        *sections.knn_probes(col),
        *sections.tsne(col),
        *sections.provenance(col, env, synthetic),
        *sections.missing(col),
    ]
    write_text(out / "report.md", to_markdown(blocks))
    write_text(out / "report.html", to_html(blocks, out, "medssl report"))
    summary = {
        "generated": generated,
        "scope": col.scope,
        "versions": env,
        "datasets": synthetic,
        "statistics": sections.STATS_NOTE,
        "pretrain": col.pretrain,
        "grids": [
            {
                **g["grid"],
                "split": g["split"],
                "fallback_to_val": g["fallback"],
                "groups": g["rows"],
                "img_fraction": g.get("img_fraction"),
                "img_confusions": g.get("img_confusions", []),
                "paired": g.get("paired"),
            }
            for g in grids
        ],
        "knn": col.knn,
        "tsne": col.tsne,
        "missing_or_failed": col.problems,
    }
    write_json(out / "summary.json", summary)
    return summary


def report(
    *,
    runs_root: Path | str = "runs",
    from_grid: Path | str | None = None,
    out: Path | str | None = None,
    name: str | None = None,
) -> Path:
    """Write the report; returns its directory."""
    runs_root = Path(runs_root)
    if from_grid is not None:
        grid = Path(from_grid)
        if not grid.exists() and (runs_root / grid).exists():
            grid = runs_root / grid
        col = collect_grid(grid)
        runs_root = grid.parent if out is None else runs_root
    else:
        if not runs_root.is_dir():
            raise UserError(
                f"Runs root {runs_root} does not exist.", "Pass --runs-root DIR (or --from GRID)."
            )
        col = collect_root(runs_root)
    if col.empty:
        raise UserError(
            f"Nothing to report in {col.scope}: no pretrain, finetune, kNN or t-SNE run.",
            "Run the pipeline first (e.g. `medssl demo`), or pass --runs-root.",
        )
    run: Run | None = None
    if out is None:
        run = create_run(
            runs_root, "report", Recipe(), name=name or "all", extra={"kind": "report", "scope": col.scope}
        )
        target = run.path
    else:
        target = writable_dir(out, "--out")
    try:
        summary = build(col, target)
    except BaseException as exc:
        if run is not None:
            run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if run is not None:
        run.set_status("finished", problems=len(summary["missing_or_failed"]))
    LOG.info(
        f"Report: {target / 'report.html'} ({len(col.pretrain)} pretrain, {len(col.grids)} grid, "
        f"{len(col.knn)} kNN, {len(col.tsne)} t-SNE run(s); {len(col.problems)} missing or failed item(s))"
    )
    return target
