"""What the pretraining benchmark runs: a uint8 pool in RAM, the network + optimizer as ``medssl pretrain``
builds them, and ``Pipeline``, the training loop's per-step body on a fixed net."""

from __future__ import annotations

from typing import Any

import torch

from medssl_cli.barlowtwins.feed import BatchSource, ViewFeed
from medssl_cli.barlowtwins.optim import build_optimizer, param_groups, set_lr
from medssl_cli.models import build_pretrain_net
from medssl_cli.recipe import PretrainRecipe, ViewsRecipe
from medssl_cli.runtime.launch import Dist
from medssl_cli.stages.pretrain import train_step


class RamImages:
    """A uint8 (N, C, S, S) pool in RAM with the parts of ``data.images.ImageArray`` BatchSource reads."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.in_ram = True
        self.nbytes = data.numel()

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.data[idx]


class RamPool:
    def __init__(self, data: torch.Tensor) -> None:
        self.images = RamImages(data)
        self.channels, self.image_size = data.shape[1], data.shape[-1]

    def __len__(self) -> int:
        return len(self.images)


def make_pool(n: int, channels: int, size: int, seed: int = 0) -> RamPool:
    """Random uint8 images (the views' cost does not depend on the pixel values)."""
    g = torch.Generator().manual_seed(seed)
    return RamPool(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g))


def view_feed(
    pool: RamPool,
    device: torch.device,
    batch: int,
    channels_last: bool,
    budget_gb: float,
    *,
    source: BatchSource | None = None,
    views: ViewsRecipe | None = None,
    seed: int = 0,
    overlap: bool = True,
    compile_views: bool = False,
    blur: str = "conv",
) -> ViewFeed:
    """``batches.ViewFeed`` as the training loop builds it (one process, unbounded steps)."""
    return ViewFeed(
        pool,  # type: ignore[arg-type]
        source or BatchSource(pool, device, budget_gb),  # type: ignore[arg-type]
        views or ViewsRecipe(),
        batch_size=batch,
        seed=seed,
        dist=Dist(),
        device=device,
        channels_last=channels_last,
        total_steps=10**12,
        overlap=overlap,
        compile_views=compile_views,
        blur=blur,
    )


class Pipeline:
    """The per-step body of ``stages.pretrain._train`` (one process), on a fixed net and optimizer:
    ``batches.ViewFeed`` (as the training loop: on CUDA the next step's views overlap this step).
    ``source``: share another pipeline's ``BatchSource`` (its copy of the pool on the device)."""

    def __init__(
        self,
        pool: RamPool,
        net: torch.nn.Module,
        opt: torch.optim.Optimizer,
        batch: int,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
        budget_gb: float,
        views: ViewsRecipe | None = None,
        lambd: float = 0.0051,
        seed: int = 0,
        overlap: bool = True,
        source: BatchSource | None = None,
        compile_views: bool = False,
        blur: str = "conv",
    ) -> None:
        self.net, self.opt, self.bf16, self.lambd = net, opt, bf16, lambd
        self.feed = view_feed(
            pool,
            device,
            batch,
            channels_last,
            budget_gb,
            source=source,
            views=views,
            seed=seed,
            overlap=overlap,
            compile_views=compile_views,
            blur=blur,
        )
        self.source = self.feed.source
        self.sync_every = 1 if device.type == "cpu" else 25  # as the training loop
        self.step = 0

    def make_views(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.feed.make(step)

    def views_only(self) -> None:
        self.make_views(self.step)
        self.step += 1

    def full_step(self) -> None:
        set_lr(self.opt, self.step, 10**9, 0)
        v1, v2 = self.feed(self.step)
        loss, _, _ = train_step(self.net, self.opt, v1, v2, self.lambd, self.bf16)
        self.step += 1
        if self.step % self.sync_every == 0:
            loss.item()


def build(
    device: torch.device,
    channels: int,
    projector: list[int],
    bf16_fmt_cl: bool,
    batch: int,
    fused: bool | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = build_pretrain_net(channels, "replicate", projector).train()
    net = net.to(device, memory_format=torch.channels_last if bf16_fmt_cl else torch.contiguous_format)
    if fused is False:  # the non-fused (foreach) Adam, to compare with build_optimizer's fused one
        groups = param_groups(net, 0.03, 0.03, 0.0)
        return net, torch.optim.Adam(groups, lr=0.03, fused=False, foreach=True)
    return net, build_optimizer(net, PretrainRecipe(batch_size=batch), batch)


def fmt_name(bf16: bool, cl: bool) -> str:
    return f"{'bf16' if bf16 else 'fp32'}+{'channels_last' if cl else 'nchw'}"
