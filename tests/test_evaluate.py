"""`medssl evaluate`: test metrics for every cell of a grid, the leakage guard, the kNN probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from medssl_cli.commands.evaluate import evaluate as evaluate_cmd
from medssl_cli.data.leakage import find_leakage, related
from medssl_cli.errors import UserError
from medssl_cli.io import read_json
from medssl_cli.runs import Run
from medssl_cli.stages.evaluate import evaluate
from medssl_cli.stages.finetune import finetune

AXIAL, CORONAL = "synthetic_organs_axial", "synthetic_organs_coronal"
METRIC_KEYS = {
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auroc",
    "accuracy_ci",
    "ci_method",
    "per_class_recall",
    "confusion",
    "class_names",
}
FAST = {
    "finetune.c_grid": [0.1, 1.0],
    "finetune.fractions": [1.0],
    "finetune.seeds": [0],
    "compute.device": "cpu",
    "compute.threads": 1,
    "finetune.epochs": 1,
    "finetune.batch_size": 16,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_root, make_fake_pretrain):
    runs = tmp_path_factory.mktemp("runs_ev")
    pre = make_fake_pretrain(runs)
    ov = {**FAST, "finetune.inits": ["ssl", "random"], "finetune.modes": ["linear", "full"]}
    grid = finetune(ov, runs_root=runs, data_dir=synth_root)
    return {"runs": runs, "pre": pre, "grid": grid}


def test_evaluate_grid_writes_test_metrics(setup, synth_root) -> None:
    grid: Run = setup["grid"]
    summary = evaluate({}, from_run=grid.path, runs_root=setup["runs"], data_dir=synth_root)
    assert len(summary["cells"]) == 4 and len(summary["groups"]) == 4
    for c in grid.manifest["cells"]:
        cell = grid.path / "cells" / c["name"]
        m = read_json(cell / "metrics.json")
        test = m["test"]
        assert METRIC_KEYS <= set(test) and test["n"] == 22  # 2 test patients x 11 organs
        assert sum(map(sum, test["confusion"])) == test["n"] and len(test["class_names"]) == 11
        assert test["accuracy_ci"][0] <= test["accuracy"] <= test["accuracy_ci"][1]
        assert m["leakage_override"] is False and "val" in m
        assert m["leakage"]["test"]["checked"] is (c["init"] == "ssl")
        assert (cell / "plots" / "confusion_test.png").read_bytes()[:4] == b"\x89PNG"
    top = read_json(grid.file("metrics.json"))
    assert set(top) == {"val", "test"} and top["test"]["groups"][0]["accuracy"]["n"] == 1


def test_val_metrics_match_finetune_and_default_is_newest_grid(setup, synth_root) -> None:
    grid: Run = setup["grid"]
    before = {
        c["name"]: read_json(grid.path / "cells" / c["name"] / "metrics.json")["val"]
        for c in grid.manifest["cells"]
    }
    evaluate({"evaluate.split": "val"}, runs_root=setup["runs"], data_dir=synth_root)  # newest finished grid
    for name, val in before.items():
        again = read_json(grid.path / "cells" / name / "metrics.json")["val"]
        # the same cached features (linear) or saved weights (full) and the same head -> the same predictions
        assert again["confusion"] == val["confusion"], name


def test_evaluate_one_cell_through_the_cli(setup, synth_root) -> None:
    cell = setup["grid"].path / "cells" / "random-linear-f1-s0"
    app = typer.Typer()
    app.command("evaluate")(evaluate_cmd)
    app.command("noop")(lambda: None)
    args = [
        "evaluate",
        "--from",
        str(cell),
        "--split",
        "val",
        "--ci",
        "bootstrap",
        "--data-dir",
        str(synth_root),
        "--runs-root",
        str(setup["runs"]),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_json(cell / "metrics.json")["val"]["ci_method"].startswith("bootstrap")
    bad = CliRunner().invoke(
        app, ["evaluate", "--from", str(setup["pre"].path), "--runs-root", str(setup["runs"])]
    )
    assert isinstance(bad.exception, UserError) and "--probe knn" in bad.exception.line()


def test_leakage_refused_then_overridden(tmp_path, synth_root, make_fake_pretrain) -> None:
    from medssl_cli.data.pool import load_pool

    test_rows = load_pool(synth_root, [CORONAL], ["test"], image_size=32).source_idx.tolist()
    # pretraining also saw the coronal test split: same patients as the axial test split (another plane)
    pre = make_fake_pretrain(tmp_path, extra_seen={CORONAL: {"test": test_rows}})
    grid = finetune(
        {**FAST, "finetune.inits": ["ssl"]}, from_run=pre.path, runs_root=tmp_path, data_dir=synth_root
    )
    cell = grid.path / "cells" / "ssl-linear-f1-s0"
    with pytest.raises(UserError, match=r"Refusing to evaluate .*synthetic_organs_coronal/test") as err:
        evaluate({}, from_run=grid.path, runs_root=tmp_path, data_dir=synth_root)
    assert "\n" not in err.value.line() and "--allow-leakage" in err.value.line()
    assert "test" not in read_json(cell / "metrics.json") and not (cell / "plots").exists()  # nothing written
    evaluate({"evaluate.allow_leakage": True}, from_run=grid.path, runs_root=tmp_path, data_dir=synth_root)
    m = read_json(cell / "metrics.json")
    assert m["leakage_override"] is True and "test" in m
    assert m["leakage"]["test"]["overlaps"][0]["pretrained_on"] == f"{CORONAL}/test"
    assert read_json(grid.file("metrics.json"))["test"]["cells"][0]["leakage_override"] is True
    # the kNN probe is guarded the same way: same images (axial test rows) -> refused, naming the count
    axial_rows = load_pool(synth_root, [AXIAL], ["test"], image_size=32).source_idx.tolist()
    pre2 = make_fake_pretrain(tmp_path, extra_seen={AXIAL: {"test": axial_rows}}, name="leaky")
    with pytest.raises(UserError, match="22 of them evaluated here"):
        evaluate({}, from_run=pre2.path, probe="knn", runs_root=tmp_path, data_dir=synth_root)
    assert not list(tmp_path.glob("evaluate-*"))


def test_leakage_rules(tmp_path) -> None:
    for ds, overlaps in (
        ("a", ["b"]),
        ("b", []),
        ("c", []),
        ("organs_axial", []),
        ("synthetic_organs_axial", []),
    ):
        (tmp_path / ds).mkdir()
        (tmp_path / ds / "info.yaml").write_text(yaml.safe_dump({"id": ds, "subject_overlaps": overlaps}))
    seen = {"a": {"train": [1, 2]}, "b": {"test": [0]}, "c": {"test": [5]}}
    assert find_leakage(seen, {"a": {"val": [3, 4]}}, tmp_path) == []  # train seen, val evaluated: fine
    # rows are image rows of the dataset: a val file that lists train images leaks, whatever its name
    same = find_leakage(seen, {"a": {"val": [2, 3]}}, tmp_path)
    assert [(o["pretrained_on"], o["same_images"]) for o in same] == [("a/train", 1)]
    leaks = find_leakage(seen, {"a": {"test": [3]}}, tmp_path)  # b overlaps a (declared in a's info.yaml)
    assert [o["pretrained_on"] for o in leaks] == ["b/test"] and leaks[0]["same_images"] == 0
    assert [o["pretrained_on"] for o in find_leakage(seen, {"c": {"test": [5, 6]}}, tmp_path)] == ["c/test"]
    assert find_leakage(seen, {"c": {"test": [5, 6]}}, tmp_path)[0]["same_images"] == 1
    assert set(related(tmp_path, "b", ["a", "c"])) == {"a"}  # declared on the other side
    assert related(
        Path(tmp_path), "synthetic_organs_sagittal", ["synthetic_organs_axial", "organs_axial"]
    ) == ["synthetic_organs_axial"]


def test_knn_probe_creates_its_own_run(setup, synth_root) -> None:
    pre: Run = setup["pre"]
    before = sorted(p.relative_to(pre.path) for p in pre.path.rglob("*"))
    out = evaluate(
        {"evaluate.knn_k": 20},
        from_run=pre.path,
        probe="knn",
        runs_root=setup["runs"],
        data_dir=synth_root,
        name="t",
    )
    run = Run(Path(out["run"]))
    assert run.path.name.startswith("evaluate-knn-t-") and run.path.parent == setup["runs"]
    info = run.manifest
    assert (
        info["status"] == "finished" and info["kind"] == "knn" and info["parent"] == str(pre.path.resolve())
    )
    m = read_json(run.file("metrics.json"))
    assert METRIC_KEYS <= set(m["test"]) and m["test"]["n"] == 22 and m["probe"]["k"] == 20
    assert m["leakage_override"] is False and m["leakage"]["test"]["checked"] is True
    assert run.file("plots", "confusion_test.png").exists()
    assert sorted(p.relative_to(pre.path) for p in pre.path.rglob("*")) == before  # parent untouched


def test_moved_runs_root_evaluates_and_writes_where_the_runs_are(
    tmp_path, synth_root, make_fake_pretrain, monkeypatch
) -> None:
    """Runs record their parent by absolute path; a runs root copied elsewhere (cluster -> laptop) still
    finds the parent beside the grid, and a cell's results go into the grid it lies in."""
    import shutil

    runs = tmp_path / "runs"
    pre = make_fake_pretrain(runs)
    grid = finetune({**FAST, "finetune.inits": ["ssl", "random"]}, runs_root=runs, data_dir=synth_root)
    moved = tmp_path / "moved"
    shutil.move(runs, moved)
    assert not pre.path.exists()
    grid2 = moved / grid.path.name
    from medssl_cli.stages import evaluate as ev_stage

    titles: list[str] = []
    real_plot = ev_stage.plot_confusion

    def spy(m, n, p, t):  # noqa: ANN001, ANN202
        titles.append(t)
        return real_plot(m, n, p, t)

    monkeypatch.setattr(ev_stage, "plot_confusion", spy)
    evaluate({}, from_run=grid2 / "cells" / "ssl-linear-f1-s0", runs_root=moved, data_dir=synth_root)
    assert titles and all(t.startswith("SYNTHETIC DATA - ") for t in titles)  # a lifted figure says so
    assert "test" in read_json(grid2 / "metrics.json")  # the moved grid's summary, not the old path's
    assert "test" in read_json(grid2 / "cells" / "ssl-linear-f1-s0" / "metrics.json")
    assert not grid.path.exists()
    evaluate({}, from_run=grid2, runs_root=moved, data_dir=synth_root)  # random cells: the grid's backbone
    assert "test" in read_json(grid2 / "cells" / "random-linear-f1-s0" / "metrics.json")
    again = finetune({}, resume=grid2, runs_root=moved, data_dir=synth_root)  # finds its parent too
    assert again.path == grid2 and again.status == "finished"
