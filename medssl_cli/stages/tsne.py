"""`medssl tsne`: t-SNE pictures of frozen backbones, and numbers that say how well their features cluster.

1. Backbones (one panel each): every ``--from`` pretrain run (Barlow Twins, init ``ssl``) and every
   ``--init`` of ``imagenet`` / ``random`` (``backbones.load``; the random backbone is drawn with
   ``compute.seed``, the same one a finetune grid with that seed uses).
2. One fixed sample of the split (default test), the same images for every panel: stratified by class,
   at most ``tsne.max_samples`` (largest-remainder allocation, at least one image per present class,
   a seeded permutation per class; see ``stratified_sample``). Its rows are recorded in ``sample.json``
   and ``coordinates.csv``.
3. Leakage guard: an ssl backbone must not have seen the sampled images or their subjects in
   pretraining (``leakage.check``, as evaluate does); ``--allow-leakage`` overrides and is recorded.
4. Features through the feature cache (``<runs root>/.cache/features``), L2-normalised. t-SNE
   (sklearn, Barnes-Hut, ``init="pca"``, ``random_state = tsne.seed``) on the L2-normalised features
   with the Euclidean metric (||a - b||^2 = 2 - 2 cos(a, b): the cosine geometry). Perplexity is
   clipped to (n - 1) / 3 for small samples (sklearn needs perplexity < n; 3 x perplexity neighbours
   are used per point).
5. Cluster quality, measured in the ORIGINAL feature space, per backbone:
   - silhouette score with the cosine distance (Rousseeuw 1987; sklearn ``silhouette_score``), in [-1, 1];
   - leave-one-out kNN accuracy *within the sample*: each image is classified by its k (evaluate.knn_k,
     20) nearest other sampled images by cosine similarity, votes weighted exp(cos / 0.07) as in
     ``probes.py``. No train split is involved, so it measures the clustering itself, not a classifier.
   The same two numbers on the 2-D embedding (Euclidean silhouette, majority-vote kNN) are given for
   reference only: t-SNE distorts global distances, so only the feature-space numbers are the claim.

Outputs: a new run ``<runs root>/tsne-<name>-<stamp>/`` (parent = the first pretrain run) with
``plots/tsne.png``, ``coordinates.csv``, ``sample.json`` and ``metrics.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl_cli.checks import check_tsne
from medssl_cli.data import leakage
from medssl_cli.data.images import ImageArray
from medssl_cli.data.pool import SPLITS, Pool, load_pool
from medssl_cli.data.registry import data_root
from medssl_cli.errors import UserError
from medssl_cli.io import write_json, write_text
from medssl_cli.lifecycle import recording
from medssl_cli.readout import backbones
from medssl_cli.readout.backbones import LoadedBackbone
from medssl_cli.readout.clusters import (
    KNN_TEMPERATURE,
    cluster_scores,
    effective_perplexity,
    embed,
    fmt_score,
    plot_panels,
    stratified_sample,
)
from medssl_cli.readout.features import cached
from medssl_cli.recipe import Recipe, read_recipe_file, resolve
from medssl_cli.runs import Run, create_run, feature_cache_dir, find_latest, resolve_run
from medssl_cli.runtime import compute

LOG = logging.getLogger("medssl")
TITLES = {"imagenet": "ImageNet", "random": "Random init"}
OTHER_INITS = ("imagenet", "random")


@dataclass
class Panel:
    """One backbone shown in the figure."""

    id: str  # "ssl:<run name>", "imagenet", "random"
    title: str
    lb: LoadedBackbone
    pretrain: Run | None = None


def subpool(pool: Pool, idx: np.ndarray) -> Pool:
    """The pool restricted to positions ``idx`` (sorted), so only sampled images are extracted."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == len(pool):
        return pool
    offsets = pool.images.offsets
    parts = []
    for p, (h5, rows) in enumerate(pool.images.parts):
        sel = idx[(idx >= offsets[p]) & (idx < offsets[p + 1])] - offsets[p]
        parts.append((h5, rows[sel]))
    images = ImageArray(parts, pool.image_size, pool.channels, in_ram=False)
    if pool.images.in_ram:  # already decoded: slice instead of reading again
        images.data = pool.images[torch.from_numpy(idx)]
    return dataclasses.replace(
        pool,
        images=images,
        labels=pool.labels[idx],
        source_ds=pool.source_ds[idx],
        source_split=pool.source_split[idx],
        source_idx=pool.source_idx[idx],
    )


# --------------------------------------------------------------------------------------------
# Entry point


def resolve_recipe(recipe_file: Path | None, overrides: dict[str, Any], first: Run | None) -> Recipe:
    """defaults < first pretrain run's recipe (data, model) < recipe file < CLI options."""
    file = read_recipe_file(recipe_file) if recipe_file is not None else {}
    if (
        first is None
        and "datasets" not in (file.get("data") or {})
        and overrides.get("data.datasets") is None
    ):
        raise UserError(
            "No datasets: without a pretrain run (--init imagenet/random only) --datasets is required.",
            "Pass e.g. --datasets axial, or --from a pretrain run.",
        )
    recipe = resolve(recipe_file, overrides, first.recipe() if first is not None else None, ("data", "model"))
    check_tsne(recipe)
    return recipe


def _pretrain_runs(from_runs: list[str] | None, inits: list[str], runs_root: Path) -> list[Run]:
    runs = [resolve_run(f, runs_root, "pretrain") for f in from_runs or []]
    if not runs and ("ssl" in inits or not inits):
        runs = [find_latest(runs_root, "pretrain")]
    seen, out = set(), []
    for r in runs:
        if r.path.resolve() not in seen:
            seen.add(r.path.resolve())
            out.append(r)
    return out


def _check_inits(inits: list[str]) -> list[str]:
    for i in inits:
        if i not in ("ssl", *OTHER_INITS):
            raise UserError(
                f"Unknown init '{i}' for --init.", "Use imagenet and/or random (ssl: --from RUN)."
            )
    return [i for i in OTHER_INITS if i in inits]  # fixed panel order


def tsne(
    overrides: dict[str, Any],
    *,
    from_runs: list[str] | None = None,
    inits: list[str] | None = None,
    runs_root: Path | str = "runs",
    data_dir: Path | str | None = None,
    name: str | None = None,
    allow_leakage: bool = False,
    recipe_file: Path | None = None,
) -> Run:
    """t-SNE panels + cluster scores of the given backbones on one stratified sample; returns the run."""
    runs_root = Path(runs_root)
    inits = list(inits or [])
    others = _check_inits(inits)
    pre_runs = _pretrain_runs(from_runs, inits, runs_root)
    recipe = resolve_recipe(recipe_file, overrides, pre_runs[0] if pre_runs else None)
    t = recipe.tsne
    if t.split not in SPLITS:
        raise UserError(f"Unknown split '{t.split}'.", f"Use one of {', '.join(SPLITS)}.")
    root = data_root(data_dir, pre_runs[0].manifest.get("data", {}).get("root") if pre_runs else None)
    compute.configure_threads(recipe.compute.threads)
    d = recipe.data
    full = load_pool(
        root, d.datasets, [t.split], task=d.task, image_size=d.image_size, channels=d.channels,
        supervised=True, ram_budget_gb=d.ram_budget_gb,
    )  # fmt: skip
    if len(full) < 3:
        raise UserError(f"The {t.split} split has only {len(full)} image(s); t-SNE needs at least 3.")
    idx = stratified_sample(full.labels, t.max_samples, t.seed)
    pool = subpool(full, idx)
    what = f"t-SNE of the {t.split} split of {', '.join(pool.dataset_ids)}"
    leaks = [leakage.check(r, pool.seen(), root, allow_leakage, what) for r in pre_runs]

    panels = [
        Panel(f"ssl:{r.name}", f"Barlow Twins ({r.name})", backbones.from_pretrain_run(r, pool.channels), r)
        for r in pre_runs
    ]
    for init in others:
        lb = backbones.load(
            init, data_channels=pool.channels, gray_mode=recipe.model.gray_mode, seed=recipe.compute.seed
        )
        panels.append(Panel(init, TITLES[init], lb))
    if not panels:
        raise UserError("No backbone to show.", "Pass --from PRETRAIN_RUN and/or --init imagenet,random.")

    extra = {
        "kind": "tsne",
        "split": t.split,
        "panels": [{"id": p.id, "title": p.title, **p.lb.info} for p in panels],
        "data": {"root": str(root), t.split: pool.provenance(), "split_images": len(full)},
    }
    default_name = "-".join(["ssl"] * bool(pre_runs) + others)
    run = create_run(
        runs_root, "tsne", recipe, name=name or default_name, parent=pre_runs[0] if pre_runs else None,
        extra=extra,
    )  # fmt: skip
    with recording(run):
        metrics = _run(run, recipe, pool, panels, leaks, runs_root, len(full))
        run.set_status("finished", metrics={p["id"]: p["features"] for p in metrics["backbones"]})
    return run


def _run(
    run: Run,
    recipe: Recipe,
    pool: Pool,
    panels: list[Panel],
    leaks: list[dict],
    runs_root: Path,
    n_split: int,
) -> dict[str, Any]:
    t = recipe.tsne
    device, bf16, channels_last = compute.settings_for(recipe.compute, pool.image_size)
    n, labels, k = len(pool), pool.labels, recipe.evaluate.knn_k
    perplexity = effective_perplexity(t.perplexity, n)
    LOG.info(
        f"t-SNE of {len(panels)} backbone(s) on {n} of {n_split} {t.split} images of "
        f"{', '.join(pool.dataset_ids)} (stratified, seed {t.seed}); perplexity {perplexity:g}"
        + (f" (clipped from {t.perplexity:g})" if perplexity != t.perplexity else "")
    )
    for leak in leaks:
        if leak.get("override"):
            LOG.warning(f"Leakage override: {leak['overlaps']}")
    for p in panels:
        size = p.lb.info.get("pretrain_image_size")
        if size and size != pool.image_size:
            LOG.warning(f"{p.title} was pretrained at {size} px; features here are at {pool.image_size} px")
    write_json(run.file("sample.json"), _sample_record(pool, t))
    results, coords_all = [], []
    for p in panels:
        fs = cached(
            feature_cache_dir(runs_root), p.lb, pool, device=device, bf16=bf16,
            channels_last=channels_last, desc=f"{p.id} features",
        )  # fmt: skip
        feats = fs.features.numpy()
        coords, kl = embed(feats, perplexity, t.seed)
        scores = cluster_scores(feats, coords, labels, k, pool.num_classes)
        f = scores["features"]
        how = "cached features" if fs.hit else f"features in {fs.seconds:.1f} s"
        km = f["kmeans"]
        LOG.info(
            f"{p.title}: silhouette (cosine, features) {fmt_score(f['silhouette_cosine'])}, leave-one-out "
            f"{k}-NN accuracy {fmt_score(f['knn_loo_accuracy'])}, k-means NMI {km['nmi']:.3f} "
            f"[{km['nmi_ci'][0]:.3f}, {km['nmi_ci'][1]:.3f}] ARI {km['ari']:.3f} ({how})"
        )
        results.append(
            {
                "id": p.id,
                "title": p.title,
                "init": p.lb.init,
                "pretrain_run": str(p.pretrain.path) if p.pretrain else None,
                "state_hash": p.lb.key,
                "feature_dim": int(feats.shape[1]),
                **scores,
                "tsne_kl_divergence": kl,
            }
        )
        coords_all.append(coords)
    _write_coordinates(run.file("coordinates.csv"), pool, panels, coords_all, t.split)
    counts = np.bincount(labels, minlength=pool.num_classes)
    metrics = {
        "split": t.split,
        "n": n,
        "split_images": n_split,
        "datasets": pool.dataset_ids,
        "synthetic": {ti.dataset_id: ti.synthetic for ti in pool.tasks},
        "class_names": pool.class_names,
        "per_class": {c: int(v) for c, v in zip(pool.class_names, counts, strict=True)},
        "sample": f"stratified by class, at most {t.max_samples}, seed {t.seed} (sample.json)",
        "tsne": {
            "perplexity": perplexity,
            "perplexity_requested": t.perplexity,
            "seed": t.seed,
            "init": "pca",
            "input": "L2-normalised features, Euclidean metric (cosine geometry)",
        },
        "knn": {
            "k": k,
            "protocol": "leave-one-out within the sample (each image vs the other sampled images)",
            "features_vote": f"cosine similarity, weighted exp(cos/{KNN_TEMPERATURE})",
            "embedding_vote": "Euclidean distance in 2-D, majority vote",
        },
        "chance_accuracy": float(counts.max() / n),
        "backbones": results,
        "leakage_override": any(bool(x.get("override")) for x in leaks),
        "leakage": leaks,
    }
    write_json(run.file("metrics.json"), metrics)
    plot_panels(
        [(p.title, c, r) for p, c, r in zip(panels, coords_all, results, strict=True)],
        labels,
        pool.class_names,
        run.file("plots", "tsne.png"),
        _suptitle(pool, t.split, n, k, perplexity),
        note=f"Scores on the original L2-normalised features: silhouette (cosine distance) and leave-one-out "
        f"{k}-NN accuracy within the sample (majority-class rate {metrics['chance_accuracy']:.3f}).",
    )
    LOG.info(f"t-SNE figure: {run.file('plots', 'tsne.png')}")
    return metrics


def _suptitle(pool: Pool, split: str, n: int, k: int, perplexity: float) -> str:
    ds = ", ".join(pool.dataset_ids)
    head = "SYNTHETIC DATA - " if pool.synthetic else ""
    return (
        f"{head}t-SNE of frozen ResNet-18 features: {ds}, {split} split, n = {n}, perplexity {perplexity:g} "
        f"(k = {k} for kNN)"
    )


def _sample_record(pool: Pool, t: Any) -> dict[str, Any]:
    return {
        "split": t.split,
        "seed": t.seed,
        "max_samples": t.max_samples,
        "n": len(pool),
        "datasets": pool.dataset_ids,
        "dataset": [pool.dataset_ids[i] for i in pool.source_ds],
        "row": pool.source_idx.tolist(),  # row in the dataset's images.hdf5
        "label": pool.labels.tolist(),
    }


def _write_coordinates(
    path: Path, pool: Pool, panels: list[Panel], coords: list[np.ndarray], split: str
) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "dataset", "split", "label", "class_name", "backbone", "x", "y"])
    names = pool.class_names
    for p, xy in zip(panels, coords, strict=True):
        for i in range(len(pool)):
            lab = int(pool.labels[i])
            w.writerow(
                [int(pool.source_idx[i]), pool.dataset_ids[int(pool.source_ds[i])], split, lab, names[lab],
                 p.id, f"{xy[i, 0]:.5f}", f"{xy[i, 1]:.5f}"]
            )  # fmt: skip
    write_text(path, buf.getvalue())
