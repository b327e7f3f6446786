"""t-SNE helpers: the fixed stratified sample, cluster-quality scores, the embedding and the figure.

Pure functions on numpy arrays (unit-tested in tests/test_tsne.py); ``stages/tsne.py`` wires them to
runs and data. Definitions:

- silhouette s_i = (b_i - a_i) / max(a_i, b_i), a_i = mean distance to the own class, b_i = the lowest
  mean distance to another class; the score is the mean over points (Rousseeuw 1987; sklearn).
- leave-one-out kNN accuracy: each point is classified by its k nearest *other* points of the same set.
- label-free clustering (``kmeans_agreement``): k-means (k = number of classes, 10 restarts, seeded)
  on the L2-normalised features, then NMI (arithmetic normalisation) and ARI of the clusters against
  the labels (used only to score); a bootstrap over the images (the clustering fixed) gives a 95%
  interval for each: the 2.5-97.5 percentile spread, re-centred on the observed score (resampling
  with replacement inflates NMI's plug-in estimate).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from medssl_cli.errors import UserError
from medssl_cli.readout.probes import KNN_TEMPERATURE


def stratified_sample(labels: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Sorted positions of a class-stratified sample of ``min(max_samples, n)`` items.

    Class c gets k_c ~ max_samples * n_c / n (largest remainder, so the k_c sum exactly), at least one
    per present class when max_samples allows; members are taken in a permutation seeded by
    (seed, c), so the same seed gives the same images.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if max_samples < 1:
        raise UserError(f"tsne.max_samples must be >= 1, got {max_samples}.")
    if n <= max_samples:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    quota = max_samples * counts / n
    k = np.floor(quota).astype(np.int64)
    if max_samples >= len(classes):
        k = np.maximum(k, 1)
    while k.sum() < max_samples:  # give the rest to the largest remainders (lowest class on ties)
        room = np.where(k < counts, quota - k, -np.inf)
        k[int(np.argmax(room))] += 1
    while k.sum() > max_samples:  # the floor overshot: take from the most over-allocated class
        over = np.where(k > 1, k - quota, -np.inf)
        k[int(np.argmax(over))] -= 1
    chosen = []
    for c, kc in zip(classes, k, strict=True):
        members = np.nonzero(labels == c)[0]
        perm = np.random.default_rng([seed, int(c)]).permutation(len(members))
        chosen.append(members[perm[:kc]])
    return np.sort(np.concatenate(chosen))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_loo_accuracy(
    x: np.ndarray, labels: np.ndarray, num_classes: int, *, k: int = 20, metric: str = "cosine"
) -> float | None:
    """Leave-one-out kNN accuracy within ``x``: each row is classified by its k nearest *other* rows.

    cosine: similarity of L2-normalised rows, votes weighted exp(cos / 0.07) (``probes.knn_scores``);
    euclidean: plain majority vote. Ties go to the lower class index.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n < 2:
        return None
    k = max(1, min(k, n - 1))
    z = l2_normalize(x) if metric == "cosine" else np.asarray(x, dtype=np.float64)
    sq = (z * z).sum(1)
    correct = 0
    for s in range(0, n, 1024):  # chunks: the n x n similarity matrix is never held at once
        rows = np.arange(s, min(n, s + 1024))
        if metric == "cosine":
            sim = z[rows] @ z.T
        else:
            sim = -(sq[rows, None] + sq[None, :] - 2 * z[rows] @ z.T)
        sim[np.arange(len(rows)), rows] = -np.inf  # leave the point itself out
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(sim, nn, axis=1)
        # exp((cos - 1)/T): the same ratios as exp(cos/T), without overflow
        votes = np.exp((near - 1.0) / KNN_TEMPERATURE) if metric == "cosine" else np.ones_like(near)
        scores = np.zeros((len(rows), num_classes))
        np.add.at(scores, (np.repeat(np.arange(len(rows)), k), labels[nn].ravel()), votes.ravel())
        correct += int((scores.argmax(1) == labels[rows]).sum())
    return correct / n


def silhouette(x: np.ndarray, labels: np.ndarray, metric: str) -> float | None:
    """Mean silhouette (b - a) / max(a, b) over points; None when fewer than 2 classes or n <= classes."""
    from sklearn.metrics import silhouette_score

    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return None
    return float(silhouette_score(x, labels, metric=metric))


def effective_perplexity(perplexity: float, n: int) -> float:
    """sklearn needs perplexity < n; about 3 x perplexity neighbours are used, so clip to (n - 1) / 3."""
    return float(min(perplexity, max(1.0, (n - 1) / 3.0)))


SINGLE_THREAD_TSNE_MAX = 1000


def embed(features: np.ndarray, perplexity: float, seed: int) -> tuple[np.ndarray, float]:
    """2-D t-SNE of L2-normalised features (Euclidean = cosine geometry); (coordinates, KL divergence).

    Up to ``SINGLE_THREAD_TSNE_MAX`` points run on one OpenMP thread: each of the 1000 iterations is a
    short parallel region, and its barriers cost more than the work, badly so on shared cores
    (measured with 2 threads on a busy 2-core machine: 66 points 24 s vs 0.7 s, 600 points 115 s vs
    10 s single-threaded).
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    z = l2_normalize(features).astype(np.float32)
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca",
        learning_rate="auto",
        random_state=seed,
        metric="euclidean",
    )
    threads = 1 if len(z) <= SINGLE_THREAD_TSNE_MAX else None
    with threadpool_limits(limits=threads, user_api="openmp"):
        coords = tsne.fit_transform(z)
    return np.asarray(coords, dtype=np.float64), float(tsne.kl_divergence_)


def _agreement(table: np.ndarray) -> tuple[float, float]:
    """(NMI with arithmetic normalisation, ARI) from a contingency table (as sklearn defines them)."""
    n = table.sum()
    a, b = table.sum(1), table.sum(0)
    comb = lambda x: x * (x - 1) / 2  # noqa: E731 - pairs
    index, sa, sb, total = comb(table).sum(), comb(a).sum(), comb(b).sum(), comb(n)
    expected = sa * sb / total if total else 0.0
    top = (sa + sb) / 2 - expected
    ari = 1.0 if top == 0 else float((index - expected) / top)
    nz = table > 0
    mi = float((table[nz] / n * np.log(n * table[nz] / np.outer(a, b)[nz])).sum())
    ent = lambda p: float(-(p[p > 0] / n * np.log(p[p > 0] / n)).sum())  # noqa: E731
    h = (ent(a) + ent(b)) / 2
    nmi = 1.0 if h == 0 else max(0.0, mi / h)
    return nmi, ari


def kmeans_agreement(
    z: np.ndarray, labels: np.ndarray, n_cls: int, seed: int = 0, n_boot: int = 1000
) -> dict[str, Any]:
    """NMI and ARI between k-means clusters (k = ``n_cls``) of ``z`` and the labels, each with a 95%
    percentile-bootstrap interval over the images (the clustering fixed)."""
    from sklearn.cluster import KMeans

    labels = np.asarray(labels).astype(np.int64)
    k = max(1, min(n_cls, len(z)))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z).astype(np.int64)
    n_lab = int(labels.max()) + 1 if len(labels) else 1
    codes = labels * k + clusters

    def table(c: np.ndarray) -> np.ndarray:
        return np.bincount(c, minlength=n_lab * k).reshape(n_lab, k).astype(np.float64)

    nmi, ari = _agreement(table(codes))
    rng = np.random.default_rng([seed, 31337])
    boot = np.array(
        [_agreement(table(codes[rng.integers(0, len(codes), len(codes))])) for _ in range(n_boot)]
    )
    # Resampling with replacement duplicates images, which inflates NMI's plug-in estimate: the
    # interval is the bootstrap spread re-centred on the observed score (then clipped to the range).
    spread = np.percentile(boot, [2.5, 97.5], axis=0) - boot.mean(0)
    (nlo, alo), (nhi, ahi) = spread + np.array([nmi, ari])
    nlo, nhi, alo, ahi = max(0.0, nlo), min(1.0, nhi), max(-1.0, alo), min(1.0, ahi)
    return {"k": k, "nmi": nmi, "nmi_ci": [float(nlo), float(nhi)], "ari": ari,
            "ari_ci": [float(alo), float(ahi)], "bootstrap": n_boot}  # fmt: skip


def cluster_scores(feats: np.ndarray, coords: np.ndarray, labels: np.ndarray, k: int, n_cls: int) -> dict:
    """The measured numbers for one backbone (see the module docstring)."""
    z = l2_normalize(feats)
    return {
        "features": {
            "silhouette_cosine": silhouette(z, labels, "cosine"),
            "knn_loo_accuracy": knn_loo_accuracy(z, labels, n_cls, k=k, metric="cosine"),
            "kmeans": kmeans_agreement(z, labels, n_cls),
        },
        "embedding_2d": {
            "silhouette_euclidean": silhouette(coords, labels, "euclidean"),
            "knn_loo_accuracy": knn_loo_accuracy(coords, labels, n_cls, k=k, metric="euclidean"),
        },
    }


def plot_panels(
    panels: list[tuple[str, np.ndarray, dict[str, Any]]],
    labels: np.ndarray,
    class_names: list[str],
    path: Path,
    suptitle: str,
    note: str = "",
) -> None:
    """Panels side by side (title, 2-D coordinates, scores), points coloured by class, one shared legend."""
    from matplotlib.lines import Line2D

    from medssl_cli.plots import _plt, save_figure

    plt = _plt()
    n, k = len(labels), len(class_names)
    # tab10's ten saturated colours first; classes 11-20 get tab20's light variants, then repeat
    dark, light = plt.get_cmap("tab10"), plt.get_cmap("tab20")
    colors = [dark(c) if c < 10 else light((2 * (c - 10) + 1) % 20) for c in range(k)]
    size = float(np.clip(6000.0 / max(n, 1), 6.0, 40.0))  # smaller markers for more points
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 2.4, 4.9), squeeze=False)
    for ax, (title, xy, res) in zip(axes[0], panels, strict=True):
        for c in range(k):
            m = labels == c
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colors[c], alpha=0.8, linewidths=0)
        f = res["features"]
        sil, acc = fmt_score(f["silhouette_cosine"]), fmt_score(f["knn_loo_accuracy"])
        ax.set_title(f"{title}\nsilhouette {sil} | kNN accuracy {acc}", fontsize=10)
        ax.set_xlabel("t-SNE dimension 1")
        ax.set_ylabel("t-SNE dimension 2")
        ax.tick_params(labelsize=7)
    present = [c for c in range(k) if (labels == c).any()]
    handles = [
        Line2D([], [], marker="o", ls="", color=colors[c], markersize=7, label=class_names[c])
        for c in present
    ]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class", fontsize=9)
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(suptitle, width=int(width * 11)), fontsize=11)
    if note:
        fig.text(0.5, -0.02, note, ha="center", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def fmt_score(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
