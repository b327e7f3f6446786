"""Barlow Twins loss: against a slow direct formula, BatchNorm1d, autocast and two-rank gloo."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from medssl_cli.barlowtwins.loss import barlow_twins_loss, batch_standardize

ROOT = Path(__file__).resolve().parents[1]


def slow_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5
) -> tuple[float, float, float]:
    """The paper's formula written out with Python loops, float64."""
    n, d = z1.shape
    a = z1.tolist()
    b = z2.tolist()

    def standardised(rows):
        cols = []
        for j in range(d):
            col = [rows[i][j] for i in range(n)]
            mean = sum(col) / n
            var = sum((v - mean) ** 2 for v in col) / n  # biased, as BatchNorm
            cols.append([(v - mean) / (var + eps) ** 0.5 for v in col])
        return cols

    sa, sb = standardised(a), standardised(b)
    on = off = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(sa[i][k] * sb[j][k] for k in range(n)) / n
            if i == j:
                on += (1 - c_ij) ** 2
            else:
                off += c_ij**2
    return on + lambd * off, on, off


def test_matches_slow_formula():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(7, 5, generator=g, dtype=torch.float64)
    loss, on, off = barlow_twins_loss(z1, z2, lambd=0.0051)
    ref = slow_loss(z1, z2, 0.0051)
    assert loss.dtype == torch.float64
    for got, want in zip((loss, on, off), ref, strict=True):
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_standardisation_is_batchnorm_without_affine():
    z = torch.randn(16, 8) * 5 + 2
    bn = nn.BatchNorm1d(8, affine=False).train()
    torch.testing.assert_close(batch_standardize(z), bn(z))


def test_lambda_weighting():
    z1, z2 = torch.randn(12, 6), torch.randn(12, 6)
    l0, on0, off0 = barlow_twins_loss(z1, z2, lambd=0.0)
    l1, on1, off1 = barlow_twins_loss(z1, z2, lambd=0.25)
    torch.testing.assert_close(l0, on0)
    torch.testing.assert_close(on0, on1)
    torch.testing.assert_close(off0, off1)
    torch.testing.assert_close(l1, on1 + 0.25 * off1)
    assert off1 > 0


def test_identical_views_have_no_invariance_loss():
    z = torch.randn(32, 4, dtype=torch.float64)
    _, on, off = barlow_twins_loss(z, z)
    assert on.item() < 1e-6  # c_ii = var / (var + eps) ~ 1
    assert off.item() > 0  # random features are still correlated a little


def test_gradient_flows_to_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(16, 10)
    x1, x2 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
    loss, _, _ = barlow_twins_loss(net(x1), net(x2))
    loss.backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert net[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # a small gradient step lowers the loss
        for p in net.parameters():
            p -= 1e-3 * p.grad
    loss2, _, _ = barlow_twins_loss(net(x1), net(x2))
    assert loss2 < loss


def test_fp32_under_autocast():
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    want, _, _ = barlow_twins_loss(z1, z2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got, on, off = barlow_twins_loss(z1, z2)
        from_bf16, _, _ = barlow_twins_loss(z1.bfloat16(), z2.bfloat16())
    assert got.dtype == on.dtype == off.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert from_bf16.dtype == torch.float32
    ref, _, _ = barlow_twins_loss(z1.bfloat16().float(), z2.bfloat16().float())
    torch.testing.assert_close(from_bf16, ref)


def test_rejects_bad_shapes_and_world_size():
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(RuntimeError):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), world_size=2)  # not initialised


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    sys.path.insert(0, {root!r})
    from medssl_cli.barlowtwins.loss import barlow_twins_loss

    def work(rank, out):
        dist.init_process_group("gloo", init_method="file://" + out + "/store", rank=rank, world_size=2)
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(12, 5, generator=g, dtype=torch.float64)
        z2 = z1 + torch.randn(12, 5, generator=g, dtype=torch.float64)
        a = z1[rank * 6 : (rank + 1) * 6].clone().requires_grad_()
        b = z2[rank * 6 : (rank + 1) * 6].clone().requires_grad_()
        loss, on, off = barlow_twins_loss(a, b, lambd=0.1, world_size=2)
        loss.backward()
        result = {{"loss": loss.detach(), "on": on.detach(), "ga": a.grad, "gb": b.grad}}
        torch.save(result, f"{{out}}/r{{rank}}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(sys.argv[1],), nprocs=2)
    """
)


@pytest.mark.slow  # starts processes
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 5, generator=g, dtype=torch.float64).requires_grad_()
    z2 = (z1.detach() + torch.randn(12, 5, generator=g, dtype=torch.float64)).requires_grad_()
    loss, on, _ = barlow_twins_loss(z1, z2, lambd=0.1)
    loss.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach())
        torch.testing.assert_close(got["on"], on.detach())
        rows = slice(rank * 6, (rank + 1) * 6)
        # Each rank's gradient is world_size x its share of the global one; DDP's averaging divides it out.
        torch.testing.assert_close(got["ga"] / 2, z1.grad[rows])
        torch.testing.assert_close(got["gb"] / 2, z2.grad[rows])
