"""`medssl evaluate --probe knn`: a kNN probe of a pretrain run's frozen features.

k = ``evaluate.knn_k`` (20) nearest neighbours by cosine similarity of L2-normalised frozen features,
weighted votes (``readout.probes``); memory bank = the whole labelled train split, queries = the test
(or val) split. Stages never write into their parent, so the result is a new run
``<runs root>/evaluate-knn[-<name>]-<stamp>/`` (``kind: knn``) with ``metrics.json`` and
``plots/confusion_<split>.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medssl_cli.checks import check_knn_k
from medssl_cli.data import leakage
from medssl_cli.data.pool import load_split
from medssl_cli.data.registry import data_root
from medssl_cli.io import write_json
from medssl_cli.lifecycle import recording
from medssl_cli.readout import backbones
from medssl_cli.readout.features import cached
from medssl_cli.readout.metrics import compute_metrics, plot_confusion
from medssl_cli.readout.probes import knn_scores
from medssl_cli.recipe import SECTIONS, resolve
from medssl_cli.runs import create_run, feature_cache_dir, resolve_run
from medssl_cli.runtime import compute

LOG = logging.getLogger("medssl")


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
    recipe = resolve(recipe_file, overrides, pre.recipe(), SECTIONS)
    split, k = recipe.evaluate.split, recipe.evaluate.knn_k
    check_knn_k(recipe)
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
    device, bf16, channels_last = compute.settings_for(recipe.compute, bank.image_size)
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
