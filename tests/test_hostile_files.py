"""Hostile files written by medssl itself and then damaged or swapped: weights, checkpoints, run files.

Each case must end in one UserError naming the file (or, for the report, an entry under "Missing or
failed"), never a traceback, and never a silently wrong result (a checkpoint whose step lies beyond
the end must not mark a run finished without training).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medssl_cli import backbones, checkpoint
from medssl_cli.errors import UserError
from medssl_cli.io import read_json, write_json
from medssl_cli.models import load_weights, save_weights
from medssl_cli.preempt import Interrupted, StopFlag
from medssl_cli.recipe import Recipe, override
from medssl_cli.runs import Run
from medssl_cli.stages import pretrain as stage

# --------------------------------------------------------------------------------------------
# Weights files: metadata that does not parse, NaN values


def _rewrite(path: Path, meta_changes: dict[str, str | None], nan: bool = False) -> None:
    state, meta = load_weights(path)
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    if nan:
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_weights(path, state, meta)


@pytest.mark.parametrize(
    "changes",
    [
        {"in_channels": "one"},
        {"in_channels": "7"},
        {"gray_mode": "sideways"},
        {"norm_mean": "not json"},
        {"norm_mean": "[0.5, 0.5]"},  # two values for one channel
        {"norm_std": "[0]"},
        {"norm_std": '["a"]'},
        {"norm_mean": "[NaN]"},
        {"datasets": "{"},
        {"datasets": "[1, 2]"},
        {"image_size": "big"},
        {"image_size": "-3"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_weights_with_unparsable_metadata_are_one_line(make_fake_pretrain, tmp_path: Path, changes) -> None:
    run = make_fake_pretrain(tmp_path, name="meta")
    path = run.file("weights", "backbone.safetensors")
    backbones.from_pretrain_run(run, 1)  # intact: loads
    _rewrite(path, changes)
    with pytest.raises(UserError, match="unreadable metadata") as err:
        backbones.from_pretrain_run(run, 1)
    assert str(path) in str(err.value) and next(iter(changes)) in str(err.value)


def test_weights_with_nan_values_are_refused(make_fake_pretrain, tmp_path: Path) -> None:
    run = make_fake_pretrain(tmp_path, name="nan")
    path = run.file("weights", "backbone.safetensors")
    _rewrite(path, {}, nan=True)
    with pytest.raises(UserError, match="NaN or infinite values in 1 tensor"):
        backbones.from_pretrain_run(run, 1)
    # a fine-tuned copy saved by medssl (from_file) is read through the same checks
    loaded = make_fake_pretrain(tmp_path, name="copy")
    b = backbones.from_pretrain_run(loaded, 1)
    saved = tmp_path / "ft.safetensors"
    save_weights(saved, b.module, {**b.metadata(), "in_channels": "1", "arch": "resnet18",
                                   "conv1_channels": "3", "gray_mode": "replicate"})  # fmt: skip
    assert backbones.from_file(saved, 1).key == b.key
    _rewrite(saved, {"data_channels": "many"})
    with pytest.raises(UserError, match="data_channels"):
        backbones.from_file(saved, 1)


# --------------------------------------------------------------------------------------------
# Checkpoints that pass the hash check but do not belong to this run

PLANES = ["synthetic_organs_axial", "synthetic_organs_coronal", "synthetic_organs_sagittal"]


def _tiny() -> Recipe:
    return override(
        Recipe(),
        {
            "data.datasets": PLANES,
            "data.image_size": 32,
            "model.projector": [64, 64],
            "pretrain.epochs": 2,
            "pretrain.batch_size": 32,
            "pretrain.warmup_epochs": 1,
            "pretrain.checkpoint_every": 1,
            "pretrain.rankme_every": 0,
            "compute.precision": "fp32",
        },
    )


@pytest.fixture(scope="module")
def interrupted(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain run stopped mid-way (status interrupted) with one committed checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    calls = {"n": 0}
    original = StopFlag.__bool__

    def stop_at_5(self: StopFlag) -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            self.signum = 10
            return True
        return False

    StopFlag.__bool__ = stop_at_5  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupted):
            stage.pretrain(_tiny(), data_dir=synth_root, runs_root=root)
    finally:
        StopFlag.__bool__ = original  # type: ignore[method-assign]
    (run_dir,) = root.iterdir()
    return run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _ckpt(run_dir: Path) -> Path:
    latest = checkpoint.latest(run_dir / "checkpoint")
    assert latest is not None
    return latest


def _rehash(json_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite the tensor file and store its hash, so the damage passes the hash check."""
    from medssl_cli.io import write_safetensors

    tpath = json_path.with_suffix(".safetensors")
    write_safetensors(tpath, tensors)
    meta = read_json(json_path)
    meta["sha256"] = hashlib.sha256(tpath.read_bytes()).hexdigest()
    write_json(json_path, meta)


def _edit_json(**changes: object):  # noqa: ANN202
    def edit(json_path: Path) -> None:
        meta = read_json(json_path)
        for k, v in changes.items():
            if v is ...:
                meta.pop(k, None)
            else:
                meta[k] = v
        write_json(json_path, meta)

    return edit


def _drop_key(json_path: Path) -> None:
    t = load_file(str(json_path.with_suffix(".safetensors")))
    del t[next(k for k in t if k.startswith("model/backbone.layer2"))]
    _rehash(json_path, t)


def _reshape(json_path: Path) -> None:
    t = load_file(str(json_path.with_suffix(".safetensors")))
    k = next(k for k in t if k.startswith("model/projector") and k.endswith("weight"))
    t[k] = torch.zeros(3, 3)
    _rehash(json_path, t)


def _drop_acc(json_path: Path) -> None:
    t = load_file(str(json_path.with_suffix(".safetensors")))
    _rehash(json_path, {k: v for k, v in t.items() if k != "extra/acc_loss"})


DAMAGE = {
    "step beyond the end": (_edit_json(step=10_000), "step 10000 outside"),
    "negative step": (_edit_json(step=-1), "step -1 outside"),
    "step not a number": (_edit_json(step="5"), "step '5' outside"),
    "no step": (_edit_json(step=...), "step None outside"),
    "rng not a mapping": (_edit_json(rng=[1, 2]), "field 'rng'"),
    "rng values wrong": (_edit_json(rng={"numpy": ["MT19937", [1], 0, 0, 0.0]}), "RNG state"),
    "acc_time missing": (_edit_json(acc_time=...), "field 'acc_time'"),
    "a model tensor missing": (_drop_key, "missing 1"),
    "a tensor of the wrong shape": (_reshape, "shape mismatches 1"),
    "a running sum missing": (_drop_acc, "counters"),
    "optimizer groups wrong": (_edit_json(optimizer={"param_groups": [], "scalars": {}}), "optimizer state"),
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_checkpoint_that_passes_the_hash_but_not_the_run_is_one_line(
    interrupted: Path, tmp_path: Path, what: str
) -> None:
    run_dir = _copy_run(interrupted, tmp_path / "run")
    damage, message = DAMAGE[what]
    damage(_ckpt(run_dir))
    with pytest.raises(UserError, match="Checkpoint .*step-") as err:
        stage.pretrain(_tiny(), resume=run_dir)
    assert message in str(err.value), str(err.value)
    info = Run(run_dir).manifest
    assert info["status"] != "finished" and not (run_dir / "weights" / "backbone.safetensors").exists()


def test_intact_checkpoint_still_resumes(interrupted: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(interrupted, tmp_path / "run")
    stage.pretrain(_tiny(), resume=run_dir)
    assert Run(run_dir).status == "finished"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
