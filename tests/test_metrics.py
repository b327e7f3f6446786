"""Metrics on hand-made cases: every expected number below was worked out by hand (shown in comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl_cli.readout.metrics import (
    bootstrap_interval,
    compute_metrics,
    confusion,
    macro_auroc,
    plot_confusion,
    summarize,
    wilson_interval,
)

# 6 images, 4 classes; class "d" occurs neither in the labels nor in the predictions.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])
NAMES = ["a", "b", "c", "d"]
# Scores per class (columns a, b, c, d); each one-vs-rest AUROC is counted by hand over (pos, neg) pairs.
SCORES = np.array(
    [
        [0.9, 0.1, 0.0, 0.0],
        [0.8, 0.2, 0.0, 0.0],
        [0.3, 0.7, 0.0, 0.0],
        [0.4, 0.6, 0.0, 0.0],
        [0.2, 0.5, 0.3, 0.0],
        [0.1, 0.3, 0.6, 0.0],
    ]
)


def test_hand_made_confusion_case() -> None:
    m = compute_metrics(Y_TRUE, Y_PRED, SCORES, NAMES)
    # rows = true, columns = predicted
    assert m["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recall a = 2/3, b = 1/2, c = 1/1, d: no true sample -> None (not 0)
    assert m["per_class_recall"] == {"a": pytest.approx(2 / 3), "b": 0.5, "c": 1.0, "d": None}
    # balanced accuracy over the present classes: (2/3 + 1/2 + 1) / 3 = 13/18
    assert m["balanced_accuracy"] == pytest.approx(13 / 18)
    # F1: a: P = 2/2, R = 2/3 -> 4/5; b: P = 1/2, R = 1/2 -> 1/2; c: P = 1/2, R = 1 -> 2/3;
    # d neither occurs nor is predicted -> not counted. macro = (4/5 + 1/2 + 2/3) / 3 = 59/90
    assert m["macro_f1"] == pytest.approx(59 / 90)
    # AUROC a: positives (0.9, 0.8, 0.3) vs negatives (0.4, 0.2, 0.1): 3 + 3 + 2 = 8 of 9 pairs;
    # b: positives (0.6, 0.5) vs (0.1, 0.2, 0.7, 0.3): 3 + 3 = 6 of 8; c: 0.6 above all 5 negatives -> 1;
    # d has no positive -> skipped. macro = (8/9 + 3/4 + 1) / 3 = 95/108
    assert m["auroc"] == pytest.approx(95 / 108)
    assert m["auroc_skipped"] == ["d"]
    assert m["class_names"] == NAMES
    assert m["ci_method"].startswith("wilson")
    lo, hi = m["accuracy_ci"]
    assert lo < 4 / 6 < hi


def test_auroc_all_one_class_is_none() -> None:
    value, skipped = macro_auroc(np.array([1, 1, 1]), np.eye(3)[[0, 1, 2]])
    assert value is None and skipped == [0, 1, 2]


def test_wilson_against_hand_computation() -> None:
    # k = 8, n = 10, z = 1.959964: p = 0.8, z^2 = 3.841459, 1 + z^2/n = 1.3841459
    # centre = (0.8 + 3.841459/20) / 1.3841459 = 0.99207295 / 1.3841459 = 0.716741
    # half = 1.959964 / 1.3841459 * sqrt(0.16/10 + 3.841459/400) = 1.416010 * 0.160011 = 0.226577
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.716741 - 0.226577, abs=2e-5)
    assert hi == pytest.approx(0.716741 + 0.226577, abs=2e-5)
    # the standard table values for 8/10: (0.4902, 0.9433)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    # edge cases stay inside [0, 1]; 0 successes -> lower bound 0, all successes -> upper bound 1
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_is_seeded_and_close_to_wilson() -> None:
    correct = np.array([1] * 300 + [0] * 100)
    a = bootstrap_interval(correct, seed=3)
    assert a == bootstrap_interval(correct, seed=3)
    w = wilson_interval(300, 400)
    assert a[0] < 0.75 < a[1]
    assert abs(a[0] - w[0]) < 0.01 and abs(a[1] - w[1]) < 0.01
    m = compute_metrics(correct.astype(int), np.ones(400, dtype=int), None, ["x", "y"], ci="bootstrap")
    assert m["ci_method"].startswith("bootstrap") and m["auroc"] is None


def test_confusion_and_summarize() -> None:
    assert confusion(np.array([1, 1]), np.array([0, 1]), 2).tolist() == [[0, 0], [1, 1]]
    s = summarize([0.5, 0.7, None])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6)
    assert s["std"] == pytest.approx(math.sqrt(0.02))  # sample std of (0.5, 0.7): sqrt(0.02 / 1)
    assert summarize([None]) == {"mean": None, "std": None, "n": 0}
    assert summarize([0.5, None]) == {"mean": 0.5, "std": None, "n": 1}  # one seed: no spread measured


def test_confusion_plot_is_png(tmp_path) -> None:
    m = compute_metrics(Y_TRUE, Y_PRED, SCORES, NAMES)
    path = tmp_path / "plots" / "confusion_test.png"
    plot_confusion(m["confusion"], ["heart", "left lung", "right lung", "liver"], path, "demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
