"""barlowtwins.optim: LARS, parameter groups, the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medssl_cli.barlowtwins.optim import LARS, build_optimizer, lr_at, param_groups, set_lr
from medssl_cli.models import build_pretrain_net
from medssl_cli.recipe import PretrainRecipe


def test_lars_on_1d_params_is_sgd_momentum_without_weight_decay():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5))
    b = nn.Parameter(a.detach().clone())
    lars = LARS([a], lr=0.1, momentum=0.9, eta=0.001, weight_decay=0.5)
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=0.0)
    for _ in range(4):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a, b)


def test_lars_trust_ratio_by_hand():
    p = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # ||p|| = 5
    g1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    lr, wd, eta, m = 0.5, 0.1, 0.001, 0.9
    opt = LARS([p], lr=lr, momentum=m, eta=eta, weight_decay=wd)
    p0 = p.detach().clone()
    d1 = g1 + wd * p0  # [[1.3, 0.4], [0, 2]]
    d1 = d1 * (eta * 5.0 / math.sqrt(1.3**2 + 0.4**2 + 2.0**2))
    p.grad = g1
    opt.step()
    p1 = p0 - lr * d1
    torch.testing.assert_close(p.detach(), p1)
    d2 = g2 + wd * p1
    d2 = d2 * (eta * p1.norm() / d2.norm())
    p.grad = g2
    opt.step()
    torch.testing.assert_close(p.detach(), p1 - lr * (m * d1 + d2))


def test_lars_zero_norm_weight_uses_ratio_one():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([p], lr=1.0, momentum=0.9)
    p.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.ones(2, 2))


def test_param_groups_split_weights_from_biases_and_bn():
    net = build_pretrain_net(3, "replicate", [32, 16])
    net.backbone.conv1.requires_grad_(False)
    groups = param_groups(net, lr_weights=0.2, lr_biases=0.0048, weight_decay=1.5e-6)
    weights, biases = groups
    assert weights["name"] == "weights" and all(p.ndim > 1 for p in weights["params"])
    assert biases["name"] == "biases" and all(p.ndim == 1 for p in biases["params"])
    assert (weights["weight_decay"], biases["weight_decay"]) == (1.5e-6, 0.0)
    assert (weights["base_lr"], biases["base_lr"]) == (0.2, 0.0048)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(weights["params"]) + len(biases["params"]) == len(trainable)
    assert not any(p is net.backbone.conv1.weight for p in weights["params"])
    bn = net.backbone.bn1
    assert any(p is bn.weight for p in biases["params"]) and any(p is bn.bias for p in biases["params"])


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_build_lars_scales_lr_by_batch():
    recipe = PretrainRecipe(optimizer="lars", lr=0.2, lr_biases=0.0048, weight_decay=1.5e-6, batch_size=512)
    opt = build_optimizer(_tiny(), recipe)
    assert isinstance(opt, LARS)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.0096])
    opt = build_optimizer(_tiny(), recipe, batch_size=128)
    assert [g["base_lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.0024])
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["eta"] == 0.001


def test_build_adam_and_take_a_step():
    torch.manual_seed(0)
    net = _tiny()
    opt = build_optimizer(net, PretrainRecipe(optimizer="adam", lr=0.03, weight_decay=0.0))
    assert isinstance(opt, torch.optim.Adam)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.03]  # Adam: not scaled by batch
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    # Adam's first step moves each element by lr * g / (|g| + eps): ~lr where |g| >> eps
    for b, p in zip(before, net.parameters(), strict=True):
        clear = p.grad.abs() > 1e-4  # (the bias before BatchNorm gets ~0 gradient)
        torch.testing.assert_close(
            (p.detach() - b).abs()[clear], torch.full_like(b, 0.03)[clear], rtol=1e-3, atol=0
        )


def test_schedule_warmup_and_cosine_endpoints():
    base, total, warm = 2.0, 100, 10
    assert lr_at(0, total, warm, base) == pytest.approx(base / warm)
    assert lr_at(4, total, warm, base) == pytest.approx(base * 5 / warm)
    assert lr_at(warm - 1, total, warm, base) == pytest.approx(base)
    assert lr_at(warm, total, warm, base) == pytest.approx(base)
    assert lr_at(total - 1, total, warm, base) == pytest.approx(0.001 * base)
    mid = warm + (total - 1 - warm) / 2
    assert lr_at(int(mid), total, warm, base) == pytest.approx((base + 0.001 * base) / 2, rel=0.05)
    after = [lr_at(s, total, warm, base) for s in range(warm, total)]
    assert all(x >= y for x, y in zip(after, after[1:], strict=False))
    assert lr_at(0, 50, 0, base) == pytest.approx(base)  # no warmup
    assert lr_at(500, 50, 0, base) == pytest.approx(0.001 * base)  # past the end: stays at the floor


def test_set_lr_uses_each_groups_base_lr():
    recipe = PretrainRecipe(optimizer="lars", lr=0.2, lr_biases=0.0048, batch_size=256)
    opt = build_optimizer(_tiny(), recipe)
    got = set_lr(opt, 0, total_steps=100, warmup_steps=10)
    assert got == pytest.approx(0.02)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.00048])
    set_lr(opt, 99, total_steps=100, warmup_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0002, 0.0000048])
    assert [g["base_lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.0048])
    plain = torch.optim.SGD(_tiny().parameters(), lr=0.5)  # no base_lr recorded: its lr is the base
    set_lr(plain, 0, 10, 2)
    assert plain.param_groups[0]["lr"] == pytest.approx(0.25)
