"""Paired comparisons of inits (report), labels saved, and the label-free clustering score (t-SNE)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medssl_cli.readout.clusters import kmeans_agreement, l2_normalize
from medssl_cli.stages.report.paired import compare_grid, holm, paired_difference


def _planted(n: int, gap: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A correct on 70% + gap of n images, B on 70%; B's correct images are a subset of A's."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[order[: int(round((0.70 + gap) * n))]] = True
    b[order[: int(round(0.70 * n))]] = True
    labels = rng.integers(0, 4, n)
    return a, b, labels


def test_a_planted_one_point_difference_is_significant_with_many_images_not_with_few() -> None:
    a, b, y = _planted(20_000, 0.01)
    many = paired_difference(a[None], b[None], y, np.arange(len(y)), n_boot=1000)
    assert many["accuracy"]["diff"] == pytest.approx(0.01, abs=1e-9)
    assert many["accuracy"]["p"] < 0.01 and many["accuracy"]["ci"][0] > 0
    a, b, y = _planted(200, 0.01)
    few = paired_difference(a[None], b[None], y, np.arange(len(y)), n_boot=1000)
    assert few["accuracy"]["p"] > 0.05 and few["accuracy"]["ci"][0] <= 0 <= few["accuracy"]["ci"][1]


def test_identical_predictions_give_p_one() -> None:
    a, _, y = _planted(500, 0.0)
    res = paired_difference(np.stack([a, a]), np.stack([a, a]), y, np.arange(500), n_boot=500)
    assert res["accuracy"] == {"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0}
    assert res["balanced_accuracy"]["p"] == 1.0 and res["n_seeds"] == 2


def test_grouping_by_subject_widens_the_interval_for_duplicated_images() -> None:
    a, b, y = _planted(600, 0.03, seed=3)
    # every subject's image appears three times (as the organ planes show each item three times)
    a3, b3, y3 = np.repeat(a, 3), np.repeat(b, 3), np.repeat(y, 3)
    subjects = np.repeat(np.arange(600), 3)
    grouped = paired_difference(a3[None], b3[None], y3, subjects, n_boot=2000)
    naive = paired_difference(a3[None], b3[None], y3, np.arange(1800), n_boot=2000)
    width = lambda r: r["accuracy"]["ci"][1] - r["accuracy"]["ci"][0]  # noqa: E731
    assert grouped["n_groups"] == 600 and naive["n_groups"] == 1800
    assert width(grouped) > 1.5 * width(naive)  # ~sqrt(3) wider: the triplicates are not independent


def test_holm_adjustment() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.6, 0.6]) == [1.0, 1.0]


def _write(path: Path, labels: np.ndarray, predicted: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "dataset", "row", "item", "label", "predicted", "p_a", "p_b"])
        for i, (lab, pred) in enumerate(zip(labels, predicted, strict=True)):
            w.writerow([i, "d", i, "", lab, pred, 0.5, 0.5])
    return str(path)


def test_labels_saved_finds_the_planted_fraction(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 3000
    y = rng.integers(0, 2, n)
    acc = {("ssl", 0.01): 0.60, ("ssl", 0.1): 0.80, ("ssl", 1.0): 0.90,
           ("random", 0.01): 0.55, ("random", 0.1): 0.70, ("random", 1.0): 0.78}  # fmt: skip
    order = rng.permutation(n)
    cells = []
    for (init, f), a in acc.items():
        for seed in (0, 1):
            pred = 1 - y
            right = order[: int(a * n)]  # nested: a higher accuracy is right on a superset of images
            pred[right] = y[right]
            path = _write(tmp_path / f"{init}-{f}-{seed}.csv", y, pred)
            cells.append({"init": init, "mode": "linear", "fraction": f, "seed": seed, "status": "finished",
                          "predictions": {"test": path}})  # fmt: skip
    res = compare_grid({"cells": cells}, "test")
    assert len(res["comparisons"]) == 3 and all(
        c["a"] == "ssl" and c["b"] == "random" for c in res["comparisons"]
    )
    first = res["comparisons"][0]
    assert first["fraction"] == 0.01 and first["accuracy"]["diff"] == pytest.approx(0.05, abs=1e-3)
    assert first["accuracy"]["p_holm"] >= first["accuracy"]["p"]
    (saved,) = [s for s in res["labels_saved"] if s["a"] == "ssl"]
    # ssl at 1% (0.60) < random at 10% (0.70); ssl at 10% (0.80) >= random at 100% (0.78): 10x fewer labels
    assert (saved["fraction_a"], saved["fraction_b"], saved["factor"]) == (0.1, 1.0, 10.0)
    assert saved["accuracy"]["diff"] == pytest.approx(0.02, abs=1e-3)
    assert not [s for s in res["labels_saved"] if s["a"] == "random"]


def test_kmeans_nmi_and_ari_with_intervals() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    clustered = l2_normalize(rng.normal(size=(400, 16)) + 6 * np.eye(16)[y])
    good = kmeans_agreement(clustered, y, 4, n_boot=300)
    noise = kmeans_agreement(l2_normalize(rng.normal(size=(400, 16))), y, 4, n_boot=300)
    assert good["nmi"] > 0.9 and good["ari"] > 0.9 and noise["nmi"] < 0.1 and noise["ari"] < 0.1
    for r in (good, noise):
        for key in ("nmi", "ari"):
            lo, hi = r[f"{key}_ci"]
            assert lo <= r[key] <= hi
    assert noise["nmi_ci"][1] > noise["nmi_ci"][0]  # the bootstrap varies the score


def test_report_carries_paired_comparisons(synth_root: Path, make_fake_pretrain, tmp_path: Path) -> None:
    from medssl_cli.io import read_json
    from medssl_cli.stages.evaluate import evaluate
    from medssl_cli.stages.finetune import finetune
    from medssl_cli.stages.report import report

    make_fake_pretrain(tmp_path)
    ov = {"finetune.inits": ["ssl", "random"], "finetune.modes": ["linear", "knn"], "finetune.seeds": [0, 1],
          "finetune.fractions": [0.5, 1.0], "finetune.c_grid": [1.0], "compute.threads": 1}  # fmt: skip
    grid = finetune(ov, runs_root=tmp_path, data_dir=synth_root)
    evaluate({}, from_run=grid.path, runs_root=tmp_path, data_dir=synth_root)
    out = report(runs_root=tmp_path, from_grid=grid.path, name="p")
    (g,) = read_json(out / "summary.json")["grids"]
    comps = g["paired"]["comparisons"]
    assert {(c["mode"], c["fraction"]) for c in comps} == {
        (m, f) for m in ("knn", "linear") for f in (0.5, 1.0)
    }
    assert all(c["a"] == "ssl" and c["b"] == "random" and c["seeds"] == [0, 1] for c in comps)
    assert all(0 <= c["accuracy"]["p"] <= c["accuracy"]["p_holm"] <= 1 for c in comps)
    assert comps[0]["n_groups"] == comps[0]["n_images"] // 1  # one plane: every image its own item
    text = (out / "report.md").read_text()
    assert "## Paired comparisons" in text and "paired bootstrap over test images" in text
