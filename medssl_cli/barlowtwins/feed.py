"""Feeding pretraining: which images each step sees, where they live, and the seeds of their views.

Everything here is a function of (seed, epoch, step, rank) only, so a run resumed from any checkpoint,
or split over N processes, sees exactly the batches an uninterrupted single-process run would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medssl_cli.barlowtwins.views import check_views, draw_uniform, normalize, view_from_uniform
from medssl_cli.data.pool import Pool
from medssl_cli.models import SSL_MEAN, SSL_STD
from medssl_cli.recipe import ViewsRecipe
from medssl_cli.runtime.launch import Dist

# SSL inputs: x/255, then (x - 0.5) / 0.5 per channel (the stages' shared convention).


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Full batches only (drop_last): the loss's batch statistics need a fixed, large batch."""
    return n_images // batch_size


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only, identical on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def rank_batch(order: torch.Tensor, s: int, batch_size: int, dist: Dist) -> torch.Tensor:
    """This rank's share of the epoch's global batch ``s``: the ranks' slices are disjoint and, in rank
    order, make up exactly the single-process batch ``order[s*B:(s+1)*B]``."""
    b = batch_size // dist.world_size
    start = s * batch_size + dist.rank * b
    return order[start : start + b]


def view_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one step's view parameters on one rank: a function of (seed, step, rank) only,
    so a resumed run draws the same views (pretraining and full fine-tuning alike)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return g


class BatchSource:
    """uint8 batches on the training device.

    If the pool is in RAM and fits ``device_budget_gb``, it is copied to the device once and batches
    are gathered there (no host work per step). Otherwise each batch is gathered on the host (from RAM
    or the memory map), pinned, and copied asynchronously.
    """

    def __init__(self, pool: Pool, device: torch.device, device_budget_gb: float) -> None:
        self.pool = pool
        self.device = device
        fits = pool.images.in_ram and pool.images.nbytes <= device_budget_gb * 2**30
        self.on_device = fits or (device.type == "cpu" and pool.images.in_ram)
        self.data = pool.images.data.to(device) if self.on_device else None
        # Where batch indices should live: a per-step host-to-device copy of them from pageable memory
        # blocks the host until the GPU has finished all earlier work (on an H200 that left the
        # side-stream views no step to overlap: B/A 0.851 with the overlap, 0.849 without).
        self.index_device = device if self.on_device else torch.device("cpu")

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.data is not None:
            return self.data[idx.to(self.device)]
        x = self.pool.images[idx]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x


class ViewFeed:
    """Normalised view pairs for each global step: gather, ``augment.make_pair``, ``normalize``, layout.

    ``feed(step)`` returns the views of ``step``; what they are depends on (seed, step, rank) only.
    With ``overlap`` on a CUDA device, the views of ``step + 1`` are made right away on a side stream,
    so their kernels can run while the caller's training step for ``step`` runs on the main stream. The
    main stream waits for the side stream before it uses a pair, and each pair is marked as used by
    the main stream (``record_stream``) so the caching allocator does not hand its memory back to the
    side stream too early. The same kernels run in the same order on one generator per step, so the
    views are bitwise those made in line; a prefetched pair that is never asked for (a stop, the end)
    is dropped, and a resumed run makes it again from (seed, step).

    ``compile_views``: ``torch.compile`` the views (all but the random draw), which fuses their many
    small elementwise kernels; the same values to float rounding (~1e-6), not bitwise. ``blur``: the
    blur's implementation (``blur.IMPLS``).
    """

    def __init__(
        self,
        pool: Pool,
        source: BatchSource,
        views: ViewsRecipe,
        *,
        batch_size: int,
        seed: int,
        dist: Dist,
        device: torch.device,
        channels_last: bool,
        total_steps: int,
        overlap: bool = True,
        compile_views: bool = False,
        blur: str = "conv",
    ) -> None:
        check_views(views)
        self.pool, self.source, self.views = pool, source, views
        self.batch_size, self.seed, self.dist, self.device = batch_size, seed, dist, device
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.mean, self.std = (SSL_MEAN,) * pool.channels, (SSL_STD,) * pool.channels
        self.spe = steps_per_epoch(len(pool), batch_size)
        self.total = total_steps
        self._order: tuple[int, torch.Tensor | None] = (-1, None)
        self.side = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        self._ahead: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        pair = _pair_fn(views, pool.image_size, self.mean, self.std, self.fmt, blur)
        self._pair = torch.compile(pair, dynamic=False) if compile_views else pair

    def indices(self, step: int) -> torch.Tensor:
        """Pool rows of this rank's share of global batch ``step`` (epoch order, then ``rank_batch``)."""
        epoch, s = divmod(step, self.spe)
        if self._order[0] != epoch:  # one copy to the device per epoch, not one per step
            order = epoch_order(len(self.pool), self.seed, epoch).to(self.source.index_device)
            self._order = (epoch, order)
        assert self._order[1] is not None
        return rank_batch(self._order[1], s, self.batch_size, self.dist)

    def make(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of ``step`` on the current stream."""
        x = self.source(self.indices(step))
        g = view_generator(self.seed, step, 0, self.device)
        # the draws of view 1 then view 2, as augment.make_pair takes them: the same views. Every rank
        # draws for the global batch and keeps its rows, so N ranks make the views one process makes
        # (and a run resumed on another number of GPUs continues the same views).
        n, lo = self.batch_size, self.dist.rank * x.shape[0]
        u1, u2 = (draw_uniform(x, g, rows=n)[lo : lo + x.shape[0]] for _ in range(2))
        return self._pair(x, u1, u2)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.side is None:
            return self.make(step)
        main = torch.cuda.current_stream(self.device)
        if self._ahead is None or self._ahead[0] != step:  # first step, or a jump (resume)
            self._ahead = (step, self._on_side(step, main))
        pair = self._ahead[1]
        main.wait_stream(self.side)
        for v in pair:
            v.record_stream(main)
        self._ahead = (step + 1, self._on_side(step + 1, main)) if step + 1 < self.total else None
        return pair

    def _on_side(self, step: int, main: torch.cuda.Stream) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.side is not None
        self.side.wait_stream(main)  # nothing main wrote is read here; this orders the streams' frees
        with torch.cuda.stream(self.side):
            return self.make(step)


PairFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _pair_fn(
    views: ViewsRecipe,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    fmt: torch.memory_format,
    blur: str,
) -> PairFn:
    """(uint8 batch, draw 1, draw 2) -> the normalised pair in the training layout."""

    def pair(x: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for cfg, u in ((views.view1, u1), (views.view2, u2)):
            v = normalize(view_from_uniform(x, cfg, size, u, blur=blur), mean, std)
            out.append(v.contiguous(memory_format=fmt))
        return out[0], out[1]

    return pair
