"""The honest low-label protocol: a validation budget tied to the labelled count, per-image predictions,
kNN cells for every init, and the report naming the budget (with the optimism gap)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medssl_cli.data.fractions import stratified_subset, val_budget, val_order
from medssl_cli.errors import UserError
from medssl_cli.io import read_json
from medssl_cli.stages.evaluate import evaluate
from medssl_cli.stages.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# The budget itself


def _labels(n: int = 400, k: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=np.linspace(1, 3, k) / np.linspace(1, 3, k).sum())
    y[:k] = np.arange(k)
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matched_never_exceeds_the_labelled_count_and_keeps_every_class(seed: int) -> None:
    train, val = _labels(900, seed=seed), _labels(300, seed=seed + 10)
    previous: set[int] = set()
    for fraction in (0.005, 0.01, 0.05, 0.1, 0.5, 1.0):  # nested across fractions, like the train subsets
        sub = stratified_subset(train, fraction, seed, 7)
        vb = val_budget(val, "matched", len(sub.indices), seed, 7)
        assert vb.indices is not None and vb.n == len(vb.indices) == min(len(sub.indices), len(val))
        assert min(vb.per_class.values()) >= 1 and len(set(vb.indices.tolist())) == vb.n
        assert previous <= set(vb.indices.tolist())
        previous = set(vb.indices.tolist())
        counts = np.bincount(val[vb.indices], minlength=7)  # stratified: close to the val proportions
        expect = vb.n * np.bincount(val, minlength=7) / len(val)
        assert np.all(np.abs(counts - expect) <= 1.5) or vb.n <= 7
    other = val_budget(val, "matched", 50, seed + 1, 7).indices
    assert not np.array_equal(other, val_budget(val, "matched", 50, seed, 7).indices)  # drawn per seed


def test_full_and_numeric_budgets_and_bad_ones() -> None:
    val = _labels(120)
    full = val_budget(val, "full", 10, 0, 7)
    assert full.indices is None and full.n == 120 and full.optimistic and full.enough
    assert val_budget(val, 30, 10, 0, 7).n == 30 and val_budget(val, "30", 10, 0, 7).n == 30
    assert val_budget(val, 10_000, 10, 0, 7).n == 120  # at most the whole split
    with pytest.raises(UserError, match="cannot hold one image of each of the 7 classes"):
        val_budget(val, 5, 10, 0, 7)
    with pytest.raises(UserError, match="'half' is not 'matched', 'full' or a number"):
        val_budget(val, "half", 10, 0, 7)
    assert sorted(val_order(val, 3, 7).tolist()) == list(range(120))


# --------------------------------------------------------------------------------------------
# Cells on real digits (enough val to choose on), random init: no pretraining needed


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medssl_cli.data.real import write_real

    root = tmp_path_factory.mktemp("digits")
    write_real(root, "digits", size=16)
    return root


@pytest.fixture(scope="module")
def grids(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs_vb")
    ov = {
        "data.datasets": ["real_digits"], "data.image_size": 16, "finetune.inits": ["random"],
        "finetune.modes": ["linear", "knn"], "finetune.fractions": [0.01, 0.05, 1.0],
        "finetune.seeds": [0, 1], "finetune.c_grid": [0.01, 1.0, 100.0], "compute.device": "cpu",
        "compute.threads": 1,
    }  # fmt: skip
    out = {}
    for budget in ("matched", "full"):
        grid = finetune(
            {**ov, "finetune.val_budget": budget}, runs_root=runs, data_dir=digits_root, name=budget
        )
        evaluate({}, from_run=grid.path, runs_root=runs, data_dir=digits_root)
        out[budget] = grid.path
    out["runs"] = runs
    return out


def _cells(grid: Path) -> dict[str, dict]:
    return {p.name: read_json(p / "metrics.json") for p in sorted((grid / "cells").iterdir())}


def test_cells_record_the_budget_and_how_they_chose(grids: dict[str, Path]) -> None:
    matched, full = _cells(grids["matched"]), _cells(grids["full"])
    for m in matched.values():
        vb, n_train = m["cell"]["val_budget"], m["cell"]["n_train"]
        assert vb["budget"] == "matched" and not vb["optimistic"]
        assert vb["n_val"] <= n_train and min(vb["per_class"].values()) >= 1
        assert m["val"]["n"] == vb["n_val"]  # val metrics on the images the cell was allowed to see
    linear = {n: m["cell"]["val_budget"]["selection"] for n, m in matched.items() if "-linear-" in n}
    # 1%: one labelled digit per class -> nothing can rank C; 5%: enough val; 100%: enough val
    assert linear["random-linear-f0.01-s0"]["method"] == "fixed"
    assert (
        linear["random-linear-f0.05-s0"]["method"] == "val"
        and linear["random-linear-f1-s0"]["method"] == "val"
    )
    assert all(
        m["cell"]["val_budget"]["selection"]["method"] == "none" for n, m in matched.items() if "-knn-" in n
    )
    for m in full.values():
        assert m["cell"]["val_budget"]["budget"] == "full" and m["cell"]["val_budget"]["optimistic"]
        assert (
            m["val"]["n"] == m["cell"]["val_budget"]["n_val"] > m["cell"]["n_train"]
            or "f1-" in m["cell"]["name"]
        )


def test_cross_validation_chooses_c_when_val_is_too_small(digits_root: Path, tmp_path: Path) -> None:
    ov = {
        "data.datasets": ["real_digits"], "data.image_size": 16, "finetune.inits": ["random"],
        "finetune.fractions": [0.02], "finetune.seeds": [0], "finetune.c_grid": [0.01, 1.0],
        "finetune.val_budget": 10, "compute.device": "cpu", "compute.threads": 1,
    }  # fmt: skip
    grid = finetune(ov, runs_root=tmp_path, data_dir=digits_root)
    (m,) = _cells(grid.path).values()
    sel = m["cell"]["val_budget"]["selection"]
    assert m["cell"]["val_budget"]["n_val"] == 10 and sel["method"] == "cv" and sel["folds"] == 2
    assert {r["C"] for r in sel["cv"]} == {0.01, 1.0} and sel["C"] in (0.01, 1.0)


def test_predictions_file_round_trips_and_matches_the_metric(grids: dict[str, Path]) -> None:
    for name, m in _cells(grids["matched"]).items():
        rec = m["test"]["predictions"]
        path = grids["matched"] / "cells" / name / rec["file"]
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert rec["version"] == 1 and len(rows) == rec["rows"] == m["test"]["n"]
        assert list(rows[0]) == rec["columns"][: len(rows[0])] and rows[0]["dataset"] == "real_digits"
        acc = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
        assert acc == pytest.approx(m["test"]["accuracy"])
        probs = np.array([[float(r[c]) for c in rec["columns"][6:]] for r in rows])
        assert np.allclose(probs.sum(1), 1, atol=1e-4)
        assert [int(r["index"]) for r in rows] == list(range(len(rows)))


def test_knn_cells_exist_for_every_init(synth_root: Path, make_fake_pretrain, tmp_path: Path) -> None:
    make_fake_pretrain(tmp_path)
    ov = {
        "finetune.inits": ["ssl", "random"], "finetune.modes": ["knn"], "finetune.fractions": [0.5, 1.0],
        "finetune.seeds": [0], "compute.device": "cpu", "compute.threads": 1,
    }  # fmt: skip
    grid = finetune(ov, runs_root=tmp_path, data_dir=synth_root)
    evaluate({}, from_run=grid.path, runs_root=tmp_path, data_dir=synth_root)
    cells = _cells(grid.path)
    assert sorted(cells) == ["random-knn-f0.5-s0", "random-knn-f1-s0", "ssl-knn-f0.5-s0", "ssl-knn-f1-s0"]
    for name, m in cells.items():
        assert m["cell"]["knn"]["k"] <= m["cell"]["n_train"] and "test" in m
        rows = list(csv.DictReader(open(grid.path / "cells" / name / "predictions_test.csv")))
        assert rows[0]["item"].startswith("synthetic_organs_/")  # the organ planes' shared item id


def test_report_names_the_budget_and_shows_the_optimism_gap(grids: dict[str, Path]) -> None:
    from medssl_cli.stages.report import report

    out = report(runs_root=grids["runs"], name="vb")
    text = (out / "report.md").read_text()
    assert "Validation budget: matched" in text and "Validation budget: full (OPTIMISTIC" in text
    assert "Optimism gap: real_digits" in text and "| Random init | knn | 1% |" in text
    assert "| Random init | linear | 5% |" in text.split("Optimism gap")[1]


def test_cross_validation_chooses_the_sgd_heads_epochs_when_val_is_too_small(
    digits_root: Path, tmp_path
) -> None:
    ov = {
        "data.datasets": ["real_digits"], "data.image_size": 16, "finetune.inits": ["random"],
        "finetune.fractions": [0.02], "finetune.seeds": [0], "finetune.head": "sgd", "finetune.epochs": 6,
        "finetune.patience": 2, "finetune.val_budget": 10, "compute.device": "cpu", "compute.threads": 1,
    }  # fmt: skip
    grid = finetune(ov, runs_root=tmp_path, data_dir=digits_root)
    (m,) = _cells(grid.path).values()
    sel = m["cell"]["val_budget"]["selection"]
    assert sel["method"] == "cv" and sel["folds"] == 2 and len(sel["fold_best_epochs"]) == 2
    assert 1 <= sel["epochs"] <= 6 and m["cell"]["chosen"]["stopped_epoch"] == sel["epochs"]
    full = finetune({**ov, "finetune.val_budget": "full"}, runs_root=tmp_path, data_dir=digits_root, name="f")
    assert next(iter(_cells(full.path).values()))["cell"]["val_budget"]["selection"]["method"] == "val"
