"""Read-outs on features: L-BFGS logistic regression (vs sklearn), the SGD head, kNN on hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl_cli.probes import fit_lbfgs, fit_sgd, knn_predict, knn_scores, standardizer


def _blobs(
    n: int, k: int = 3, d: int = 20, seed: int = 0, spread: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(99)) * 1.5
    y = torch.arange(n) % k
    x = torch.relu(centres[y] + spread * torch.randn(n, d, generator=g)) + 0.1
    return x, y


def test_lbfgs_equals_sklearn_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(60)
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


def test_lbfgs_is_deterministic_and_selects_c_on_val() -> None:
    x, y = _blobs(45, spread=3.0)
    xv, yv = _blobs(60, seed=2, spread=3.0)
    grid = [0.001, 0.1, 10.0]
    a = fit_lbfgs(x, y, xv, yv, 3, grid)
    b = fit_lbfgs(x, y, xv, yv, 3, grid)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert [h["C"] for h in a.history] == grid
    best = max(a.history, key=lambda h: (h["val_accuracy"], -h["val_loss"], -h["C"]))
    assert a.chosen["C"] == best["C"]
    acc = float((a.logits(xv).argmax(1) == yv).float().mean())
    assert acc == pytest.approx(best["val_accuracy"], abs=1e-6)


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
