"""Read-outs on frozen features: L-BFGS logistic regression, a gradient-trained linear head, kNN.

All three work on cached (n, 512) feature matrices, so a whole grid of label fractions and seeds costs
seconds once the features exist (30 L-BFGS cells on ~2,600 images: ~3.5 s on one CPU core).

- ``fit_lbfgs`` (the default ``finetune.head: lbfgs``): multinomial logistic regression,
  minimise mean_i CE(W z_i + b, y_i) + ||W||^2 / (2 C n)  (= sklearn's C * sum CE + ||W||^2 / 2; the
  bias is not penalised), full batch. The features z are standardised with statistics of the *whole*
  train split (images only, no labels), and the standardisation is folded back into W and b at the end,
  so the result is a plain linear layer on raw features (512 x K + K parameters). C is chosen from
  ``c_grid`` by val accuracy (ties: lower val cross-entropy, then the smaller C). The grid is walked
  from small to large C, each fit warm-started from the previous one, and the walk stops after
  ``patience`` (2) C values in a row that do not beat the best so far (val accuracy rises, then falls
  with C; the large-C fits are the slow ones); skipped C values are listed in ``history`` and
  ``chosen["skipped_C"]``. Solver: L-BFGS (``lbfgs.minimize``, memory 10, Armijo backtracking) on an
  explicit loss and gradient, in the eigenbasis U of the subset's feature covariance (for n < 512:
  of the span of its n rows, an exact reduction), preconditioned per C by scaling coordinate j with
  (a e_j + 1/(C n))^-1/2 (e_j: variance along u_j, a = 4 / K): 2-5x fewer iterations. Each C stops
  when max |dL/dW|, |dL/db| (on the standardised features) <= ``tol`` = 1e-4 (sklearn's default), or
  after ``max_iter`` = 100 iterations. No randomness: the same inputs give the same bits.
- ``fit_sgd`` (``finetune.head: sgd``): the same linear layer trained with AdamW on mini-batches of the
  standardised features, early stopping on val accuracy with ``patience`` epochs; keeps the best-val
  weights. Seeded.
- ``knn_predict`` / ``knn_scores``: k nearest neighbours (k = 20) by cosine similarity of L2-normalised
  features. Votes are weighted by exp(similarity / 0.07) (the weighted kNN of Wu et al. 2018, also
  used by DINO); ``weighted=False`` gives a plain majority vote. Ties go to the lower class index. Class
  scores (vote shares, summing to 1) serve as probabilities for AUROC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medssl_cli.readout.lbfgs import eigenbasis, max_grad, minimize, objective

KNN_TEMPERATURE = 0.07
# Preconditioner curvature per unit feature variance, times K (fit_lbfgs); 4 took the fewest L-BFGS
# iterations of 1, 2, 4, 8, 16 on random-init and SSL features at 64 and 224 px.
PRECOND_A = 4.0


@dataclass
class LinearFit:
    """A fitted linear read-out on raw features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (K, D) float32
    bias: torch.Tensor  # (K,) float32
    history: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)  # e.g. {"C": 1.0} or {"epoch": 12}

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.float() @ self.weight.T + self.bias

    def proba(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(feats), dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keys of ``models.LinearHead`` (an nn.Linear): weight, bias."""
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}


def standardizer(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of ``reference`` (float64; std of a constant feature set to 1)."""
    ref = reference.detach().cpu().numpy().astype(np.float64)
    mu = ref.mean(axis=0)
    ref -= mu
    sd = np.sqrt(np.einsum("ij,ij->j", ref, ref) / max(len(ref), 1))
    return torch.from_numpy(mu), torch.from_numpy(np.where(sd > 1e-8, sd, 1.0))


def _fold(
    w: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """W (z - mu)/sd + b  ->  (W/sd) z + (b - W mu/sd): the same map on raw features."""
    w_raw = w / sd
    return w_raw.float(), (b - w_raw @ mu).float()


def _val_score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    acc = float((logits.argmax(1) == y).double().mean())
    return acc, float(F.cross_entropy(logits, y))


def fit_lbfgs(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    c_grid: Sequence[float],
    *,
    reference: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    patience: int | None = 2,
) -> LinearFit:
    """L-BFGS multinomial logistic regression, C chosen on val (see the module docstring).

    ``tol``: a C's fit stops when the largest entry of the gradient (w.r.t. W and b on the standardised
    features: sklearn's ``tol`` for the same mean-loss objective) is <= tol, or after ``max_iter``
    iterations (warm-started from the previous C). ``patience``: the ascending C sweep stops after this
    many consecutive C values without a better (val accuracy, -val loss); ``None`` fits every C.
    """
    from threadpoolctl import threadpool_limits

    if not c_grid or any(c <= 0 for c in c_grid):
        from medssl_cli.errors import UserError

        raise UserError(f"finetune.c_grid must be positive numbers, got {list(c_grid)}.")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be None or >= 1, got {patience}")
    mu, sd = standardizer(reference if reference is not None else x_train)
    z = ((x_train.double() - mu) / sd).float().numpy()
    zv = ((x_val.double() - mu) / sd).float().numpy()
    y, yv = y_train.long().numpy(), y_val.long()
    n, k = len(y), num_classes
    best: tuple[tuple[float, float, float], np.ndarray, np.ndarray, float] | None = None
    history: list[dict[str, Any]] = []
    stale = 0
    grid = sorted(float(c) for c in c_grid)
    # One BLAS thread: these are small products, and more threads only contend (measured: 2 threads on
    # a busy 2-core machine were 10-30x slower). Single-threaded BLAS is also bitwise reproducible.
    with threadpool_limits(limits=1):
        u, e, zr = eigenbasis(z)
        del z  # zr replaces it (large n: one (n, D) copy less)
        r, ut = len(e), np.ascontiguousarray(u.T, dtype=np.float32)
        wr, b = np.zeros((k, r)), np.zeros(k)  # W = wr U^T: the weights in the eigenbasis
        for i, c in enumerate(grid):
            if patience is not None and stale >= patience:
                why = f"C sweep stopped: {stale} C values in a row without a better val accuracy / loss"
                history += [{"C": c2, "skipped": True, "reason": why} for c2 in grid[i:]]
                break
            lam = 1.0 / (c * n)
            # Preconditioning: L-BFGS runs on V = wr / s, s_j = (a e_j + lam)^-1/2, a rough inverse
            # square root of the loss's curvature along eigenvector j (a = PRECOND_A / K).
            s = 1.0 / np.sqrt(PRECOND_A / k * e + lam)
            theta, fun, grad, nit, nfev = minimize(
                partial(objective, z=zr * s.astype(np.float32), y=y, pen=lam * s * s, k=k),
                np.concatenate([(wr / s).ravel(), b]),
                gmax=partial(max_grad, s=s, ut=ut, k=k, tol=tol),
                tol=tol,
                max_iter=max_iter,
            )
            wr, b = theta[: k * r].reshape(k, r) * s, theta[k * r :]
            w = wr @ u.T  # back from the eigenbasis: (K, D)
            w32, b32 = w.astype(np.float32), b.astype(np.float32)
            acc, vloss = _val_score(torch.from_numpy(zv @ w32.T + b32), yv)
            gm = max_grad(grad, s, ut, k)
            history.append(
                {
                    "C": c,
                    "train_objective": fun,
                    "train_accuracy": float(((zr @ wr.T.astype(np.float32) + b32).argmax(1) == y).mean()),
                    "val_accuracy": acc,
                    "val_loss": vloss,
                    "iterations": nit,
                    "evaluations": nfev,
                    "max_abs_grad": gm,
                    "converged": gm <= tol,
                }
            )
            key = (acc, -vloss, -c)  # higher val accuracy, then lower val loss, then the smaller C
            if best is None or key > best[0]:
                best, stale = (key, w, b.copy(), c), 0
            else:
                stale += 1
    assert best is not None
    weight, bias = _fold(torch.from_numpy(best[1]), torch.from_numpy(best[2]), mu, sd)
    skipped = [h["C"] for h in history if h.get("skipped")]
    return LinearFit(weight, bias, history, {"C": best[3], "val_accuracy": best[0][0], "skipped_C": skipped})


def fit_sgd(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    patience: int,
    seed: int,
    reference: torch.Tensor | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> LinearFit:
    """Linear head trained with AdamW on standardised features; early stopping on val accuracy."""
    mu, sd = standardizer(reference if reference is not None else x_train)
    z = ((x_train.double() - mu) / sd).float()
    zv = ((x_val.double() - mu) / sd).float()
    y, yv = y_train.long(), y_val.long()
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(z.shape[1], num_classes)
    with torch.no_grad():  # seeded init (nn.Linear's own init draws from the global RNG)
        bound = 1.0 / z.shape[1] ** 0.5
        head.weight.uniform_(-bound, bound, generator=g)
        head.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    bs = max(1, min(batch_size, len(y)))
    best: tuple[tuple[float, float], dict[str, torch.Tensor], int] | None = None
    history, stale = [], 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y), generator=g)
        total = 0.0
        for s in range(0, len(y), bs):
            idx = order[s : s + bs]
            loss = F.cross_entropy(head(z[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            acc, vloss = _val_score(head(zv), yv)
        row = {"epoch": epoch, "train_loss": total / len(y), "val_accuracy": acc, "val_loss": vloss}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        # Early stopping counts epochs without a strictly better val accuracy; among the epochs with the
        # best accuracy the lowest val loss is kept.
        if best is None or acc > best[0][0]:
            stale = 0
        else:
            stale += 1
        if best is None or (acc, -vloss) > best[0]:
            best = ((acc, -vloss), {k: v.detach().clone() for k, v in head.state_dict().items()}, epoch)
        if stale >= patience:
            break
    assert best is not None
    weight, bias = _fold(best[1]["weight"].double(), best[1]["bias"].double(), mu, sd)
    return LinearFit(
        weight, bias, history, {"epoch": best[2], "val_accuracy": best[0][0], "stopped_epoch": len(history)}
    )


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    k: int = 20,
    num_classes: int,
    weighted: bool = True,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """(n_query, K) vote shares of the k nearest train features (cosine similarity)."""
    bank = F.normalize(train_feats.float(), dim=1)
    labels = torch.as_tensor(train_labels, device=bank.device).long()
    k = max(1, min(k, bank.shape[0]))
    out = []
    for s in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[s : s + chunk].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.exp(sim / temperature) if weighted else torch.ones_like(sim)
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device)
        scores.scatter_add_(1, labels[idx], votes)
        out.append(scores / scores.sum(dim=1, keepdim=True))
    if not out:
        return torch.zeros(0, num_classes)
    return torch.cat(out)


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    k: int = 20,
    num_classes: int,
    weighted: bool = True,
) -> torch.Tensor:
    """Predicted class per query (argmax of ``knn_scores``; ties to the lower class index)."""
    scores = knn_scores(
        train_feats, train_labels, query_feats, k=k, num_classes=num_classes, weighted=weighted
    )
    return scores.argmax(dim=1)


# --------------------------------------------------------------------------------------------
# Choosing C without a val set: stratified k-fold cross-validation on the labelled images


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number (0..folds-1) of every image: each class's images, in a seeded order, dealt round
    robin, so every fold holds about 1/folds of every class (each class needs >= folds images)."""
    labels = np.asarray(labels)
    out = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        order = np.random.default_rng([seed, 104729, int(c)]).permutation(len(members))
        out[members[order]] = np.arange(len(members)) % folds
    return out


def choose_c_cv(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    c_grid: Sequence[float],
    folds: int,
    seed: int,
    *,
    reference: torch.Tensor | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """The C of ``c_grid`` with the best mean held-out accuracy (ties: lower mean loss, then the smaller
    C) over ``folds`` stratified folds of the labelled images; and the per-C means."""
    fold = stratified_folds(y.numpy(), folds, seed)
    scores: dict[float, list[tuple[float, float]]] = {float(c): [] for c in c_grid}
    for f in range(folds):
        tr, va = torch.from_numpy(fold != f), torch.from_numpy(fold == f)
        fit = fit_lbfgs(x[tr], y[tr], x[va], y[va], num_classes, c_grid, reference=reference, patience=None)
        for h in fit.history:
            scores[float(h["C"])].append((h["val_accuracy"], h["val_loss"]))
    table = [
        {
            "C": c,
            "cv_accuracy": float(np.mean([a for a, _ in s])),
            "cv_loss": float(np.mean([v for _, v in s])),
        }
        for c, s in sorted(scores.items())
    ]
    best = max(table, key=lambda r: (r["cv_accuracy"], -r["cv_loss"], -r["C"]))
    return best["C"], table
