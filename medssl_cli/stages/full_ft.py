"""Full fine-tuning of one grid cell: backbone + linear head trained end to end on the label subset.

- Train-time augmentation: ``augment.make_view`` with ``FT_VIEW``: RandomResizedCrop with a mild
  scale (0.5-1, ratio 3/4-4/3) and horizontal flip with the recipe's ``views.view1.flip_p`` (0.5 by
  default; 0 for organ slices, where left and right are different classes); no colour jitter,
  grayscale, blur or solarisation (those belong to the self-supervised views, not to label-efficient
  supervised training).
- AdamW with two learning rates: ``finetune.lr_backbone`` for the backbone, ``finetune.lr_head`` for
  the head; ``finetune.weight_decay``; mini-batches of ``finetune.batch_size`` (at most the subset size).
  BatchNorm layers train (their statistics adapt to the new data).
- After every epoch: val accuracy and loss with the current weights (eval mode); ``history.jsonl`` gets
  one line. Early stopping when val accuracy (ties: val loss) has not improved for ``patience``
  epochs; the best-val weights are kept and saved (``weights/backbone.safetensors`` and ``head``).
- Seeded by the cell's seed (head init, sample order, augmentation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import compute
from ..augment import make_view
from ..console import progress
from ..errors import TrainingDiverged
from ..features import extract
from ..io import append_jsonl
from ..models import LinearHead, backbone_meta, count_params, save_weights
from ..preempt import Interrupted
from ..recipe import ViewRecipe
from ..runs import Run

if TYPE_CHECKING:
    from .cell import Context
    from .grid import Cell

FT_VIEW = ViewRecipe(
    crop_scale=[0.5, 1.0],
    crop_ratio=[3.0 / 4.0, 4.0 / 3.0],
    flip_p=0.5,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)
FEATURE_DIM = 512


def _batches(order: torch.Tensor, bs: int) -> list[torch.Tensor]:
    out = list(order.split(bs))
    if len(out) > 1 and len(out[-1]) < 2:  # a batch of one breaks BatchNorm in train mode: merge it
        out[-2] = torch.cat([out[-2], out.pop()])
    return out


def train_cell(ctx: Context, cell: Cell, run: Run, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fine-tune a copy of the cell's initial backbone; returns (best-epoch val probabilities, info)."""
    ft, device, train, val = ctx.recipe.finetune, ctx.device, ctx.train, ctx.val
    ft_view = dataclasses.replace(FT_VIEW, flip_p=ctx.recipe.views.view1.flip_p)
    lb = ctx.backbone(cell.init)
    size, k, n = train.image_size, train.num_classes, len(idx)
    compute.seed_everything(cell.seed)
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    backbone = copy.deepcopy(lb.module).to(device, memory_format=fmt)
    head = LinearHead(FEATURE_DIM, k).to(device)
    params = count_params(backbone) + count_params(head)
    opt = torch.optim.AdamW(
        [
            {"params": backbone.parameters(), "lr": ft.lr_backbone},
            {"params": head.parameters(), "lr": ft.lr_head},
        ],
        weight_decay=ft.weight_decay,
    )
    y_all = torch.from_numpy(train.labels[idx]).to(device)
    on_device = n * train.channels * size * size <= ctx.recipe.compute.device_budget_gb * 2**30
    x_all = train.images[idx].to(device) if on_device else None

    def source(b: torch.Tensor) -> torch.Tensor:
        return x_all[b] if x_all is not None else train.images[idx[b.cpu().numpy()]].to(device)

    bs = min(ft.batch_size, n)
    g_order = torch.Generator().manual_seed(cell.seed)
    g_view = torch.Generator(device=device).manual_seed(cell.seed)
    best: dict[str, Any] | None = None
    stale, epoch = 0, 0
    with progress("samples") as bar:
        task = bar.add_task(f"full {cell.name}", total=ft.epochs * n, rate=0.0, info="")
        for epoch in range(1, ft.epochs + 1):
            t0 = time.perf_counter()
            backbone.train()
            head.train()
            total = torch.zeros((), device=device)
            for b in _batches(torch.randperm(n, generator=g_order), bs):
                x = lb.prepare(make_view(source(b), ft_view, size, g_view)).contiguous(memory_format=fmt)
                with compute.autocast(device, ctx.bf16):
                    logits = head(backbone(x))
                loss = F.cross_entropy(logits.float(), y_all[b.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(b)
            train_loss = float(total) / n
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"Fine-tuning loss became {train_loss} in cell {cell.name}, epoch {epoch}.",
                    "Lower --lr-backbone / --lr-head, or use compute.precision fp32.",
                )
            feats = extract(
                backbone,
                val.images,
                (lb.mean, lb.std),
                device=device,
                bf16=ctx.bf16,
                channels_last=ctx.channels_last,
                show_progress=False,
            )
            with torch.no_grad():
                logits_val = feats @ head.weight.detach().float().cpu().T + head.bias.detach().float().cpu()
            y_val = torch.from_numpy(val.labels)
            acc = float((logits_val.argmax(1) == y_val).double().mean())
            vloss = float(F.cross_entropy(logits_val, y_val))
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_accuracy": acc,
                "val_loss": vloss,
                "time_s": time.perf_counter() - t0,
            }
            append_jsonl(run.file("history.jsonl"), row)
            bar.update(
                task,
                completed=epoch * n,
                rate=n / max(row["time_s"], 1e-9),
                info=f"epoch {epoch} loss {train_loss:.3f} val acc {acc:.3f}",
            )
            # Patience counts epochs without a strictly better val accuracy; the kept weights are those
            # of the best accuracy, ties broken by the lower val loss.
            stale = 0 if best is None or acc > best["key"][0] else stale + 1
            if best is None or (acc, -vloss) > best["key"]:
                best = {
                    "key": (acc, -vloss),
                    "epoch": epoch,
                    "proba": torch.softmax(logits_val, 1),
                    "backbone": {
                        k2: v.detach().to("cpu", copy=True) for k2, v in backbone.state_dict().items()
                    },
                    "head": {k2: v.detach().to("cpu", copy=True) for k2, v in head.state_dict().items()},
                }
            if ctx.stop:
                raise Interrupted(str(ctx.grid.path), ctx.stop.signum or 0, epoch)  # resume = the grid
            if stale >= ft.patience:
                break
    assert best is not None
    gray = lb.info.get("gray_mode", "replicate")
    meta = {
        **backbone_meta(int(lb.info.get("in_channels", train.channels)), gray, size),
        **lb.metadata(),
        "fine_tuned": "true",
        "cell": cell.name,
        "best_epoch": str(best["epoch"]),
    }
    save_weights(run.file("weights", "backbone.safetensors"), best["backbone"], meta)
    head_meta = {
        "kind": "linear_head",
        "in_dim": str(FEATURE_DIM),
        "num_classes": str(k),
        "init": cell.init,
        "class_names": json.dumps(train.class_names),
        "head": "full",
    }
    save_weights(run.file("weights", "head.safetensors"), best["head"], head_meta)
    info = {
        "head": "full",
        "chosen": {"epoch": best["epoch"], "val_accuracy": best["key"][0]},
        "stopped_epoch": epoch,
        "params": params,
        "backbone": lb.info,
        "lr_backbone": ft.lr_backbone,
        "lr_head": ft.lr_head,
        "augmentation": f"random resized crop (scale 0.5-1) + horizontal flip p={ft_view.flip_p}",
    }
    return best["proba"], info
