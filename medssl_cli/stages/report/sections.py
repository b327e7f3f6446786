"""The report's content as blocks (``render.py``): protocol, pretraining, label efficiency, kNN probes,
t-SNE, provenance, and the "Missing or failed" list. Every place that names a dataset marks a synthetic
one as "(SYNTHETIC)".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl_cli.data.leakage import related
from medssl_cli.stages.report.aggregate import METRIC_KEYS
from medssl_cli.stages.report.budget import describe as budget_sentence
from medssl_cli.stages.report.budget import optimism_gap
from medssl_cli.stages.report.collect import Collection
from medssl_cli.stages.report.figures import init_name, pct_label
from medssl_cli.stages.report.render import Block, Bullets, Heading, Image, Para, Table

STATS_NOTE = (
    "mean ± sample std (ddof = 1) over seeds; [95% CI] = Student t interval of the mean over seeds, "
    "mean ± t(0.975, n-1) · std / sqrt(n) (seed-to-seed variation; n/a with one seed). Per-run CI: the "
    "mean over seeds of each run's own 95% interval for accuracy (from evaluate; Wilson unless stated), "
    "i.e. the test-set sampling uncertainty of a single run; the seeds are not pooled into one interval "
    "because they are scored on the same test images."
)


SOFTWARE = ("medssl", "torch", "mimeta")
LEAK_MARK = " [LEAKAGE OVERRIDE]"


def ds_label(ds: str, synthetic: dict[str, bool]) -> str:
    return f"{ds} (SYNTHETIC)" if synthetic.get(ds) or ds.startswith("synthetic_") else ds


def ds_list(ids: list[str], synthetic: dict[str, bool]) -> str:
    return ", ".join(ds_label(d, synthetic) for d in ids) or "?"


def num(x: Any, digits: int = 3, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{scale * float(x):.{digits}f}"


def stat(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """'91.2 ± 1.3 [88.0, 94.4]'; one seed: '91.2 (1 seed)'; equal seeds: '91.2 (same in 3 seeds)';
    an interval clipped to the metric's range ends in '*'."""
    if s.get("mean") is None:
        return "n/a"
    m = num(s["mean"], digits, scale)
    if s.get("identical"):
        return f"{m} (same in {s['n']} seeds)"
    if s.get("n", 0) < 2 or s.get("std") is None:
        return f"{m} (1 seed)"
    lo, hi = s["ci"]
    star = "*" if s.get("ci_clipped") else ""
    return f"{m} ± {num(s['std'], digits, scale)} [{num(lo, digits, scale)}, {num(hi, digits, scale)}]{star}"


def _clipped(r: dict[str, Any]) -> str:
    asked = r.get("perplexity_requested")
    return f" (clipped from {asked:g} for the sample size)" if asked and asked != r.get("perplexity") else ""


def pct(x: Any) -> str:
    return num(x, 1, 100)


def interval(ci: list[float] | None) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{pct(ci[0])}, {pct(ci[1])}]"


def _span(values: list[Any]) -> str:
    v = sorted({x for x in values if x is not None})
    return "?" if not v else str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"


def header(
    col: Collection, generated: str, versions: dict[str, str], synthetic: dict[str, bool]
) -> list[Block]:
    blocks: list[Block] = [
        Heading(1, "medssl report"),
        Para(
            f"Generated {generated} by medssl {versions.get('medssl')} (torch {versions.get('torch')}, "
            f"mimeta {versions.get('mimeta')}) from {col.scope}."
        ),
    ]
    fake = sorted(d for d, s in synthetic.items() if s)
    if fake:
        blocks.append(
            Para(
                f"SYNTHETIC DATA: {', '.join(fake)} are generated images (medssl data synth), not patients. "
                "Their numbers show that the pipeline works; they say nothing about medical performance.",
                "warning",
            )
        )
    if col.problems:
        blocks.append(
            Para(f"{len(col.problems)} missing or failed item(s): see 'Missing or failed' below.", "warning")
        )
    return blocks


def protocol(col: Collection, grids: list[dict[str, Any]]) -> list[Block]:
    items = [
        "Data: the official MIMeta train/val/test splits (splits/*.txt, read via mimeta); no re-splitting."
    ]
    for p in col.pretrain:
        splits = p["splits"] or ["?"]
        flag = "" if splits == ["train"] else "  NOTE: not the train split alone."
        data = ds_list(p["datasets"], p["synthetic"])
        items.append(
            f"Pretraining {p['name']}: splits {', '.join(splits)} of {data} (its run.json), no labels.{flag}"
        )
    items += [
        "Model selection on val only: the linear head's C (L-BFGS grid) or the epoch (early stopping); "
        "finetune never loads the test split.",
        "Test split: touched only by `medssl evaluate`, after every choice was made; the comparison tables "
        "use its 'test' metrics (a table that has to fall back to val says so in a warning).",
        "Leakage guard: an SSL backbone is not evaluated (or embedded by t-SNE) on images or subjects it "
        "saw in pretraining unless --allow-leakage was given; overrides are listed under Provenance.",
    ]
    for g in grids:
        cells = g["grid"]["cells"]
        seeds = sorted({c["seed"] for c in cells if c.get("seed") is not None})
        raised = [c["name"] for c in cells if c.get("floor_raised")]
        items.append(
            f"Label fractions ({g['grid']['name']}): stratified by class with a floor of one labelled image "
            "per class, nested across fractions, deterministic per seed"
            + (
                f"; the floor raised the count in {len(raised)} cell(s): {', '.join(raised)}"
                if raised
                else ""
            )
            + "."
        )
        items.append(
            f"Seeds ({g['grid']['name']}): {', '.join(map(str, seeds)) or '?'}; a seed draws the label "
            "subset and trains the head; statistics are over seeds."
        )
    return [Heading(2, "Protocol", "protocol"), Bullets(items)]


def pretraining(col: Collection) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Pretraining", "pretraining")]
    done = [p for p in col.pretrain if p["status"] == "finished"]
    if not done:
        return [*blocks, Para("No finished pretrain run.", "warning")]
    rows = [
        [
            p["name"], p.get("method") or "Barlow Twins", ds_list(p["datasets"], p["synthetic"]),
            ", ".join(p["splits"]),
            str(p["n_images"] or "?"),
            f"{p['epochs'] or '?'} / {p['epochs_planned'] or '?'}", str(p["batch_size"] or "?"),
            num(p["final_loss"], 2), _rankme(p), num(p["samples_per_s"], 1), num(p["train_time_s"], 0),
            p["device"] or "?", p["precision"] or "?", p["recipe_hash"] or "?",
        ]
        for p in done
    ]  # fmt: skip
    headers = ["run", "method", "datasets", "splits", "images", "epochs (done / planned)", "batch",
               "final loss",
               "RankMe (init / peak / final)", "throughput (samples/s)", "train time (s)", "device",
               "precision", "recipe hash"]  # fmt: skip
    blocks.append(
        Table(
            headers,
            rows,
            "Pretraining runs (final loss = mean over the last epoch, in the method's own units). RankMe: "
            "effective rank of the backbone's features on a fixed sample of pretraining images (Garrido et "
            "al., ICML 2023; label-free; max 512), before training / best / last epoch.",
        )
    )
    for p in done:
        if p.get("rankme_collapsed"):
            blocks.append(
                Para(
                    f"RANKME COLLAPSE in {p['name']}: the features' effective rank fell below a "
                    "quarter of its best value during pretraining.",
                    "warning",
                )
            )
        if p.get("img_loss"):
            blocks.append(
                Image(
                    p["img_loss"],
                    f"loss and RankMe curves of {p['name']}",
                    f"Loss and RankMe per epoch of {p['name']}.",
                )
            )
    return blocks


def _rankme(p: dict[str, Any]) -> str:
    if p.get("rankme") is None:
        return "-"
    return f"{num(p.get('rankme_init'), 1)} / {num(p.get('rankme_peak'), 1)} / {num(p['rankme'], 1)}"


def _comparison(g: dict[str, Any]) -> Table:
    grid, split = g["grid"], g["split"]
    n_eval = _span([n for r in g["rows"] for n in r["n_eval"]])
    methods = sorted({m for r in g["rows"] for m in r.get("run_ci_methods") or []})
    planned: dict[tuple[str, str, float], int] = {}  # seeds planned per row, from the grid's cells
    for c in grid["cells"]:
        key = (c["init"], c["mode"], float(c["fraction"]))
        planned[key] = planned.get(key, 0) + 1
    rows, short = [], 0
    for r in g["rows"]:
        n_plan = planned.pop((r["init"], r["mode"], float(r["fraction"])), len(r["seeds"]))
        n = len(r["seeds"])
        short += n < n_plan
        seeds = f"{n}{f' of {n_plan}' if n < n_plan else ''} ({', '.join(map(str, r['seeds']))})"
        mixed = " (mixed methods)" if len(r.get("run_ci_methods") or []) > 1 else ""
        rows.append([
            init_name(r["init"], grid) + (LEAK_MARK if r.get("leakage_override") else ""),
            r["mode"], pct_label(r["fraction"]), _span(r["n_train"]), seeds, stat(r["accuracy"]),
            interval(r["accuracy_run_ci_mean"]) + mixed,
            stat(r["balanced_accuracy"]), stat(r["macro_f1"]), stat(r["auroc"], 1.0, 3),
        ])  # fmt: skip
    for (init, mode, fraction), n_plan in planned.items():  # planned rows without any result
        short += 1
        rows.append([init_name(init, grid), mode, pct_label(fraction), "?", f"0 of {n_plan}"]
                    + ["n/a"] * 5)  # fmt: skip
    headers = ["init", "mode", "labels", "labelled images", "seeds", "accuracy %",
               "accuracy % per-run 95% CI", "balanced accuracy %", "macro-F1 %", "macro AUROC"]  # fmt: skip
    data = ds_list(grid["datasets"], grid["synthetic"])
    caption = (
        f"{split.upper()} metrics of grid {grid['name']} on {data} ({n_eval} {split} images per run). "
        f"{STATS_NOTE} Per-run CI method: {', '.join(methods) or 'n/a'}."
    )
    same = [r for r in g["rows"] if r["accuracy"].get("identical")]
    if same:
        caption += (
            f" 'same in n seeds' ({len(same)} row(s)): every seed gave the same result, one distinct run, "
            "so no std or interval (e.g. 100% labels, where the subset is the whole train split, with the "
            "deterministic L-BFGS head)."
        )
    if any(r[k].get("ci_clipped") for r in g["rows"] for k in METRIC_KEYS):
        caption += " *: the t interval reached past the metric's range (few seeds) and is clipped to it."
    if short:
        caption += (
            f" INCOMPLETE: in {short} row(s) only k of the n planned seeds have {split} metrics ('k of n'); "
            "the statistics cover those k (see Missing or failed)."
        )
    ids = grid["datasets"]
    if any(len(related(Path(grid.get("data_root") or "."), d, ids)) > 1 for d in ids):
        caption += (
            " SHARED SUBJECTS: the pooled datasets show the same subjects (the organ planes: each item once "
            "per plane), so the per-run interval, which treats the test images as independent, is too "
            "narrow; for per-plane numbers fine-tune and evaluate one plane (--datasets axial)."
        )
    if any(r.get("leakage_override") for r in g["rows"]):
        caption += " [LEAKAGE OVERRIDE]: some cells were evaluated on images their backbone pretrained on."
    if g["fallback"]:
        caption = (
            f"NO TEST METRICS: these are VALIDATION metrics, the split used for model selection, so they are "
            f"optimistic. Run `medssl evaluate --from {grid['path']}` for test metrics. " + caption
        )
    return Table(headers, rows, caption, warning=g["fallback"] or short > 0)


def label_efficiency(grids: list[dict[str, Any]]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Label efficiency", "label-efficiency")]
    if not grids:
        return [*blocks, Para("No finetune grid.", "warning")]
    for g in grids:
        grid = g["grid"]
        blocks.append(Heading(3, f"Grid {grid['name']}"))
        done = sum(c["status"] == "finished" for c in grid["cells"])
        blocks.append(
            Para(
                f"Status {grid['status']}: {done} of {grid['cells_planned']} planned cells finished; "
                f"pretrain run {grid['parent_name'] or 'none (ImageNet/random only)'}; "
                f"{grid.get('settings') or 'settings unknown (no recipe.yaml)'}."
            )
        )
        budget = grid.get("val_budget", "full")
        blocks.append(Para(budget_sentence(budget), "warning" if budget == "full" else "note"))
        if not g["rows"]:
            blocks.append(Para("No cell of this grid has val or test metrics.", "warning"))
            continue
        blocks.append(_comparison(g))
        if g.get("img_fraction"):
            warn = "VALIDATION metrics (the model-selection split: optimistic). " if g["fallback"] else ""
            what = f"{g['split']} accuracy vs label fraction (log x axis); error bars ±1 std over seeds."
            blocks.append(Image(g["img_fraction"], "accuracy vs label fraction", warn + what))
        for name, path in g.get("img_confusions", []):
            blocks.append(
                Image(path, f"confusion matrix of {name}", f"Confusion matrix ({g['split']}) of {name}.")
            )
    return blocks + optimism_gap(grids)


def knn_probes(col: Collection) -> list[Block]:
    done = [r for r in col.knn if r["status"] == "finished" and r.get("metrics")]
    if not done:
        return []
    rows = []
    for r in done:
        m = r["metrics"]
        lo, hi = m.get("accuracy_ci") or (None, None)
        rows.append(
            [
                r["name"], r["parent_name"] or "?", ds_list(r["datasets"], r["synthetic"]),
                f"{r['split']} ({m.get('n')})", str(r["k"]),
                f"{pct(m.get('accuracy'))} {interval([lo, hi])}",
                pct(m.get("balanced_accuracy")), pct(m.get("macro_f1")), num(m.get("auroc"), 3),
                "yes" if r["leakage_override"] else "no",
            ]
        )  # fmt: skip
    headers = ["run", "pretrain run", "datasets", "split (n)", "k", "accuracy % [95% CI]",
               "balanced accuracy %", "macro-F1 %", "macro AUROC", "leakage override"]  # fmt: skip
    caption = "kNN probes of frozen pretrained features (bank: the train split; cosine, weighted votes)."
    return [Heading(2, "kNN probes", "knn-probes"), Table(headers, rows, caption)]


def tsne(col: Collection) -> list[Block]:
    done = [r for r in col.tsne if r["status"] == "finished"]
    if not done:
        return []
    blocks: list[Block] = [Heading(2, "t-SNE", "t-sne")]
    for r in done:
        blocks.append(Heading(3, f"t-SNE run {r['name']}"))
        rows = [
            [
                b.get("title", b.get("id")),
                num(b["features"].get("silhouette_cosine")), pct(b["features"].get("knn_loo_accuracy")),
                _km(b["features"].get("kmeans"), "nmi"), _km(b["features"].get("kmeans"), "ari"),
                num(b["embedding_2d"].get("silhouette_euclidean")),
                pct(b["embedding_2d"].get("knn_loo_accuracy")),
            ]
            for b in r["backbones"]
        ]  # fmt: skip
        caption = (
            f"{ds_list(r['datasets'], r['synthetic'])}, {r['split']} split, n = {r['n']} (stratified "
            f"sample); perplexity {num(r['perplexity'], 1)}{_clipped(r)}. Feature-space scores are the "
            f"claim: silhouette with cosine distance on the L2-normalised features, and leave-one-out "
            f"{r['knn_k']}-NN accuracy within the sample (majority-class rate {pct(r['chance_accuracy'])}%). "
            "NMI / ARI: k-means (k = classes) on the same features, scored against the labels (label-free "
            "clustering; [95% bootstrap interval over images]). 2-D: reference only."
            + (
                "  LEAKAGE OVERRIDE: a backbone saw these images or subjects."
                if r["leakage_override"]
                else ""
            )
        )
        headers = ["backbone", "silhouette (features, cosine)", "kNN accuracy % (features)",
                   "k-means NMI", "k-means ARI", "silhouette (2-D)", "kNN accuracy % (2-D)"]  # fmt: skip
        blocks.append(Table(headers, rows, caption, warning=r["leakage_override"]))
        if r.get("img_tsne"):
            blocks.append(Image(r["img_tsne"], f"t-SNE panels of {r['name']}", f"t-SNE of {r['name']}."))
    return blocks


def _km(scores: dict[str, Any] | None, key: str) -> str:
    if not scores or scores.get(key) is None:
        return "n/a"
    lo, hi = scores.get(f"{key}_ci") or (None, None)
    return f"{num(scores[key])} [{num(lo)}, {num(hi)}]"


def provenance(col: Collection, versions: dict[str, str], synthetic: dict[str, bool]) -> list[Block]:
    runs = [*col.pretrain, *col.grids, *col.knn, *col.tsne]
    rows = [
        [r["name"], r["stage"] or "?", r["status"], *(r["versions"].get(k, "?") for k in SOFTWARE),
         r["recipe_hash"] or "?"]
        for r in runs
    ]  # fmt: skip
    used: dict[str, list[str]] = {}
    for r in runs:
        for d in r.get("datasets") or []:
            used.setdefault(d, []).append(r["name"])
    ds_rows = [
        [ds_label(d, synthetic), "yes" if synthetic.get(d) else "no", ", ".join(n)] for d, n in used.items()
    ]
    overrides = [f"{r['name']} ({r['stage']})" for r in [*col.knn, *col.tsne] if r.get("leakage_override")]
    for g in col.grids:
        overrides += [f"{g['name']}/cells/{c['name']}" for c in g["cells"] if c.get("leakage_override")]
    return [
        Heading(2, "Provenance", "provenance"),
        Para(
            f"This report: medssl {versions.get('medssl')}, torch {versions.get('torch')}, mimeta "
            f"{versions.get('mimeta')}, python {versions.get('python')}."
        ),
        Table(
            ["run", "stage", "status", "medssl", "torch", "mimeta", "recipe hash"], rows, "Software per run."
        ),
        Table(["dataset", "synthetic", "used by"], ds_rows, "Datasets."),
        Heading(3, "Leakage overrides"),
        Bullets(overrides)
        if overrides
        else Para("None: no run or cell was evaluated on images or subjects its backbone pretrained on."),
    ]


def missing(col: Collection) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Missing or failed", "missing-or-failed")]
    if not col.problems:
        return [*blocks, Para("None: every run and planned cell finished, and every cell has test metrics.")]
    rows = [[p["where"], p["what"], p.get("status") or "-", p.get("detail") or ""] for p in col.problems]
    return [*blocks, Table(["where", "problem", "status", "detail"], rows)]
