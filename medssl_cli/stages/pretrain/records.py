"""What a pretrain run records: per-epoch history (with the optional kNN monitor), checkpoints with
the accumulators and RNG state for an exact resume, and at the end the weights, metrics and loss plot.

Split from the stage's ``__init__`` (the recipe) and ``loop.py`` (the training loop) so each reads in
one sitting; the run directory layout is described in ``__init__``.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from medssl_cli import __version__
from medssl_cli.barlowtwins.rankme import collapse_warning, feature_stats, sample_rows
from medssl_cli.data.pool import Pool, load_pool
from medssl_cli.errors import UserError
from medssl_cli.io import append_jsonl, read_jsonl, write_json
from medssl_cli.models import SSL_MEAN, SSL_STD, PretrainNet, backbone_meta, save_weights
from medssl_cli.plots import loss_curve
from medssl_cli.recipe import Recipe
from medssl_cli.runs import Run
from medssl_cli.runtime import checkpoint, compute
from medssl_cli.stages.pretrain.loop import EpochSums

LOG = logging.getLogger("medssl")


def save_checkpoint(
    run: Run, net: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, sums: EpochSums
) -> None:
    """The network, optimizer, this epoch's running sums and every RNG state at ``step``."""
    tensors = sums.tensors()
    rng = compute.rng_state()
    tensors.update({f"rng_{k}": v for k, v in rng.items() if isinstance(v, torch.Tensor)})
    plain = {k: v for k, v in rng.items() if not isinstance(v, torch.Tensor)}
    extra = {"acc_time": sums.time_s, "rng": plain}
    checkpoint.save(run.file("checkpoint"), step, net, optimizer, extra, tensors)


def truncate_history(run: Run, epochs: int) -> None:
    """Keep the history of the first ``epochs`` epochs."""
    from medssl_cli.io import write_text

    keep = [h for h in read_jsonl(run.file("history.jsonl")) if h["epoch"] <= epochs]
    write_text(run.file("history.jsonl"), "".join(json.dumps(h) + "\n" for h in keep))


def end_epoch(
    run: Run,
    recipe: Recipe,
    pool: Pool,
    net: torch.nn.Module,
    epoch: int,
    step: int,
    lr: float,
    sums: EpochSums,
    device: torch.device,
    bf16: bool,
) -> None:
    """The epoch's row of history.jsonl (with the kNN and RankMe monitors when due) and its log line."""
    loss, on_d, off_d, n = sums.means()
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "loss": loss,
        "on_diag": on_d,
        "off_diag": off_d,
        "off_diag_weighted": recipe.pretrain.lambd * off_d,
        "lr": lr,
        "samples_per_s": n * recipe.pretrain.batch_size / max(sums.time_s, 1e-9),
        "time_s": sums.time_s,
    }
    k, r = recipe.pretrain.knn_every, recipe.pretrain.rankme_every
    last = epoch + 1 == recipe.pretrain.epochs
    if k and ((epoch + 1) % k == 0 or last):
        row["knn_val_accuracy"] = _knn_monitor(recipe, pool, net.backbone, device, bf16)
        net.train()
    if r and ((epoch + 1) % r == 0 or last):
        row.update(monitor_features(recipe, pool, net.backbone, device, bf16))
        history = read_jsonl(run.file("history.jsonl")) if run.file("history.jsonl").exists() else []
        init = run.manifest.get("rankme_init")
        if init is not None:
            history = [{"epoch": 0, "rankme": init}, *history]
        warning = collapse_warning(history, row["rankme"], epoch + 1)
        row["rankme_collapsed"] = warning is not None
        if warning and not any(h.get("rankme_collapsed") for h in history):  # once, when it happens
            LOG.warning(warning)
    append_jsonl(run.file("history.jsonl"), row)
    if recipe.pretrain.log == "tensorboard":
        _tensorboard(run, row)
    LOG.info(
        f"epoch {epoch + 1}/{recipe.pretrain.epochs}: loss {loss:.2f} (on-diag {on_d:.2f}, "
        f"off-diag {off_d:.1f}) lr {lr:.2e} {row['samples_per_s']:.1f} samples/s"
        + (f", kNN val acc {row['knn_val_accuracy']:.3f}" if "knn_val_accuracy" in row else "")
        + (f", RankMe {row['rankme']:.1f}" if "rankme" in row else "")
    )


_WRITERS: dict[str, Any] = {}  # one open SummaryWriter per run directory (this process)


def _tensorboard(run: Run, row: dict[str, Any]) -> None:
    """The epoch's numeric history fields as TensorBoard scalars (``<run>/tensorboard/``), step = epoch."""
    from torch.utils.tensorboard import SummaryWriter

    key = str(run.path)
    if key not in _WRITERS:
        _WRITERS[key] = SummaryWriter(log_dir=str(run.file("tensorboard")))
    w = _WRITERS[key]
    for name, value in row.items():
        if name not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
            w.add_scalar(f"pretrain/{name}", value, global_step=row["epoch"])
    w.flush()


def close_tensorboard(run: Run) -> None:
    w = _WRITERS.pop(str(run.path), None)
    if w is not None:
        w.close()


def monitor_features(
    recipe: Recipe, pool: Pool, backbone: torch.nn.Module, device: torch.device, bf16: bool
) -> dict[str, Any]:
    """RankMe and feature std (``rankme.feature_stats``) of the backbone on a fixed sample of the
    pretraining pool (``pretrain.rankme_samples`` evenly spread images, the same every epoch)."""
    from medssl_cli.readout.features import extract

    rows = sample_rows(len(pool), recipe.pretrain.rankme_samples)
    norm = ((SSL_MEAN,) * pool.channels, (SSL_STD,) * pool.channels)
    z = extract(backbone, pool.images[rows], norm, device=device, bf16=bf16, show_progress=False)
    return feature_stats(z)


def check_knn_monitor(recipe: Recipe, pool: Pool) -> None:
    """Before training: the kNN monitor's labelled train and val splits load (one label space, a
    multiclass task, a val split), so a bad combination stops now and not after ``knn_every`` epochs.
    Labels and layout only: the images stay memory-mapped (budget 0)."""
    if not recipe.pretrain.knn_every:
        return
    try:
        _monitor_splits(recipe, pool)  # read once per run (cached): the monitor uses these very pools
    except UserError as exc:
        raise UserError(
            f"The kNN monitor (--knn-every {recipe.pretrain.knn_every}) needs labelled train and val "
            f"splits: {exc.message}",
            "Pass --knn-every 0 (the monitor is optional), or pretrain on datasets with one label space.",
        ) from None


@functools.cache
def _labelled_split(
    root: Path, ids: tuple[str, ...], task: str | None, size: int, channels: str, split: str
) -> Pool:
    """A labelled split for the kNN monitor, read once per run (not at every monitored epoch). Memory-
    mapped (budget 0): the train images are the pretraining pool's, in RAM already, whose second copy
    would double the largest allocation of the run (CRC: 12.8 GB); val is read at monitored epochs."""
    return load_pool(
        root, list(ids), [split], task=task, image_size=size, channels=channels, ram_budget_gb=0.0
    )


def _monitor_splits(recipe: Recipe, pool: Pool) -> tuple[Pool, Pool]:
    d = recipe.data
    key = (pool.root, tuple(pool.dataset_ids), d.task, d.image_size, d.channels)
    return _labelled_split(*key, "train"), _labelled_split(*key, "val")


def _knn_monitor(
    recipe: Recipe, pool: Pool, backbone: torch.nn.Module, device: torch.device, bf16: bool
) -> float:
    """kNN (k = evaluate.knn_k, checked >= 1 by check_recipe; at most the train size; cosine) accuracy of
    the backbone's features, train -> val. Labels only monitor."""
    from medssl_cli.readout.features import extract
    from medssl_cli.readout.probes import knn_predict

    train, val = _monitor_splits(recipe, pool)
    bank = pool.images if pool.seen() == train.seen() else train.images  # the usual train-only pool
    norm = ((SSL_MEAN,) * pool.channels, (SSL_STD,) * pool.channels)
    f_train = extract(backbone, bank, norm, device=device, bf16=bf16, show_progress=False)
    f_val = extract(backbone, val.images, norm, device=device, bf16=bf16, show_progress=False)
    pred = knn_predict(
        f_train, torch.as_tensor(train.labels), f_val, k=recipe.evaluate.knn_k, num_classes=train.num_classes
    )
    return float((pred.cpu() == torch.as_tensor(val.labels)).float().mean())


def finish(run: Run, recipe: Recipe, pool: Pool, net: PretrainNet) -> None:
    meta = backbone_meta(pool.channels, recipe.model.gray_mode, pool.image_size)
    meta.update(
        norm_mean=json.dumps([SSL_MEAN] * pool.channels),
        norm_std=json.dumps([SSL_STD] * pool.channels),
        datasets=json.dumps(pool.dataset_ids),
        recipe_hash=recipe.hash(),
        medssl_version=__version__,
        init="ssl",
        method=recipe.pretrain.method,
    )
    save_weights(run.file("weights", "backbone.safetensors"), net.backbone, meta)
    save_weights(
        run.file("weights", "projector.safetensors"),
        net.projector,
        {**meta, "projector": json.dumps(recipe.model.projector)},
    )
    history = read_jsonl(run.file("history.jsonl"))
    synthetic = "SYNTHETIC DATA - " if pool.synthetic else ""
    loss_curve(history, run.file("plots", "loss.png"), f"{synthetic}Barlow Twins pretraining")
    first, last = history[0], history[-1]
    metrics = {
        "epochs": len(history),
        "final_loss": last["loss"],
        "first_epoch_loss": first["loss"],
        "loss_drop": 1 - last["loss"] / first["loss"] if first["loss"] else None,
        "samples_per_s": sum(h["samples_per_s"] for h in history) / len(history),
        "train_time_s": sum(h["time_s"] for h in history),
    }
    if "knn_val_accuracy" in last:
        metrics["knn_val_accuracy"] = last["knn_val_accuracy"]
    ranks = [h["rankme"] for h in history if h.get("rankme") is not None]
    if ranks:
        metrics.update(
            rankme=ranks[-1],
            rankme_peak=max(ranks),
            rankme_init=run.manifest.get("rankme_init"),
            rankme_collapsed=any(h.get("rankme_collapsed") for h in history),
        )
    write_json(run.file("metrics.json"), metrics)
    run.set_status("finished", metrics=metrics)
    LOG.info(
        f"Pretraining finished: loss {first['loss']:.1f} -> {last['loss']:.1f}. Weights: "
        f"{run.file('weights', 'backbone.safetensors')}"
    )
