"""Pretraining stage: runs end to end, determinism, resume equality, NaN stop, protocol guards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from medssl_cli.errors import TrainingDiverged, UserError
from medssl_cli.recipe import Recipe, override
from medssl_cli.runs import Run
from medssl_cli.runtime import checkpoint
from medssl_cli.runtime.preempt import Interrupted, StopFlag
from medssl_cli.stages import pretrain as stage

PLANES = ["synthetic_organs_axial", "synthetic_organs_coronal", "synthetic_organs_sagittal"]


def tiny(**extra: object) -> Recipe:
    base = {
        "data.datasets": PLANES,
        "data.image_size": 32,
        "model.projector": [64, 64],
        "pretrain.epochs": 2,
        "pretrain.batch_size": 32,
        "pretrain.lr": 1e-3,
        "pretrain.warmup_epochs": 1,
        "pretrain.checkpoint_every": 1,
        "compute.precision": "fp32",
    }
    base.update(extra)
    return override(Recipe(), base)


def weights(run: Run) -> dict[str, torch.Tensor]:
    return load_file(str(run.file("weights", "backbone.safetensors")))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_writes_a_complete_run(synth_root: Path, tmp_path: Path) -> None:
    r = tiny(**{"pretrain.knn_every": 2, "views.view2.flip_p": 0.5})
    run = stage.pretrain(r, data_dir=synth_root, runs_root=tmp_path)
    info = run.manifest
    assert info["status"] == "finished" and info["stage"] == "pretrain"
    assert info["data"]["splits"] == ["train"] and info["data"]["fingerprint"]
    seen = json.loads(run.file("data_seen.json").read_text())
    assert set(seen) == set(PLANES) and all(set(s) == {"train"} for s in seen.values())
    history = [json.loads(line) for line in run.file("history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"loss", "on_diag", "off_diag", "lr", "samples_per_s", "time_s"} <= set(history[0])
    assert "knn_val_accuracy" not in history[0] and 0.0 <= history[1]["knn_val_accuracy"] <= 1.0
    assert run.manifest["metrics"]["knn_val_accuracy"] == history[1]["knn_val_accuracy"]
    from safetensors import safe_open

    with safe_open(str(run.file("weights", "backbone.safetensors")), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet18" and meta["in_channels"] == "1" and meta["image_size"] == "32"
    assert meta["recipe_hash"] == run.recipe().hash()
    assert run.file("plots", "loss.png").stat().st_size > 1000
    log = run.file("log.txt").read_text()
    assert "epoch 2/2" in log
    # the domain (abdominal CT) resolves the geometry to none; an explicit flip_p wins, and since the
    # organ classes name sides the run says so, with the fix; recipe.yaml keeps the resolved values
    views = run.recipe().views
    v1, v2 = views.view1, views.view2
    assert (v1.flip_p, v1.vflip_p, v1.rot90_p, v2.flip_p) == (0, 0, 0, 0.5)
    assert "View geometry 'none'" in log and "Views: view1 [crop 0.08-1, flip 0, vflip 0, rot90 0" in log
    assert "Views flip left-right (p = 0.5)" in log and "views.view2.flip_p to 0" in log


def test_same_seed_same_weights_and_resume_equals_uninterrupted(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = tiny(**{"pretrain.epochs": 3})
    a = stage.pretrain(r, data_dir=synth_root, runs_root=tmp_path / "a")
    # compute.compile wraps the training network and the views in torch.compile (here a recording
    # stand-in: compiling for real takes tens of seconds on this CPU); the weights are those of the plain
    # run. (Compiled views for real: test_feed.)
    compiled: list[Any] = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    b = stage.pretrain(override(r, {"compute.compile": True}), data_dir=synth_root, runs_root=tmp_path / "b")
    monkeypatch.undo()
    assert len(compiled) == 2 and isinstance(compiled[1], torch.nn.Module) and callable(compiled[0])
    assert same(weights(a), weights(b))

    # Interrupt in the middle of epoch 2 (a mid-epoch checkpoint), then resume.
    calls = {"n": 0}

    def fake_bool(self: StopFlag) -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            self.signum = 10
            return True
        return False

    monkeypatch.setattr(StopFlag, "__bool__", fake_bool)
    with pytest.raises(Interrupted):
        stage.pretrain(r, data_dir=synth_root, runs_root=tmp_path / "c")
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "c").iterdir()
    c = Run(run_dir)
    assert c.status == "interrupted" and checkpoint.latest(c.file("checkpoint")) is not None
    stage.pretrain(r, resume=run_dir)
    info = Run(run_dir).manifest
    assert info["status"] == "finished" and "stop_step" not in info  # the stop moved to "stops"
    assert [s["status"] for s in info["stops"]] == ["interrupted"] and "stop_step" in info["stops"][0]
    assert same(weights(a), weights(c))
    ha = [json.loads(x) for x in a.file("history.jsonl").read_text().splitlines()]
    hc = [json.loads(x) for x in c.file("history.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hc]


def test_checkpoint_restores_optimizer_state_in_the_parameters_layout(tmp_path: Path) -> None:
    # channels_last convs (the CUDA default) with contiguous checkpoint tensors: fused CUDA Adam refuses
    # state whose strides differ from the parameter's, so a resumed GPU run failed at its first step.
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
        net = net.to(memory_format=torch.channels_last)
        return net, torch.optim.Adam(net.parameters(), lr=1e-3)

    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    net, opt = build()
    net(x).sum().backward()
    opt.step()
    checkpoint.save(tmp_path, 1, net, opt, {})
    net2, opt2 = build()
    checkpoint.load(checkpoint.latest(tmp_path), net2, opt2, total_steps=1)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[q][key].stride() == q.stride()
            assert torch.equal(opt2.state[q][key], opt.state[p][key])


def test_nan_loss_stops_with_failed_status_and_keeps_checkpoint(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medssl_cli import methods  # the objective the training loop calls (methods.objective)

    real = methods.barlow_twins_loss
    calls = {"n": 0}

    def flaky(z1, z2, lambd, world_size):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss, on, off = real(z1, z2, lambd, world_size)
        return (loss * float("nan"), on, off) if calls["n"] > 3 else (loss, on, off)

    monkeypatch.setattr(methods, "barlow_twins_loss", flaky)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d+.*Lower --lr"):
        stage.pretrain(tiny(), data_dir=synth_root, runs_root=tmp_path)
    (run_dir,) = tmp_path.iterdir()
    run = Run(run_dir)
    assert run.status == "failed"
    latest = checkpoint.latest(run.file("checkpoint"))
    assert latest is not None and json.loads(latest.read_text())["step"] == 3  # end of epoch 1


def test_test_split_is_refused(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="leak test images"):
        stage.pretrain(tiny(**{"data.splits": ["train", "test"]}), data_dir=synth_root, runs_root=tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_batch_larger_than_data_is_refused(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="larger than the .* pretraining images"):
        stage.pretrain(tiny(**{"pretrain.batch_size": 4096}), data_dir=synth_root, runs_root=tmp_path)


def test_real_ids_with_aliases_start(real_ids_root: Path, tmp_path: Path) -> None:
    """`medssl pretrain --datasets axial,coronal,sagittal` on MIMeta-format organ data."""
    from medssl_cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "pretrain",
                "--datasets",
                "axial,coronal,sagittal",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--image-size",
                "32",
                "--data-dir",
                str(real_ids_root),
                "--runs-root",
                str(tmp_path),
                "--precision",
                "fp32",
            ]
        )
    assert exc.value.code == 0
    (run_dir,) = tmp_path.iterdir()
    assert Run(run_dir).manifest["data"]["datasets"] == ["organs_axial", "organs_coronal", "organs_sagittal"]


def test_chunked_pretraining_runs_and_bad_chunk_is_refused(synth_root: Path, tmp_path: Path) -> None:
    run = stage.pretrain(
        tiny(**{"pretrain.chunk_size": 16, "pretrain.epochs": 1}),
        data_dir=synth_root,
        runs_root=tmp_path / "a",
    )
    history = [json.loads(line) for line in run.file("history.jsonl").read_text().splitlines()]
    assert run.status == "finished" and history[0]["loss"] == history[0]["loss"]  # finite, not NaN
    with pytest.raises(UserError, match="chunk_size must be 0"):
        stage.pretrain(tiny(**{"pretrain.chunk_size": 1}), data_dir=synth_root, runs_root=tmp_path / "b")


def test_compile_without_a_cpp_compiler_is_one_clear_error(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def none_found() -> str:
        raise InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    r = override(tiny(), {"compute.compile": True, "compute.device": "cpu"})
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler") as e:
        stage.pretrain(r, data_dir=synth_root, runs_root=tmp_path)
    assert "without --compile" in e.value.hint
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run directory was made


def test_knn_monitor_needs_one_label_space_before_training(synth_root: Path, tmp_path: Path) -> None:
    """Pretraining pools any datasets (no labels); the kNN monitor cannot: refused before any epoch."""
    mixed = {"data.datasets": ["synthetic_crc", "synthetic_organs_axial"], "data.channels": 3}
    with pytest.raises(UserError, match="kNN monitor .* --knn-every 0"):
        stage.pretrain(tiny(**mixed, **{"pretrain.knn_every": 1}), data_dir=synth_root, runs_root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_stop_at_an_epoch_end_keeps_the_history_exact(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop during an epoch's last step (the end of epoch 1; the last step of the run) still records
    that epoch's row, and the resumed run's history equals the uninterrupted one (3 steps per epoch)."""
    r = tiny(**{"pretrain.epochs": 3})
    a = stage.pretrain(r, data_dir=synth_root, runs_root=tmp_path / "a")
    rows_a = [json.loads(x) for x in a.file("history.jsonl").read_text().splitlines()]
    for stop_at in (3, 9):

        def fake_bool(self: StopFlag, at: int = stop_at, calls: dict[str, int] = {"n": 0}) -> bool:  # noqa: B006
            calls["n"] += 1  # one call per step (one process on the CPU checks every step)
            if calls["n"] == at:
                self.signum = 10
            return calls["n"] == at

        monkeypatch.setattr(StopFlag, "__bool__", fake_bool)
        with pytest.raises(Interrupted):
            stage.pretrain(r, data_dir=synth_root, runs_root=tmp_path / f"s{stop_at}")
        monkeypatch.undo()
        (run_dir,) = (tmp_path / f"s{stop_at}").iterdir()
        c = stage.pretrain(r, resume=run_dir)
        rows_c = [json.loads(x) for x in c.file("history.jsonl").read_text().splitlines()]
        assert [(h["epoch"], h["loss"]) for h in rows_c] == [(h["epoch"], h["loss"]) for h in rows_a], stop_at
        assert c.manifest["metrics"]["final_loss"] == a.manifest["metrics"]["final_loss"]


def test_knn_monitor_reuses_the_pool_and_equals_a_direct_knn(synth_root: Path) -> None:
    """The monitor's bank is the pretraining pool's images (no second in-RAM copy of the train split)
    and its accuracy is a plain kNN train -> val on in-RAM labelled splits."""
    from medssl_cli.data.pool import load_pool
    from medssl_cli.models import build_backbone
    from medssl_cli.readout.features import extract
    from medssl_cli.readout.probes import knn_predict
    from medssl_cli.stages.pretrain.records import _knn_monitor, _labelled_split

    pool = load_pool(synth_root, PLANES, ["train"], image_size=32, supervised=False)
    torch.manual_seed(0)
    net = build_backbone(1, "replicate").eval()
    r = tiny(**{"pretrain.knn_every": 1})
    got = _knn_monitor(r, pool, net, torch.device("cpu"), False)
    key = (pool.root, tuple(pool.dataset_ids), r.data.task, r.data.image_size, r.data.channels)
    assert not _labelled_split(*key, "train").images.in_ram  # the labels' pool: memory-mapped
    tr, va = (load_pool(synth_root, PLANES, [s], image_size=32) for s in ("train", "val"))
    norm, cpu = ((0.5,), (0.5,)), torch.device("cpu")
    f_tr, f_va = (extract(net, p.images, norm, device=cpu, bf16=False, show_progress=False) for p in (tr, va))
    pred = knn_predict(f_tr, torch.as_tensor(tr.labels), f_va, k=20, num_classes=tr.num_classes)
    assert got == float((pred == torch.as_tensor(va.labels)).float().mean())
