"""Read-outs on features: L-BFGS logistic regression (vs sklearn), the SGD head, kNN on hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl_cli.readout import probes
from medssl_cli.readout.probes import fit_lbfgs, fit_sgd, knn_predict, knn_scores, standardizer


def _blobs(
    n: int, k: int = 3, d: int = 20, seed: int = 0, spread: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(99)) * 1.5
    y = torch.arange(n) % k
    x = torch.relu(centres[y] + spread * torch.randn(n, d, generator=g)) + 0.1
    return x, y


@pytest.mark.parametrize("n", [60, 12])  # n >= D: full eigenbasis; n < D: the span of the rows
def test_lbfgs_equals_sklearn_logistic_regression(n: int) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(n)
    xv, yv = _blobs(30, seed=1)
    fit = fit_lbfgs(x, y, xv, yv, 3, [0.5], reference=x, tol=1e-9)
    # Same objective: C * sum CE + ||W||^2 / 2 on the standardised features, bias unpenalised.
    mu, sd = standardizer(x)
    z, zv = ((x.double() - mu) / sd).numpy(), ((xv.double() - mu) / sd).numpy()
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(z, y.numpy())
    # Our head works on raw features (standardisation folded into W and b).
    ours = fit.proba(xv).double().numpy()
    assert np.abs(ours - ref.predict_proba(zv)).max() < 1e-4
    assert fit.weight.shape == (3, 20) and fit.bias.shape == (3,)


def test_lbfgs_reports_the_true_gradient_and_stops_at_tol() -> None:
    x, y = _blobs(80, d=30, spread=2.0)
    xv, yv = _blobs(30, d=30, seed=1, spread=2.0)
    c, tol = 10.0, 1e-3
    fit = fit_lbfgs(x, y, xv, yv, 3, [c], tol=tol)
    # Unfold the head back to the standardised features and differentiate the objective there.
    mu, sd = standardizer(x)
    z = (x.double() - mu) / sd
    w = (fit.weight.double() * sd).requires_grad_()
    b = (fit.bias.double() + fit.weight.double() @ mu).requires_grad_()
    loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + (w * w).sum() / (2 * c * len(y))
    loss.backward()
    true_max = max(w.grad.abs().max().item(), b.grad.abs().max().item())
    (h,) = fit.history
    assert h["converged"] and h["iterations"] <= 100
    assert h["max_abs_grad"] <= tol and true_max <= 1.01 * tol
    assert h["train_objective"] == pytest.approx(loss.item(), rel=1e-5)


def test_lbfgs_is_deterministic_and_selects_c_on_val() -> None:
    x, y = _blobs(45, spread=3.0)
    xv, yv = _blobs(60, seed=2, spread=3.0)
    grid = [0.001, 0.1, 10.0]
    a = fit_lbfgs(x, y, xv, yv, 3, grid, patience=None)
    b = fit_lbfgs(x, y, xv, yv, 3, grid, patience=None)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert [h["C"] for h in a.history] == grid and not any(h.get("skipped") for h in a.history)
    best = max(a.history, key=lambda h: (h["val_accuracy"], -h["val_loss"], -h["C"]))
    assert a.chosen["C"] == best["C"] and a.chosen["skipped_C"] == []
    acc = float((a.logits(xv).argmax(1) == yv).float().mean())
    assert acc == pytest.approx(best["val_accuracy"], abs=1e-6)


def test_lbfgs_sweep_stops_after_patience_worse_c_values() -> None:
    # Few noisy samples in many dimensions: tiny C predicts the majority class, large C overfits, so
    # val accuracy peaks mid-grid.
    x, y = _blobs(30, d=60, spread=4.0)
    xv, yv = _blobs(300, d=60, seed=3, spread=4.0)
    grid = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0]
    full = fit_lbfgs(x, y, xv, yv, 3, grid, patience=None)
    accs = [h["val_accuracy"] for h in full.history]
    peak = grid.index(full.chosen["C"])
    assert 0 < peak <= len(grid) - 4 and accs[0] < accs[peak] > accs[-1], accs  # the case is as intended
    early = fit_lbfgs(x, y, xv, yv, 3, grid, patience=2)
    assert early.chosen["C"] == full.chosen["C"]
    assert torch.equal(early.weight, full.weight) and torch.equal(early.bias, full.bias)
    fitted = [h for h in early.history if not h.get("skipped")]
    skipped = [h for h in early.history if h.get("skipped")]
    assert fitted == full.history[: len(fitted)] and [h["C"] for h in early.history] == grid
    # the walk stopped after the first two C values in a row that were not better than the best
    stale = 0
    for i, h in enumerate(full.history):
        better = (h["val_accuracy"], -h["val_loss"]) > max(
            ((g["val_accuracy"], -g["val_loss"]) for g in full.history[:i]), default=(-1.0, -np.inf)
        )
        stale = 0 if better else stale + 1
        if stale == 2:
            break
    assert len(fitted) == i + 1 < len(grid)
    assert early.chosen["skipped_C"] == [h["C"] for h in skipped] == grid[i + 1 :]
    assert all("reason" in h for h in skipped)


def test_lbfgs_patience_counts_c_values_in_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Scripted val scores (one call per fitted C): the count of worse C values restarts at every new best.
    accs = iter([0.5, 0.4, 0.6, 0.55, 0.7, 0.6, 0.65, 0.3, 0.9])
    monkeypatch.setattr(probes, "_val_score", lambda logits, y: (next(accs), 1.0))
    x, y = _blobs(30)
    grid = [10.0**e for e in range(-4, 5)]
    fit = fit_lbfgs(x, y, x, y, 3, grid, patience=2)
    assert [h["C"] for h in fit.history] == grid
    fitted = [h["val_accuracy"] for h in fit.history if not h.get("skipped")]
    assert fitted == [0.5, 0.4, 0.6, 0.55, 0.7, 0.6, 0.65]
    assert fit.chosen["C"] == 1.0 and fit.chosen["val_accuracy"] == 0.7
    assert fit.chosen["skipped_C"] == [1000.0, 10000.0] == [h["C"] for h in fit.history if h.get("skipped")]
    # equal val accuracy and loss: the smaller C is kept, and the later ties count as not better
    accs = iter([0.7, 0.7, 0.7, 0.9])
    fit = fit_lbfgs(x, y, x, y, 3, [0.1, 1.0, 10.0, 100.0], patience=2)
    assert fit.chosen["C"] == 0.1 and fit.chosen["skipped_C"] == [100.0]


def test_sgd_head_stops_early_and_keeps_the_best_epoch() -> None:
    x, y = _blobs(60, spread=0.3)  # easy: val accuracy saturates quickly
    xv, yv = _blobs(30, seed=1, spread=0.3)
    seen = []
    fit = fit_sgd(
        x,
        y,
        xv,
        yv,
        3,
        epochs=300,
        lr=0.05,
        weight_decay=0.0,
        batch_size=16,
        patience=3,
        seed=0,
        on_epoch=seen.append,
    )
    assert len(fit.history) < 300 and seen == fit.history
    best_acc = max(h["val_accuracy"] for h in fit.history)
    assert fit.chosen["val_accuracy"] == best_acc == 1.0
    assert float((fit.logits(xv).argmax(1) == yv).float().mean()) == pytest.approx(best_acc)
    again = fit_sgd(x, y, xv, yv, 3, epochs=300, lr=0.05, weight_decay=0.0, batch_size=16, patience=3, seed=0)
    assert torch.equal(again.weight, fit.weight)


def test_knn_hand_cases() -> None:
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.2], [0.3, 1.0]])
    # q0's 3 nearest by cosine: [1,0.1], [1,0] (class 0), then [0.2,1] (class 1): 2 votes to 1 -> class 0.
    # q1's 3 nearest are the three class-1 points -> class 1.
    for weighted in (True, False):
        pred = knn_predict(bank, labels, q, k=3, num_classes=2, weighted=weighted)
        assert pred.tolist() == [0, 1]
    # cosine: scaling a query changes nothing
    assert torch.allclose(
        knn_scores(bank, labels, q * 10, k=3, num_classes=2), knn_scores(bank, labels, q, k=3, num_classes=2)
    )
    # majority vote shares: 2/3 and 1/3; scores sum to 1
    s = knn_scores(bank, labels, q[:1], k=3, num_classes=2, weighted=False)
    assert torch.allclose(s, torch.tensor([[2 / 3, 1 / 3]]))
    # k = 2, one neighbour of each class: majority is a tie -> lower class index; the weighted vote goes
    # to the more similar neighbour.
    bank2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q2 = torch.tensor([[0.3, 1.0]])  # closer to class 1
    assert knn_predict(bank2, torch.tensor([0, 1]), q2, k=2, num_classes=2, weighted=False).item() == 0
    assert knn_predict(bank2, torch.tensor([0, 1]), q2, k=2, num_classes=2, weighted=True).item() == 1
    # k above the bank size is clipped; a class absent from the bank gets score 0
    s3 = knn_scores(bank2, torch.tensor([0, 1]), q2, k=20, num_classes=3)
    assert s3.shape == (1, 3) and s3[0, 2] == 0 and s3.sum().item() == pytest.approx(1.0)
