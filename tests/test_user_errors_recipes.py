"""Input checks that must fire before a run directory exists: one line, exit code 2, nothing left behind.

- pretrain recipe values (``stages.pretrain.check_recipe``): checkpoint_every, lr/lr_biases/weight_decay
  (finite), lambd, projector sizes, warmup_epochs, knn_every, chunk_size, and the views;
- ``medssl pretrain --resume RUN`` with options that would change the run's recipe;
- ``medssl evaluate --probe knn --k`` larger than the bank (the k actually used is recorded) or < 1;
- the Ctrl-C message of a finetune grid (no checkpoint, no 'step').
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from cli_helpers import run_cli

from medssl_cli.errors import UserError
from medssl_cli.io import read_json
from medssl_cli.recipe import Recipe, override
from medssl_cli.runtime.preempt import Interrupted
from medssl_cli.stages.pretrain import check_recipe

AXIAL = "synthetic_organs_axial"
TINY = f"""
data: {{datasets: [{AXIAL}], image_size: 32}}
model: {{projector: [64, 64]}}
pretrain: {{epochs: 1, batch_size: 16, lr: 0.001, warmup_epochs: 1, checkpoint_every: 1}}
compute: {{precision: fp32, device: cpu, threads: 1}}
"""


def tiny(**extra: object) -> Recipe:
    base = {
        "data.datasets": [AXIAL],
        "data.image_size": 32,
        "model.projector": [64, 64],
        "pretrain.epochs": 1,
        "pretrain.batch_size": 16,
        "pretrain.lr": 1e-3,
        "pretrain.warmup_epochs": 1,
        "pretrain.checkpoint_every": 1,
    }
    base.update(extra)
    return override(Recipe(), base)


def one_line_error(code: int, text: str) -> str:
    """Exit code 2 and exactly one output line, an error without a traceback; returns the line."""
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    return lines[0]


def test_tiny_recipe_and_defaults_pass() -> None:
    check_recipe(tiny())
    check_recipe(Recipe())
    check_recipe(tiny(**{"pretrain.knn_every": 0, "pretrain.warmup_epochs": 0, "pretrain.chunk_size": 0}))


# 1-3: each bad value is refused by check_recipe with the key named
BAD_VALUES = [
    ("pretrain.checkpoint_every", 0, "checkpoint_every"),
    ("pretrain.checkpoint_every", -1, "checkpoint_every"),
    ("pretrain.lr", float("nan"), "pretrain.lr"),
    ("pretrain.lr", float("inf"), "pretrain.lr"),
    ("pretrain.lr", 0.0, "pretrain.lr"),
    ("pretrain.lr_biases", float("nan"), "pretrain.lr_biases"),
    ("pretrain.lr_biases", -0.1, "pretrain.lr_biases"),
    ("pretrain.weight_decay", float("inf"), "pretrain.weight_decay"),
    ("pretrain.weight_decay", -1e-6, "pretrain.weight_decay"),
    ("pretrain.lambd", -1.0, "pretrain.lambd"),
    ("pretrain.lambd", 0.0, "pretrain.lambd"),
    ("pretrain.lambd", float("nan"), "pretrain.lambd"),
    ("model.projector", [0], "model.projector"),
    ("model.projector", [64, -8], "model.projector"),
    ("model.projector", [], "model.projector"),
    ("pretrain.warmup_epochs", -5, "pretrain.warmup_epochs"),
    ("pretrain.warmup_epochs", float("nan"), "pretrain.warmup_epochs"),
    ("pretrain.knn_every", -1, "knn_every"),
    ("pretrain.chunk_size", -4, "chunk_size"),
    ("views.view1.crop_scale", [1.5, 0.1], "views.view1.crop_scale"),
    ("views.view2.flip_p", 2.0, "views.view2.flip_p"),
    ("views.view1.brightness", float("nan"), "views.view1.brightness"),
]


@pytest.mark.parametrize(("key", "value", "named"), BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_check_recipe_refuses_out_of_range_values(key: str, value: object, named: str) -> None:
    with pytest.raises(UserError) as err:
        check_recipe(tiny(**{key: value}))
    assert named in err.value.line() and "\n" not in err.value.line()


def test_lambd_message_says_it_must_be_positive() -> None:
    with pytest.raises(UserError, match=r"pretrain\.lambd.*> 0"):
        check_recipe(tiny(**{"pretrain.lambd": -1.0}))


def test_knn_monitor_needs_k_at_least_one() -> None:
    check_recipe(tiny(**{"evaluate.knn_k": 0}))  # monitor off: evaluate's own check applies later
    with pytest.raises(UserError, match=r"evaluate\.knn_k"):
        check_recipe(tiny(**{"pretrain.knn_every": 1, "evaluate.knn_k": 0}))


@pytest.mark.parametrize(
    "option",
    [
        ["--checkpoint-every", "0"],
        ["--checkpoint-every", "-1"],
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--knn-every", "-1"],
    ],
    ids=lambda o: " ".join(o),
)
def test_cli_bad_pretrain_option_is_one_line_and_writes_nothing(
    option: list[str], synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    runs = tmp_path / "runs"
    argv = ["pretrain", "--recipe", str(recipe), "--data-dir", str(synth_root), "--runs-root", str(runs)]
    line = one_line_error(*run_cli([*argv, *option], capsys))
    assert option[0] in line
    assert not runs.exists() or not any(runs.iterdir())  # no run directory, so none left 'failed'


# 4: view settings fail before the --run-dir is made; the directory can be reused after the fix
@pytest.mark.parametrize(
    "views",
    ["views: {view1: {crop_scale: [1.5, 0.1]}}", "views: {view2: {flip_p: 2}}"],
    ids=["crop_scale", "flip_p"],
)
def test_bad_views_leave_no_failed_run_dir(
    views: str, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY + views + "\n")
    rd, empty = tmp_path / "x" / "rd", tmp_path / "empty"
    empty.mkdir()
    for target in (rd, empty):
        argv = ["pretrain", "--recipe", str(bad), "--data-dir", str(synth_root), "--run-dir", str(target)]
        line = one_line_error(*run_cli(argv, capsys))
        assert "views.view" in line
    assert not rd.exists()  # never created
    assert list(empty.iterdir()) == []  # an empty --run-dir stays empty: no run.json saying 'failed'


# 5: --resume with options that would change the run's recipe
@pytest.fixture
def interrupted_run(tmp_path: Path, make_fake_pretrain):  # noqa: ANN201 - returns a Run
    run = make_fake_pretrain(tmp_path / "runs", (AXIAL,))
    run.set_status("interrupted")
    return run


def test_resume_with_recipe_options_is_refused(
    interrupted_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = interrupted_run
    before = read_json(run.path / "run.json")
    options = ["--epochs", "1", "--lr", "5", "--datasets", "synthetic_crc"]
    argv = ["pretrain", "--resume", str(run.path), *options]
    line = one_line_error(*run_cli(argv, capsys))
    assert "--resume" in line and "--epochs" in line and "--lr" in line and "--datasets" in line
    assert "pretrain.epochs" in line and "new run" in line
    recipe = tmp_path / "other.yaml"
    recipe.write_text("pretrain: {epochs: 3}\n")
    line = one_line_error(*run_cli(["pretrain", "--resume", str(run.path), "--recipe", str(recipe)], capsys))
    assert "--recipe" in line and "pretrain.epochs" in line
    assert read_json(run.path / "run.json") == before  # the run was not touched


def test_resume_with_the_runs_own_values_is_not_refused(interrupted_run) -> None:
    from medssl_cli.commands.pretrain import _check_resume_options

    own = interrupted_run.recipe()
    _check_resume_options(
        interrupted_run.path,
        None,
        {"pretrain.epochs": own.pretrain.epochs, "data.datasets": own.data.datasets, "pretrain.lr": None},
    )


# 6: kNN k larger than the bank: the k actually used is recorded; k < 1 refused before any run exists
def test_knn_k_is_clamped_to_the_bank_and_recorded(
    synth_root: Path, tmp_path: Path, make_fake_pretrain, capsys: pytest.CaptureFixture[str]
) -> None:
    from medssl_cli.data.pool import load_pool

    runs = tmp_path / "runs"
    pre = make_fake_pretrain(runs, (AXIAL,))
    bank = len(load_pool(synth_root, [AXIAL], ["train"], image_size=32))
    base = ["evaluate", "--probe", "knn", "--from", str(pre.path), "--data-dir", str(synth_root)]
    base += ["--runs-root", str(runs), "--device", "cpu"]
    line = one_line_error(*run_cli([*base, "--k", "0"], capsys))
    assert "--k" in line and ">= 1" in line
    assert not list(runs.glob("evaluate-*"))
    code, text = run_cli([*base, "--k", "100000"], capsys)
    assert code == 0 and "Traceback" not in text
    (out,) = runs.glob("evaluate-knn-*")
    probe = read_json(out / "metrics.json")["probe"]
    assert probe["k"] == bank < 100000 and probe["k_requested"] == 100000
    assert read_json(out / "run.json")["probe"]["k"] == bank


# 7: a stopped finetune grid says what was kept, not "checkpoint written"
def test_interrupted_message_fits_the_stage(tmp_path: Path) -> None:
    from medssl_cli.runtime.preempt import GRID_KEPT

    grid, pre = tmp_path / "grid", tmp_path / "pre"
    text = str(Interrupted(str(grid), signal.SIGINT, 1, GRID_KEPT))
    assert "checkpoint" not in text and "step" not in text
    assert "finished cells are kept" in text and f"Resume: --resume {grid}" in text
    text = str(Interrupted(str(pre), signal.SIGTERM, 7))
    assert text == f"Stopped by SIGTERM at step 7; checkpoint written. Resume: --resume {pre}"


def test_ctrl_c_in_finetune_prints_the_finetune_message(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medssl_cli.runtime.preempt import StopFlag

    def ctrl_c_at_once(self: StopFlag) -> bool:
        self.signum = signal.SIGINT
        return True

    grid = tmp_path / "grid"
    argv = ["finetune", "--init", "random", "--datasets", AXIAL, "--image-size", "32", "--device", "cpu",
            "--data-dir", str(synth_root), "--grid-dir", str(grid)]  # fmt: skip
    monkeypatch.setattr(StopFlag, "__bool__", ctrl_c_at_once)
    code, text = run_cli(argv, capsys)
    monkeypatch.undo()
    flat = " ".join(text.split())
    assert code == 130 and "Traceback" not in text
    assert "finished cells are kept" in flat and "checkpoint written" not in flat
    assert f"Resume: --resume {grid}" in flat
    assert read_json(grid / "run.json")["status"] == "interrupted"
