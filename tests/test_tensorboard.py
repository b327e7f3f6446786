"""`medssl pretrain --log tensorboard`: per-epoch scalars that TensorBoard's own reader parses."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from medssl_cli.errors import UserError
from medssl_cli.recipe import Recipe, override
from medssl_cli.stages import pretrain as stage


def _tiny(**extra: object) -> Recipe:
    base = {"data.datasets": ["synthetic_organs_axial"], "data.image_size": 32, "model.projector": [64, 64],
            "pretrain.epochs": 2, "pretrain.batch_size": 8, "pretrain.warmup_epochs": 1,
            "pretrain.rankme_samples": 16, "compute.precision": "fp32", "compute.threads": 1}  # fmt: skip
    return override(Recipe(), {**base, **extra})


def test_event_files_hold_the_history_scalars(synth_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = stage.pretrain(_tiny(**{"pretrain.log": "tensorboard"}), data_dir=synth_root, runs_root=tmp_path)
    events = EventAccumulator(str(run.file("tensorboard")))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"pretrain/loss", "pretrain/on_diag", "pretrain/off_diag", "pretrain/lr", "pretrain/samples_per_s",
            "pretrain/rankme"} <= tags  # fmt: skip
    history = [json.loads(line) for line in run.file("history.jsonl").read_text().splitlines()]
    loss = events.Scalars("pretrain/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history], rel=1e-6)


def test_without_tensorboard_installed_it_is_one_line(synth_root: Path, tmp_path: Path, monkeypatch) -> None:
    real = builtins.__import__

    def no_tensorboard(name, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match=r'pip install -e "\.\[tensorboard\]"'):
        stage.pretrain(_tiny(**{"pretrain.log": "tensorboard"}), data_dir=synth_root, runs_root=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before a run directory exists
