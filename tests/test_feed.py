"""ViewFeed: the views each pretraining step trains on, made in line or ahead on a side CUDA stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl_cli.barlowtwins.feed import BatchSource, ViewFeed, epoch_order, view_generator
from medssl_cli.barlowtwins.views import make_pair, normalize
from medssl_cli.data.pool import load_pool
from medssl_cli.recipe import ViewsRecipe
from medssl_cli.runtime.compute import cpp_compiler_problem
from medssl_cli.runtime.launch import Dist

PLANES = ["synthetic_organs_axial", "synthetic_organs_coronal", "synthetic_organs_sagittal"]


def feed_for(
    pool,
    device: torch.device,
    *,
    budget_gb: float = 4.0,
    overlap: bool,
    batch: int = 16,
    compile_views: bool = False,
    blur: str = "conv",
) -> ViewFeed:
    return ViewFeed(
        pool,
        BatchSource(pool, device, budget_gb),
        ViewsRecipe(),
        batch_size=batch,
        seed=3,
        dist=Dist(),
        device=device,
        channels_last=True,
        total_steps=10,
        overlap=overlap,
        compile_views=compile_views,
        blur=blur,
    )


def test_feed_makes_the_training_loops_views(synth_root: Path) -> None:
    pool = load_pool(synth_root, PLANES[:1], ["train"], image_size=32, supervised=False)
    feed = feed_for(pool, torch.device("cpu"), overlap=True)  # CPU: no side stream, made in line
    assert feed.side is None
    spe = len(pool) // 16
    assert spe >= 2
    step = spe + 1  # second epoch, second batch
    order = epoch_order(len(pool), 3, 1)
    x = pool.images[order[16:32]]
    g = view_generator(3, step, 0, torch.device("cpu"))
    want = [normalize(v, (0.5,), (0.5,)) for v in make_pair(x, ViewsRecipe(), 32, g)]
    got = feed(step)
    for w, v in zip(want, got, strict=True):
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(w, v)
    # One epoch of steps visits each pool row at most once (full batches only).
    rows = torch.cat([feed.indices(s) for s in range(spe)])
    assert len(set(rows.tolist())) == spe * 16


@pytest.mark.parametrize(
    "variant",
    [
        {"blur": "matmul"},
        pytest.param(
            {"compile_views": True},
            marks=pytest.mark.skipif(cpp_compiler_problem() is not None, reason="compiling needs g++"),
        ),
    ],
)
def test_compiled_or_matmul_blur_views_equal_the_plain_views(synth_root: Path, variant: dict) -> None:
    # torch.compile fuses the views' kernels, the matmul blur sums in another order: the same views to
    # float rounding. The compiled feed really compiles here (about 10 s on this CPU).
    pool = load_pool(synth_root, PLANES[:1], ["train"], image_size=32, supervised=False)
    cpu = torch.device("cpu")
    plain = feed_for(pool, cpu, overlap=False, batch=8)
    other = feed_for(pool, cpu, overlap=False, batch=8, **variant)
    for step in (0, 1, 5):
        want = plain(step)
        assert want[0].std() > 0.1  # real views, not a constant
        for w, v in zip(want, other(step), strict=True):
            assert v.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(v, w, atol=2e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_views_on_cuda_equal_the_plain_views(
    synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both levers at once (one compile): Triton kernels on the side stream, cuBLAS for the blur. TF32
    # off (cuDNN allows it for convs by default): the comparison is at fp32 rounding.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    pool = load_pool(synth_root, PLANES, ["train"], image_size=32, supervised=False)
    dev = torch.device("cuda")
    plain = feed_for(pool, dev, overlap=False)
    fast = feed_for(pool, dev, overlap=True, compile_views=True, blur="matmul")
    for step in range(4):
        for w, v in zip(plain(step), fast(step), strict=True):
            torch.testing.assert_close(v, w, atol=2e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("budget_gb", [4.0, 0.0])  # images on the device / streamed from pinned memory
def test_side_stream_views_equal_inline_views(synth_root: Path, budget_gb: float) -> None:
    pool = load_pool(synth_root, PLANES, ["train"], image_size=32, supervised=False)
    dev = torch.device("cuda")
    ahead = feed_for(pool, dev, budget_gb=budget_gb, overlap=True)
    inline = feed_for(pool, dev, budget_gb=budget_gb, overlap=False)
    assert ahead.side is not None and ahead.source.on_device == (budget_gb > 0)
    net = torch.nn.Conv2d(1, 8, 3).cuda().to(memory_format=torch.channels_last)
    # Steps 0-5, then a jump (a resume at step 8) and the last step (nothing is made past the total).
    for step in [0, 1, 2, 3, 4, 5, 8, 9]:
        a = ahead(step)
        # Main-stream work on the pair while the side stream makes the next one, as in training.
        out = sum(net(v).float().square().mean() for v in a)
        b = inline(step)
        torch.cuda.synchronize()
        assert torch.isfinite(out)
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
    assert ahead._ahead is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("budget_gb", [4.0, 0.0])
def test_feed_never_blocks_the_host(synth_root: Path, budget_gb: float) -> None:
    # A blocking call (a pageable host-to-device copy, .item(), a sync) would stop the host from
    # queueing the next step while the GPU trains, so the views could not overlap the step.
    pool = load_pool(synth_root, PLANES, ["train"], image_size=32, supervised=False)
    feed = feed_for(pool, torch.device("cuda"), budget_gb=budget_gb, overlap=True)
    feed(0)  # the epoch's order goes to the device once, here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, feed.spe):  # the rest of the epoch
            feed(step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_ranks_make_the_single_process_views(synth_root: Path) -> None:
    """Two DDP ranks with half the batch each make exactly the single-process views of that batch, so a
    run's views do not depend on the number of GPUs (nor when it resumes on another number)."""
    pool = load_pool(synth_root, PLANES[:1], ["train"], image_size=32, supervised=False)
    cpu = torch.device("cpu")

    def feed(dist: Dist) -> ViewFeed:
        return ViewFeed(pool, BatchSource(pool, cpu, 4.0), ViewsRecipe(), batch_size=16, seed=3, dist=dist,
                        device=cpu, channels_last=True, total_steps=10, overlap=False)  # fmt: skip

    one = feed(Dist())(1)
    halves = [feed(Dist(rank=r, world_size=2, local_rank=r, local_world_size=2))(1) for r in (0, 1)]
    for v in range(2):
        assert torch.equal(torch.cat([h[v] for h in halves]), one[v])
