"""`medssl tsne`: the stratified sample, cluster scores (hand-computed), and a small end-to-end run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl_cli.data.pool import load_pool
from medssl_cli.errors import UserError
from medssl_cli.io import write_json
from medssl_cli.models import backbone_meta, build_backbone, save_weights
from medssl_cli.readout import clusters
from medssl_cli.recipe import Recipe, override
from medssl_cli.runs import Run, create_run
from medssl_cli.stages.tsne import subpool, tsne

PLANES = ["synthetic_organs_axial", "synthetic_organs_coronal", "synthetic_organs_sagittal"]


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_stratified_sample_is_proportional_exact_and_seeded() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 9 + [3] * 1)
    idx = clusters.stratified_sample(labels, 20, seed=0)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)
    counts = np.bincount(labels[idx], minlength=4)
    # quotas 12, 6, 1.8, 0.2 -> floor 12, 6, 1, 0 -> floor of one: 12, 6, 1, 1 (=20)
    assert counts.tolist() == [12, 6, 1, 1]
    assert np.array_equal(idx, clusters.stratified_sample(labels, 20, seed=0))
    assert not np.array_equal(idx, clusters.stratified_sample(labels, 20, seed=1))
    # the remainder goes to the largest fractional quotas: 17 of 100 -> 10.2, 5.1, 1.53, 0.17
    counts = np.bincount(labels[clusters.stratified_sample(labels, 17, seed=0)], minlength=4)
    assert counts.tolist() == [10, 5, 1, 1]
    assert np.array_equal(clusters.stratified_sample(labels, 500, seed=3), np.arange(100))
    with pytest.raises(UserError):
        clusters.stratified_sample(labels, 0, seed=0)


def test_knn_loo_accuracy_by_hand() -> None:
    # 1-D, k = 1: 5.4 is nearer to 1 (4.4) than to 10 (4.6), so it is the one mistake: 4/5.
    x = np.array([[0.0], [1.0], [10.0], [11.0], [5.4]])
    y = np.array([0, 0, 1, 1, 1])
    assert clusters.knn_loo_accuracy(x, y, 2, k=1, metric="euclidean") == pytest.approx(0.8)
    # k = 3 majority: 0 -> {1, 5.4, 10} = 0,1,1 -> 1 (wrong); 1 -> {0, 5.4, 10} -> 1 (wrong);
    # 10 -> {11, 5.4, 1} -> 1 (right); 11 -> {10, 5.4, 1} -> 1 (right); 5.4 -> {1, 0, 10} -> 0 (wrong)
    assert clusters.knn_loo_accuracy(x, y, 2, k=3, metric="euclidean") == pytest.approx(0.4)
    # cosine: two directions, leave-one-out never sees the point itself
    ang = np.array([0.0, 0.1, 0.2, 3.0, 3.1, 3.2])
    v = np.stack([np.cos(ang), np.sin(ang)], 1) * np.array([[1], [5], [2], [1], [3], [7]])  # norms ignored
    assert clusters.knn_loo_accuracy(v, np.array([0, 0, 0, 1, 1, 1]), 2, k=2) == 1.0
    assert clusters.knn_loo_accuracy(v[:1], np.array([0]), 2) is None


def test_silhouette_by_hand_and_perplexity_clip() -> None:
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    y = np.array([0, 0, 1, 1])
    # s(0) = (10.5 - 1)/10.5, s(1) = (9.5 - 1)/9.5, symmetric for class 1
    expected = ((10.5 - 1) / 10.5 + (9.5 - 1) / 9.5) / 2
    assert clusters.silhouette(x, y, "euclidean") == pytest.approx(expected)
    assert clusters.silhouette(x, np.zeros(4, dtype=int), "euclidean") is None
    assert clusters.effective_perplexity(30.0, 66) == pytest.approx(65 / 3)
    assert clusters.effective_perplexity(30.0, 1000) == 30.0
    assert clusters.effective_perplexity(30.0, 3) == 1.0


def test_embedding_is_deterministic_for_a_seed() -> None:
    feats = np.random.default_rng(0).normal(size=(40, 16))
    a, kl = clusters.embed(feats, 10.0, seed=0)
    b, _ = clusters.embed(feats, 10.0, seed=0)
    assert a.shape == (40, 2) and np.isfinite(kl) and np.array_equal(a, b)


def test_subpool_keeps_rows_labels_and_pixels(synth_root: Path) -> None:
    pool = load_pool(synth_root, PLANES, ["test"], image_size=32)
    idx = clusters.stratified_sample(pool.labels, 20, seed=0)
    sub = subpool(pool, idx)
    assert len(sub) == 20
    assert np.array_equal(sub.source_idx, pool.source_idx[idx])
    assert np.array_equal(sub.labels, pool.labels[idx])
    assert torch.equal(sub.images[torch.arange(20)], pool.images[torch.from_numpy(idx)])
    assert sub.seen() != pool.seen() and set(sub.seen()) <= set(pool.seen())


# --------------------------------------------------------------------------------------------
# End to end on synthetic data, with a pretrain-like run (random weights, real metadata)


def fake_pretrain(root: Path, runs: Path) -> Run:
    recipe = override(Recipe(), {"data.datasets": PLANES, "data.image_size": 32})
    train = load_pool(root, PLANES, ["train"], image_size=32, supervised=False)
    run = create_run(runs, "pretrain", recipe, name="fake", extra={"data": {**train.provenance()}})
    write_json(run.file("data_seen.json"), train.seen())
    torch.manual_seed(123)
    meta = {
        **backbone_meta(1, "replicate", 32),
        "norm_mean": "[0.5]",
        "norm_std": "[0.5]",
        "datasets": json.dumps(PLANES),
        "init": "ssl",
    }
    save_weights(run.file("weights", "backbone.safetensors"), build_backbone(1, "replicate"), meta)
    run.set_status("finished")
    return run


def test_tsne_end_to_end_and_leakage_guard(synth_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    pre = fake_pretrain(synth_root, runs)
    opts = {"tsne.max_samples": 33, "tsne.perplexity": 30.0, "compute.device": "cpu"}
    run = tsne(opts, from_runs=[str(pre.path)], inits=["random"], runs_root=runs, data_dir=synth_root)
    info = run.manifest
    assert info["status"] == "finished" and info["stage"] == "tsne"
    assert info["parent"] == str(pre.path.resolve())
    m = json.loads(run.file("metrics.json").read_text())
    assert m["n"] == 33 and m["split"] == "test" and m["datasets"] == PLANES
    assert all(m["synthetic"].values())
    assert m["tsne"]["perplexity"] == pytest.approx(32 / 3)  # clipped for 33 points
    assert [b["id"] for b in m["backbones"]] == [f"ssl:{pre.name}", "random"]
    for b in m["backbones"]:
        assert -1.0 <= b["features"]["silhouette_cosine"] <= 1.0
        assert 0.0 <= b["features"]["knn_loo_accuracy"] <= 1.0
        km = b["features"]["kmeans"]  # label-free: k-means clusters scored against the labels
        assert km["k"] == 11 and 0.0 <= km["nmi"] <= 1.0 and km["nmi_ci"][0] <= km["nmi"] <= km["nmi_ci"][1]
        assert -1.0 <= km["ari"] <= 1.0 and km["ari_ci"][0] <= km["ari"] <= km["ari_ci"][1]
        assert 0.0 <= b["embedding_2d"]["knn_loo_accuracy"] <= 1.0
    assert m["leakage_override"] is False and m["leakage"][0]["checked"] is True
    # all 11 classes are in the sample (33 of 66 test images, 6 per class -> 3 each)
    assert sorted(m["per_class"].values()) == [3] * 11

    with open(run.file("coordinates.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 33
    assert set(rows[0]) == {"row", "dataset", "split", "label", "class_name", "backbone", "x", "y"}
    names = m["class_names"]
    assert all(r["class_name"] == names[int(r["label"])] for r in rows)
    sample = json.loads(run.file("sample.json").read_text())
    ssl_rows = [(r["dataset"], int(r["row"])) for r in rows if r["backbone"].startswith("ssl:")]
    assert ssl_rows == list(zip(sample["dataset"], sample["row"], strict=True))
    assert run.file("plots", "tsne.png").stat().st_size > 20_000

    # pretraining saw the train split: embedding it is refused (no run made), unless overridden
    before = sorted(p.name for p in runs.iterdir())
    small = {**opts, "tsne.split": "train", "tsne.max_samples": 12}
    with pytest.raises(UserError, match="Refusing to evaluate.*--allow-leakage"):
        tsne(small, from_runs=[str(pre.path)], runs_root=runs, data_dir=synth_root)
    assert sorted(p.name for p in runs.iterdir()) == before
    forced = tsne(small, from_runs=[str(pre.path)], runs_root=runs, data_dir=synth_root, allow_leakage=True)
    fm = json.loads(forced.file("metrics.json").read_text())
    assert fm["leakage_override"] is True and fm["leakage"][0]["overlaps"]


def test_tsne_option_errors(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--datasets is required"):
        tsne({}, inits=["random"], runs_root=tmp_path, data_dir=synth_root)
    with pytest.raises(UserError, match="Unknown init 'imagenett'"):
        tsne({}, inits=["imagenett"], runs_root=tmp_path, data_dir=synth_root)
    with pytest.raises(UserError, match="No finished pretrain run"):
        tsne({}, runs_root=tmp_path, data_dir=synth_root)
