"""RankMe, the label-free collapse monitor: the formula, the warning, and what a pretrain run records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from medssl_cli.barlowtwins.rankme import collapse_warning, feature_stats, rankme, sample_rows
from medssl_cli.recipe import Recipe, override


def test_rankme_counts_equal_directions() -> None:
    q, _ = torch.linalg.qr(torch.randn(200, 64, generator=torch.Generator().manual_seed(0)))
    for k in (1, 5, 32):
        assert math.isclose(rankme(q[:, :k] * 3.0), k, rel_tol=1e-4)
    # unequal spectrum: strictly between 1 and the number of directions
    spread = q[:, :8] * torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1])
    assert 1 < rankme(spread) < 8


def test_rankme_of_a_collapsed_embedding_is_near_one() -> None:
    z = torch.randn(100, 1) @ torch.randn(1, 512) + 1e-6 * torch.randn(100, 512)
    assert rankme(z) < 1.1
    stats = feature_stats(torch.cat([torch.randn(50, 4), torch.zeros(50, 2)], dim=1))
    assert stats["dead_dims"] == 2 and stats["feature_std_min"] == 0.0 and 0 < stats["rankme"] <= 4


def test_collapse_warning_only_after_a_fall() -> None:
    history = [{"epoch": 0, "rankme": 80.0}, {"epoch": 1, "rankme": 120.0}]
    assert collapse_warning(history, 100.0, 2) is None
    line = collapse_warning(history, 20.0, 2)
    assert line is not None and "120.0 at epoch 1" in line and "\n" not in line
    assert collapse_warning([], 1.0, 1) is None  # no baseline, no claim
    assert "NaN" in (collapse_warning(history, float("nan"), 2) or "")


def test_sample_rows_fixed_and_spread() -> None:
    rows = sample_rows(10_000, 1024)
    assert len(rows) == 1024 and rows[0] == 0 and rows[-1] == 9_999
    assert torch.equal(rows, sample_rows(10_000, 1024))
    assert len(sample_rows(50, 1024)) == 50


def test_pretrain_records_rankme_every_epoch(synth_root: Path, tmp_path: Path) -> None:
    from medssl_cli.stages.pretrain import pretrain

    r = override(
        Recipe(),
        {
            "data.datasets": ["synthetic_organs_axial"],
            "data.image_size": 16,
            "pretrain.epochs": 2,
            "pretrain.batch_size": 16,
            "model.projector": [32, 32],
            "compute.precision": "fp32",
            "pretrain.rankme_samples": 40,
        },
    )
    run = pretrain(r, data_dir=synth_root, runs_root=tmp_path)
    history = [json.loads(line) for line in run.file("history.jsonl").read_text().splitlines()]
    assert all({"rankme", "feature_std_mean", "feature_std_min", "dead_dims"} <= set(h) for h in history)
    assert all(1 <= h["rankme"] <= 40 for h in history)
    m = run.manifest["metrics"]
    assert (
        m["rankme"] == history[-1]["rankme"]
        and 1 <= m["rankme_init"] <= 40
        and m["rankme_collapsed"] in (True, False)
    )
    off = pretrain(override(r, {"pretrain.rankme_every": 0}), data_dir=synth_root, runs_root=tmp_path)
    assert "rankme" not in off.file("history.jsonl").read_text()
