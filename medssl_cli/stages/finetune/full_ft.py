"""Full fine-tuning of one grid cell: backbone + linear head trained end to end on the label subset.

- Train-time augmentation: ``augment.make_view`` with ``FT_VIEW``: RandomResizedCrop with a mild
  scale (0.5-1, ratio 3/4-4/3) and the flips and rotations of the recipe's ``views.view1`` (set by the
  datasets' domain: none for organ slices, where left and right are different classes; all 8
  symmetries for histopathology); no colour jitter,
  grayscale, blur or solarisation (those belong to the self-supervised views, not to label-efficient
  supervised training).
- AdamW with two learning rates: ``finetune.lr_backbone`` for the backbone, ``finetune.lr_head`` for
  the head; ``finetune.weight_decay``; mini-batches of ``finetune.batch_size`` (at most the subset size).
  BatchNorm layers train (their statistics adapt to the new data).
- After every epoch: val accuracy and loss with the current weights (eval mode); ``history.jsonl`` gets
  one line. Early stopping when val accuracy (ties: val loss) has not improved for ``patience``
  epochs; the best-val weights are kept and saved (``weights/backbone.safetensors`` and ``head``).
- Seeded by the cell's seed (head init, sample order, augmentation).
- Several processes (``ctx.dist``, torchrun/srun): BatchNorm synchronised (``distributed.sync_batchnorm``),
  backbone + head in DDP; every rank takes its slice (``rank_slice``) of each global mini-batch of the
  shared seeded order, so the step equals the single-process one; views drawn per (seed, step, rank);
  validation, history and weights on rank 0, whose early-stop decision is broadcast. World size 1: as
  before, unchanged.
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

from medssl_cli.barlowtwins.feed import view_generator
from medssl_cli.barlowtwins.views import make_view
from medssl_cli.console import progress
from medssl_cli.errors import TrainingDiverged
from medssl_cli.io import append_jsonl
from medssl_cli.models import FEATURE_DIM, LinearHead, backbone_meta, count_params, save_weights
from medssl_cli.readout.features import extract
from medssl_cli.recipe import ViewRecipe
from medssl_cli.runs import Run
from medssl_cli.runtime import compute, distributed
from medssl_cli.runtime.preempt import GRID_KEPT, Interrupted

if TYPE_CHECKING:
    from medssl_cli.grids import Cell
    from medssl_cli.stages.finetune.context import Context

FT_VIEW = ViewRecipe(
    crop_scale=[0.5, 1.0],
    crop_ratio=[3.0 / 4.0, 4.0 / 3.0],
    flip_p=0.5,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)


def _batches(order: torch.Tensor, bs: int) -> list[torch.Tensor]:
    out = list(order.split(bs))
    if len(out) > 1 and len(out[-1]) < 2:  # a batch of one breaks BatchNorm in train mode: merge it
        last = out.pop()  # popped first: the target out[-1] then names the batch it joins
        out[-1] = torch.cat([out[-1], last])
    return out


def rank_slice(b: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of the global mini-batch ``b`` (sizes differ by at most one; in rank
    order the shares make up ``b``)."""
    return torch.tensor_split(b, world_size)[rank]


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    global_batch: int,
    world_size: int,
    bf16: bool = False,
) -> torch.Tensor:
    """One DDP step on this rank's share (x, y) of a global mini-batch; returns the detached sum of the
    share's cross-entropies.

    One process: L = (1/B) sum_{i in b} ce_i. Rank r minimises L_r = (W/B) sum_{i in b_r} ce_i (B: the
    GLOBAL batch size, W ranks); DDP averages the gradients over the ranks, so the applied gradient is
    (1/W) sum_r grad L_r = (1/B) sum_i grad ce_i = grad L, also when B does not divide by W.
    """
    with compute.autocast(x.device, bf16):
        logits = model(x)
    # float32 at least (bf16 autocast logits), float64 kept (the equality test runs in float64)
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="sum")
    opt.zero_grad(set_to_none=True)
    (ce * (world_size / global_batch)).backward()
    opt.step()
    return ce.detach()


def train_cell(
    ctx: Context, cell: Cell, run: Run, idx: np.ndarray, val_idx: np.ndarray | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fine-tune a copy of the cell's initial backbone; returns (best-epoch probabilities on the val
    images ``val_idx`` (None: all) used for early stopping, info).

    Under DDP every rank calls this; only rank 0's result is meaningful (others return None, {})."""
    ft, device, train, val, d = ctx.recipe.finetune, ctx.device, ctx.train, ctx.val, ctx.dist
    val_images = val.images if val_idx is None else val.images[val_idx]
    val_labels = val.labels if val_idx is None else val.labels[val_idx]
    v1 = ctx.recipe.views.view1  # the datasets' geometry (data/domains.py), as in pretraining
    ft_view = dataclasses.replace(FT_VIEW, flip_p=v1.flip_p or 0.0, vflip_p=v1.vflip_p, rot90_p=v1.rot90_p)
    lb = ctx.backbone(cell.init)
    size, k, n = train.image_size, train.num_classes, len(idx)
    compute.seed_everything(cell.seed)
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    backbone = copy.deepcopy(lb.module).to(device, memory_format=fmt)
    head = LinearHead(FEATURE_DIM, k).to(device)
    model: torch.nn.Module = torch.nn.Sequential(backbone, head)
    if d.enabled:  # BN over the global batch; the layers keep their parameters (and state-dict keys)
        backbone = distributed.sync_batchnorm(backbone, device)
        model = distributed.wrap_ddp(torch.nn.Sequential(backbone, head), d, device)
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
    stale, epoch, step = 0, 0, 0
    with progress("samples") as bar:
        task = bar.add_task(f"full {cell.name}", total=ft.epochs * n, rate=0.0, info="")
        for epoch in range(1, ft.epochs + 1):
            t0 = time.perf_counter()
            backbone.train()
            head.train()
            total = torch.zeros((), device=device)
            for b in _batches(torch.randperm(n, generator=g_order), bs):
                if d.enabled:
                    gb, b = len(b), rank_slice(b, d.rank, d.world_size)
                    g = view_generator(cell.seed, step, d.rank, device)
                    x = lb.prepare(make_view(source(b), ft_view, size, g)).contiguous(memory_format=fmt)
                    total += train_step(model, opt, x, y_all[b.to(device)], gb, d.world_size, ctx.bf16)
                else:
                    x = lb.prepare(make_view(source(b), ft_view, size, g_view)).contiguous(memory_format=fmt)
                    with compute.autocast(device, ctx.bf16):
                        logits = head(backbone(x))
                    loss = F.cross_entropy(logits.float(), y_all[b.to(device)])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach() * len(b)
                step += 1
            if d.enabled:
                # Every rank sees the same epoch loss (and so raises TrainingDiverged together).
                total = distributed.all_reduce_sum(total)
            train_loss = float(total) / n
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"Fine-tuning loss became {train_loss} in cell {cell.name}, epoch {epoch}.",
                    "Lower --lr-backbone / --lr-head, or use compute.precision fp32.",
                )

            def validate(epoch: int = epoch, train_loss: float = train_loss, t0: float = t0) -> bool:
                """Val metrics, history line, best weights (rank 0); True: patience is used up."""
                nonlocal best, stale
                feats = extract(
                    backbone,
                    val_images,
                    (lb.mean, lb.std),
                    device=device,
                    bf16=ctx.bf16,
                    channels_last=ctx.channels_last,
                    show_progress=False,
                )
                with torch.no_grad():
                    logits_val = (
                        feats @ head.weight.detach().float().cpu().T + head.bias.detach().float().cpu()
                    )
                y_val = torch.from_numpy(val_labels)
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
                return stale >= ft.patience

            # Under DDP rank 0 validates (eval mode: no collectives) and every rank gets its decision.
            patience_out = distributed.from_main(d, validate)
            if d.enabled:
                signum = distributed.agreed_stop(d, ctx.stop)
                if signum:
                    raise Interrupted(str(ctx.grid.path), signum, epoch, GRID_KEPT)
            elif ctx.stop:
                raise Interrupted(str(ctx.grid.path), ctx.stop.signum or 0, epoch, GRID_KEPT)
            if patience_out:
                break
    if not d.is_main:
        return None, {}
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
        "augmentation": f"random resized crop (scale 0.5-1) + flips p={ft_view.flip_p}/"
        f"{ft_view.vflip_p or 0} (left-right/top-bottom), rot90 p={ft_view.rot90_p or 0}",
        "selection": {"method": "val early stopping", "n_val": len(val_labels)},
    }
    return best["proba"], info
