"""The solver behind ``probes.fit_lbfgs``: multinomial logistic loss, L-BFGS, eigenbasis, stopping test.

Plain NumPy on (n, r) float32 features; ``probes.fit_lbfgs`` states the objective, the preconditioning
and the selection of C.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def objective(
    theta: np.ndarray, z: np.ndarray, y: np.ndarray, pen: np.ndarray, k: int
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy + 1/2 sum_j pen_j ||V[:, j]||^2 and its gradient; theta = [V.ravel(), b].

    With P = softmax(Z V^T + b): dL/dV = (P - Y)^T Z / n + V pen, dL/db = sum_i (P - Y)_i / n. The
    (n, r) x (r, K) products run in float32 (2x faster than float64, ample for the gradient tolerance);
    the (n, K) softmax, the loss, the iterate and the L-BFGS history are float64, so the line search
    can still see decreases near the optimum.
    """
    n, r = z.shape
    v = theta[: k * r].reshape(k, r)
    logits = (z @ v.astype(np.float32).T).astype(np.float64) + theta[k * r :]
    logits -= logits.max(axis=1, keepdims=True)  # log-sum-exp shift: exact, avoids overflow
    rows = np.arange(n)
    picked = logits[rows, y]
    e = np.exp(logits, out=logits)
    s = e.sum(axis=1)
    loss = float(np.log(s).sum() - picked.sum()) / n + 0.5 * float(((v * v) @ pen).sum())
    e /= s[:, None] * n  # P / n
    e[rows, y] -= 1.0 / n  # (P - Y) / n
    grad = np.empty_like(theta)
    grad[: k * r] = ((e.astype(np.float32).T @ z) + v * pen).ravel()
    grad[k * r :] = e.sum(axis=0)
    return loss, grad


def minimize(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x: np.ndarray,
    *,
    gmax: Callable[[np.ndarray], float],
    tol: float,
    max_iter: int,
    memory: int = 10,
    ftol: float = 2.2e-9,
) -> tuple[np.ndarray, float, np.ndarray, int, int]:
    """Minimise a smooth convex ``fun`` (loss and gradient) from ``x`` by L-BFGS.

    Two-loop recursion over the last ``memory`` (s, y) pairs, H0 = s.y / y.y (Nocedal & Wright,
    Numerical Optimization, 2006, Alg. 7.4-7.5); backtracking line search from step 1 (the first step
    1 / ||g||) with the Armijo condition (c1 = 1e-4) and safeguarded quadratic interpolation; a pair is
    kept only if s.y > 0. Stops when ``gmax(g)`` <= ``tol``, after ``max_iter`` iterations, when an
    iteration lowers the loss by <= ftol * max(|f|, 1) (SciPy L-BFGS-B's default factr * eps), or when
    the line search finds no decrease. Returns x, f, g, iterations, loss evaluations.
    """
    f, g = fun(x)
    evals, it = 1, 0
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    while it < max_iter and gmax(g) > tol:
        q = g.copy()
        alphas = []
        for s, yv, rho in reversed(pairs):
            alphas.append(rho * float(s @ q))
            q -= alphas[-1] * yv
        if pairs:
            q *= float(pairs[-1][0] @ pairs[-1][1]) / float(pairs[-1][1] @ pairs[-1][1])
        for (s, yv, rho), a in zip(pairs, reversed(alphas), strict=True):
            q += (a - rho * float(yv @ q)) * s
        gd = -float(g @ q)  # < 0 in exact arithmetic (only pairs with s.y > 0 are kept)
        if not gd < 0:  # rounding: restart from steepest descent
            pairs, q, gd = [], g.copy(), -float(g @ g)
        t = 1.0 if pairs else 1.0 / max(float(np.sqrt(g @ g)), 1e-12)
        for _ in range(20):
            x_new = x - t * q
            f_new, g_new = fun(x_new)
            evals += 1
            if f_new <= f + 1e-4 * t * gd:
                break
            # minimiser of the quadratic through f, gd and f_new, kept within [0.1 t, 0.5 t]
            t_q = -gd * t * t / (2.0 * (f_new - f - gd * t))
            t = min(max(t_q, 0.1 * t), 0.5 * t) if np.isfinite(t_q) else 0.1 * t
        else:
            break  # no decrease found: at the loss's resolution
        s, yv = x_new - x, g_new - g
        if float(s @ yv) > 1e-12 * float(yv @ yv):
            pairs = [*pairs, (s, yv, 1.0 / float(s @ yv))][-memory:]
        stalled = f - f_new <= ftol * max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        it += 1
        if stalled:
            break
    return x, f, g, it, evals


def eigenbasis(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal basis U (D, r) of the span of z's rows and the variances e of z along it.

    n >= D: the eigenvectors of z^T z / n (all D). n < D: from the n x n Gram matrix z z^T / n
    (U = z^T Q / sqrt(n e)), keeping the r <= n directions with e > 1e-9 max(e): W's optimum lies in
    the span of the rows (its gradient does, and the penalty only shrinks), so the problem shrinks
    exactly from D to r columns. Returns U (float64), e (clipped at 0) and z U (float32).
    """
    n, d = z.shape
    if n >= d:
        e, u = np.linalg.eigh((z.T @ z).astype(np.float64) / n)
    else:
        z64 = z.astype(np.float64)
        e, q = np.linalg.eigh(z64 @ z64.T / n)
        keep = e > 1e-9 * max(float(e.max()), 1e-300)
        e, u = e[keep], (z64.T @ q[:, keep]) / np.sqrt(n * e[keep])
    e = np.clip(e, 0.0, None)
    return u, e, z @ u.astype(np.float32)


def max_grad(g: np.ndarray, s: np.ndarray, ut: np.ndarray, k: int, tol: float | None = None) -> float:
    """max |gradient| w.r.t. (W, b), from the gradient w.r.t. (V, b): dL/dW = (dL/dV / s) U^T.

    ``ut``: U^T, (r, D) float32 (the product's rounding, ~1e-7 relative, is far below any tolerance).

    With ``tol``, the (K, r) x (r, D) product is skipped where the answer is clear from row norms:
    max_j |G_cj| lies in [||G_c|| / sqrt(D), ||G_c||] (U has orthonormal columns); the bound is returned.
    """
    r = len(s)
    gwr = g[: k * r].reshape(k, r) / s
    gb = float(np.abs(g[k * r :]).max())
    if tol is not None:
        hi = float(np.sqrt((gwr * gwr).sum(axis=1)).max(initial=0.0))
        if max(hi, gb) <= tol or hi / np.sqrt(ut.shape[1]) > tol:
            return max(hi, gb)
    return max(float(np.abs(gwr.astype(np.float32) @ ut).max(initial=0.0)), gb)
