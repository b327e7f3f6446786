"""Chunked Barlow Twins step: same full-batch loss, gradients as the plain step where BN allows it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medssl_cli.barlowtwins.chunked import bn_state, chunk_count, chunked_train_step
from medssl_cli.models import build_pretrain_net
from medssl_cli.stages.pretrain import train_step

LAMBD = 0.0051
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 2 threads crawl on a busy box


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_pretrain_net(1, "replicate", [32, 32, 32]).train()


def _views(batch: int, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, generator=g), torch.randn(batch, 1, size, size, generator=g)


def _sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: weights stay put, .grad stays for comparison


def _freeze_bn(net: nn.Module) -> nn.Module:
    """BN layers in eval mode: running statistics, so a sample's output no longer depends on its chunk."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in net.parameters()]


def _max_rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp(min=1e-12)) for x, y in zip(a, b, strict=True))


def _plain_and_chunked(chunk: int, batch: int = 8, frozen: bool = False, bf16: bool = False):
    ref = _net()
    other = copy.deepcopy(ref)
    if frozen:
        _freeze_bn(ref), _freeze_bn(other)
    v1, v2 = _views(batch)
    out_ref = train_step(ref, _sgd(ref), v1, v2, LAMBD, bf16)
    out = chunked_train_step(other, _sgd(other), v1, v2, LAMBD, bf16, chunk)
    return ref, other, out_ref, out, (v1, v2)


def test_one_chunk_equals_plain_step() -> None:
    ref, other, out_ref, out, _ = _plain_and_chunked(chunk=8)
    for a, b in zip(out, out_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _max_rel_err(_grads(other), _grads(ref)) < 1e-5
    # Running stats: pass 1 leaves no trace, pass 2 = the plain step's two forwards.
    for (_, a), (_, b) in zip(bn_state(other), bn_state(ref), strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_one_chunk_equals_plain_step_bf16() -> None:
    ref, other, out_ref, out, _ = _plain_and_chunked(chunk=64, bf16=True)  # chunk > batch: one chunk
    torch.testing.assert_close(out[0], out_ref[0], rtol=1e-3, atol=1e-3)
    assert _max_rel_err(_grads(other), _grads(ref)) < 1e-2


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_frozen_bn_chunked_gradients_equal_full_batch(chunk: int) -> None:
    ref, other, out_ref, out, _ = _plain_and_chunked(chunk=chunk, frozen=True)
    torch.testing.assert_close(out[0], out_ref[0], rtol=1e-4, atol=1e-4)
    assert _max_rel_err(_grads(other), _grads(ref)) < 1e-4


def test_train_bn_chunks_change_the_gradient() -> None:
    """The documented consequence is real: with BN in train mode, per-chunk statistics differ."""
    ref, other, out_ref, out, _ = _plain_and_chunked(chunk=4)
    assert _max_rel_err(_grads(other), _grads(ref)) > 1e-2


def test_chunked_loss_is_the_full_batch_loss_of_chunk_embeddings() -> None:
    from medssl_cli.barlowtwins.loss import barlow_twins_loss

    net = _net()
    probe = copy.deepcopy(net)
    v1, v2 = _views(8)
    loss, _, _ = chunked_train_step(net, _sgd(net), v1, v2, LAMBD, False, 4)
    with torch.no_grad():
        z1 = torch.cat([probe(v1[:4]), probe(v1[4:])])
        z2 = torch.cat([probe(v2[:4]), probe(v2[4:])])
    torch.testing.assert_close(loss, barlow_twins_loss(z1, z2, LAMBD)[0], rtol=1e-5, atol=1e-4)


def test_bn_running_stats_updated_once_per_chunk_and_view() -> None:
    net = _net()
    expected = copy.deepcopy(net)
    v1, v2 = _views(9)
    chunked_train_step(net, _sgd(net), v1, v2, LAMBD, False, 3)
    with torch.no_grad():  # what the docstring promises: pass 2 only, order v1_c, v2_c per chunk
        for a, b in zip(v1.split(3), v2.split(3), strict=True):
            expected(a), expected(b)
    got, want = bn_state(net), bn_state(expected)
    assert got and len(got) == len(want)
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert int(a["num_batches_tracked"]) == 6  # 3 chunks x 2 views, not 12 (pass 1 restored)
        torch.testing.assert_close(a["running_mean"], b["running_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["running_var"], b["running_var"], rtol=1e-5, atol=1e-6)


def test_optimizer_steps_once_and_moves_weights() -> None:
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    chunked_train_step(net, opt, *_views(8), LAMBD, False, 4)
    assert all(opt.state[p]["step"] == 1 for p in net.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))


def test_chunk_sizes_and_errors() -> None:
    assert chunk_count(256, 64) == 4 and chunk_count(250, 64) == 4 and chunk_count(8, 64) == 1
    with pytest.raises(ValueError):
        chunk_count(8, 0)
    net = _net()
    with pytest.raises(ValueError, match="chunk of 1"):
        chunked_train_step(net, _sgd(net), *_views(9), LAMBD, False, 1)
    with pytest.raises(ValueError, match="shape"):
        v1, v2 = _views(8)
        chunked_train_step(net, _sgd(net), v1, v2[:6], LAMBD, False, 4)
