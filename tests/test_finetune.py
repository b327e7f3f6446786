"""`medssl finetune`: grid outputs, nested subsets, frozen backbone, resume, --cell, ImageNet init, bad input.

All on the tiny 32 px synthetic organs (33 train / 11 val images per plane) with a fake pretrain run
(a seeded random backbone saved the way stages/pretrain.py saves it).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from medssl_cli.commands.finetune import finetune as finetune_cmd
from medssl_cli.commands.finetune import parse_fractions, parse_seeds
from medssl_cli.errors import UserError
from medssl_cli.grids import open_or_create, plan_cells, release, try_cell_lock
from medssl_cli.io import read_json, write_json
from medssl_cli.readout import backbones
from medssl_cli.runs import Run, create_run
from medssl_cli.stages import finetune as ft_stage
from medssl_cli.stages.finetune import finetune

AXIAL = "synthetic_organs_axial"
FAST = {"finetune.c_grid": [0.1, 1.0], "compute.device": "cpu", "compute.threads": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def linear(tmp_path_factory, synth_root, make_fake_pretrain):
    """An ssl linear grid (3 fractions x 2 seeds); records the loaded backbone and the splits loaded."""
    runs = tmp_path_factory.mktemp("runs_ft")
    pre = make_fake_pretrain(runs)
    weights = pre.file("weights", "backbone.safetensors")
    before = _sha(weights)
    loaded, splits = [], []
    from medssl_cli.data import pool as pool_module

    real_load, real_pool = backbones.load, pool_module.load_pool

    def spy_load(*a, **k):
        lb = loaded.append(real_load(*a, **k)) or loaded[-1]
        return lb

    def spy_pool(root, names, split_list, **k):
        splits.extend(split_list)
        return real_pool(root, names, split_list, **k)

    recipe_file = runs / "ft.yaml"
    recipe_file.write_text("finetune:\n  c_grid: [0.1, 1.0]\n  fractions: [0.3]\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "load", spy_load)
        mp.setattr(pool_module, "load_pool", spy_pool)
        overrides = {"finetune.fractions": [0.1, 0.5, 1.0], "finetune.seeds": [0, 1], "compute.device": "cpu"}
        grid = finetune(overrides, recipe_file=recipe_file, runs_root=runs, data_dir=synth_root)
    return {"grid": grid, "pre": pre, "runs": runs, "loaded": loaded, "splits": splits, "weights_sha": before}


def test_linear_grid_outputs(linear) -> None:
    grid: Run = linear["grid"]
    info = grid.manifest
    assert info["stage"] == "finetune" and info["kind"] == "grid" and info["status"] == "finished"
    assert info["parent"] == str(linear["pre"].path.resolve())
    assert [c["name"] for c in info["cells"]] == [
        f"ssl-linear-f{f}-s{s}" for f in ("0.1", "0.5", "1") for s in (0, 1)
    ]
    # precedence: parent data (datasets, 32 px) < recipe file (c_grid, fractions) < CLI (fractions)
    recipe = grid.recipe()
    assert recipe.data.datasets == [AXIAL] and recipe.data.image_size == 32
    assert recipe.finetune.c_grid == [0.1, 1.0] and recipe.finetune.fractions == [0.1, 0.5, 1.0]
    assert "test" not in linear["splits"] and sorted(set(linear["splits"])) == ["train", "val"]
    for c in info["cells"]:
        cell = Run(grid.path / "cells" / c["name"])
        ci = cell.manifest
        assert ci["status"] == "finished" and ci["kind"] == "cell" and ci["init"] == "ssl"
        assert ci["params"] == 512 * 11 + 11 == 5643
        assert min(ci["subset"]["per_class"].values()) >= 1
        head = load_file(str(cell.file("weights", "head.safetensors")))
        assert head["weight"].shape == (11, 512) and head["bias"].shape == (11,)
        m = read_json(cell.file("metrics.json"))
        assert set(m) >= {"cell", "val", "leakage_override"} and "test" not in m
        assert m["val"]["n"] == 11 and len(m["val"]["confusion"]) == 11
        # one line per C fitted on the labelled images: the grid's two when val chose, else the one C
        # chosen by cross-validation (the CV table is in metrics.json) or fixed (one image per class)
        method = m["cell"]["val_budget"]["selection"]["method"]
        fitted = 2 if method == "val" else 1
        assert len(cell.file("history.jsonl").read_text().splitlines()) == fitted, method
    summary = read_json(grid.file("metrics.json"))["val"]
    assert len(summary["cells"]) == 6 and len(summary["groups"]) == 3
    assert "Linear head: 512 x 11 + 11 = 5,643" in grid.file("log.txt").read_text()


def test_subsets_nested_recorded_and_floor_logged(linear, synth_root) -> None:
    from medssl_cli.data.pool import load_pool

    grid: Run = linear["grid"]
    train = load_pool(synth_root, [AXIAL], ["train"], image_size=32)
    for seed in (0, 1):
        sets = []
        for f in ("0.1", "0.5", "1"):
            cell = grid.path / "cells" / f"ssl-linear-f{f}-s{seed}"
            sub = read_json(cell / "subset_indices.json")
            idx = sub["indices"]
            assert len(idx) == len(sub["dataset"]) == len(sub["row"]) == len(sub["label"]) == sub["n"]
            assert set(sub["dataset"]) == {AXIAL}
            assert sub["row"] == train.source_idx[idx].tolist() and sub["label"] == train.labels[idx].tolist()
            sets.append(set(idx))
        assert sets[0] < sets[1] < sets[2] == set(range(len(train)))  # nested, fraction 1 = all
    c01 = Run(grid.path / "cells" / "ssl-linear-f0.1-s0").manifest["subset"]
    assert c01["floor_raised"] and c01["n"] == 11 and c01["requested"] == 3
    assert "floor raised it to 11" in (grid.path / "cells" / "ssl-linear-f0.1-s0" / "log.txt").read_text()
    # different seeds draw different subsets at fraction 0.1
    a = read_json(grid.path / "cells" / "ssl-linear-f0.1-s0" / "subset_indices.json")["indices"]
    b = read_json(grid.path / "cells" / "ssl-linear-f0.1-s1" / "subset_indices.json")["indices"]
    assert a != b


def test_frozen_backbone_bitwise_unchanged(linear) -> None:
    (lb,) = linear["loaded"]  # one backbone load for the whole grid
    assert lb.init == "ssl" and not lb.module.training
    assert backbones.state_hash(lb.module) == lb.key  # hash at load time == hash after all linear fits
    original = load_file(str(linear["pre"].file("weights", "backbone.safetensors")))
    state = lb.module.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert _sha(linear["pre"].file("weights", "backbone.safetensors")) == linear["weights_sha"]
    assert not (linear["pre"].path / "cells").exists()  # nothing written into the parent
    cell = Run(linear["grid"].path / "cells" / "ssl-linear-f1-s0").manifest
    assert cell["backbone"]["state_hash"] == lb.key


# Two random-init linear cells (fractions 0.5 and 1) on the axial plane at 32 px.
TWO_CELLS = {
    **FAST,
    "finetune.inits": ["random"],
    "finetune.fractions": [0.5, 1.0],
    "finetune.seeds": [0],
    "data.datasets": [AXIAL],
    "data.image_size": 32,
}


def test_grid_resume_reruns_only_unfinished_cells(tmp_path, synth_root) -> None:
    runs = tmp_path / "runs"
    ov = TWO_CELLS
    grid = finetune(ov, runs_root=runs, data_dir=synth_root)
    assert grid.manifest["parent"] is None and grid.status == "finished"
    cells = [grid.path / "cells" / c["name"] for c in grid.manifest["cells"]]
    # simulate a kill in the middle of cell 0: its run.json still says running; mark the grid too
    info = read_json(cells[0] / "run.json")
    write_json(cells[0] / "run.json", {**info, "status": "running"})
    (cells[0] / "metrics.json").unlink()
    grid.update(status="interrupted")
    kept = {p.name: p.stat().st_mtime_ns for p in cells[1].iterdir()}
    again = finetune({}, resume=grid.path, data_dir=synth_root)
    assert again.path == grid.path and again.status == "finished"
    assert read_json(cells[0] / "run.json")["status"] == "finished" and (cells[0] / "metrics.json").exists()
    assert read_json(cells[0] / "run.json")["started"] >= info["started"]
    assert {p.name: p.stat().st_mtime_ns for p in cells[1].iterdir()} == kept  # untouched
    assert "finished before, skipped" in grid.file("log.txt").read_text()
    # resuming with other settings is refused
    with pytest.raises(UserError, match="other settings"):
        finetune({"finetune.seeds": [0, 1]}, resume=grid.path, data_dir=synth_root)


def test_cell_selection_shared_grid_dir(tmp_path, synth_root) -> None:
    gdir = tmp_path / "grid"
    gdir.mkdir()
    (gdir / "slurm-0.out").write_text("log of the array job\n")  # a folder made beforehand is adopted
    ov = TWO_CELLS
    with pytest.raises(UserError, match="out of range"):
        finetune(ov, runs_root=tmp_path, grid_dir=gdir, cell=2, data_dir=synth_root)
    assert not (gdir / "run.json").exists()
    g = finetune(ov, runs_root=tmp_path, grid_dir=gdir, cell=1, data_dir=synth_root)
    assert g.path == gdir and (gdir / "slurm-0.out").exists()
    assert sorted(p.name for p in (gdir / "cells").iterdir()) == ["random-linear-f1-s0"]
    assert g.manifest["status"] == "running" and g.manifest["cells_finished"] == 1
    g = finetune(ov, runs_root=tmp_path, grid_dir=gdir, cell=0, data_dir=synth_root)
    assert g.manifest["status"] == "finished" and g.manifest["cells_finished"] == 2


def test_grid_creation_is_race_safe(tmp_path) -> None:
    from medssl_cli.recipe import Recipe

    target = tmp_path / "shared"
    results: list = []

    def worker(i: int) -> None:
        def make(tmp: Path) -> Run:
            return create_run(
                tmp.parent, "finetune", Recipe(), name="grid", extra={"kind": "grid", "maker": i}, path=tmp
            )

        run, created = open_or_create(target, make)
        results.append((run.manifest["maker"], created))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    makers = {m for m, _ in results}
    assert len(results) == 6 and len(makers) == 1 and sum(c for _, c in results) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shared.tmp")]
    # a cell is run by one process at a time: a second lock attempt is refused until the first is released
    cell = plan_cells(Recipe().finetune)[0]
    held = try_cell_lock(target, cell)
    assert held is not None and try_cell_lock(target, cell) is None
    release(held)
    again = try_cell_lock(target, cell)
    assert again is not None
    release(again)


def test_full_mode_trains_backbone(tmp_path, synth_root) -> None:
    ov = {
        **FAST,
        "finetune.inits": ["random"],
        "finetune.modes": ["full"],
        "finetune.fractions": [1.0],
        "finetune.seeds": [0],
        "finetune.epochs": 2,
        "finetune.batch_size": 16,
        "finetune.patience": 5,
        "data.datasets": [AXIAL],
        "data.image_size": 32,
    }
    grid = finetune(ov, runs_root=tmp_path, data_dir=synth_root)
    cell = Run(grid.path / "cells" / "random-full-f1-s0")
    history = [json.loads(line) for line in cell.file("history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all("val_accuracy" in h for h in history)
    tuned = load_file(str(cell.file("weights", "backbone.safetensors")))
    init = load_file(str(grid.file("backbones", "random-seed0.safetensors")))
    assert not torch.equal(tuned["conv1.weight"], init["conv1.weight"])  # the backbone was trained
    info = cell.manifest
    assert info["head"] == "full" and info["chosen"]["epoch"] in (1, 2) and info["params"] > 11_000_000
    assert read_json(cell.file("metrics.json"))["val"]["n"] == 11
    # no parent: the domain (synthetic abdominal CT) sets the views, and they never flip
    assert "View geometry 'none'" in grid.file("log.txt").read_text()
    assert grid.recipe().views.view1.flip_p == 0.0 and grid.recipe().views.view1.rot90_p == 0.0
    assert "Views flip left-right" not in grid.file("log.txt").read_text()


def test_full_mode_flip_warning_when_a_recipe_flips_sided_organs(tmp_path, synth_root) -> None:
    ov = {
        **FAST,
        "finetune.inits": ["random"],
        "finetune.modes": ["full"],
        "finetune.fractions": [1.0],
        "finetune.seeds": [0],
        "finetune.epochs": 1,
        "finetune.batch_size": 16,
        "data.datasets": [AXIAL],
        "data.image_size": 32,
        "views.view1.flip_p": 0.5,
    }
    grid = finetune(ov, runs_root=tmp_path, data_dir=synth_root)
    assert "Full fine-tuning: Views flip left-right (p = 0.5)" in grid.file("log.txt").read_text()


@pytest.mark.parametrize("bs", [2, 3, 16, 64])
def test_full_ft_batches_hold_every_image_once(bs) -> None:
    from medssl_cli.stages.finetune.full_ft import _batches

    for n in range(1, 3 * bs + 3):
        out = _batches(torch.randperm(n), bs)
        assert sorted(torch.cat(out).tolist()) == list(range(n)), (n, bs)
        assert all(2 <= len(b) <= bs + 1 for b in out) or n == 1, (n, bs, [len(b) for b in out])


def test_parent_views_reach_full_finetuning(tmp_path, make_fake_pretrain) -> None:
    """The parent's views (organ recipes: flip_p 0) are inherited; --recipe and CLI keys still win."""
    pre = make_fake_pretrain(tmp_path, recipe_extra={"views.view1.flip_p": 0.0})
    recipe, parent = ft_stage.resolve_recipe(None, {"finetune.modes": ["full"]}, pre.path, tmp_path)
    assert parent is not None and recipe.views.view1.flip_p == 0.0
    mine = ft_stage.resolve_recipe(None, {"views.view1.flip_p": 0.25}, pre.path, tmp_path)[0]
    assert mine.views.view1.flip_p == 0.25


def test_imagenet_init_from_torch_cache(tmp_path, monkeypatch, synth_root) -> None:
    import torchvision

    from medssl_cli import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = models.imagenet_cache_path()
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError, match="resnet18-f37072fd.pth"):  # offline, not cached: names the file
        backbones.load("imagenet", data_channels=1)
    with pytest.raises(UserError, match="ImageNet weights not found"):
        finetune(
            {**FAST, "finetune.inits": ["imagenet"], "data.datasets": [AXIAL], "data.image_size": 32},
            runs_root=tmp_path / "runs",
            data_dir=synth_root,
        )
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("finetune-*"))

    torch.manual_seed(5)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    # The real file's sha256 starts with f37072fd; a test file cannot, so the hash check is bypassed here.
    monkeypatch.setattr(models, "_check_sha256", lambda p: "test")
    lb = backbones.load("imagenet", data_channels=1)
    assert torch.equal(lb.module.conv1.weight, state["conv1.weight"])
    assert lb.mean == backbones.IMAGENET_MEAN and lb.replicate_input
    assert lb.prepare(torch.zeros(2, 1, 8, 8)).shape == (2, 3, 8, 8)
    assert "replicated to 3 channels" in lb.info["input"]
    grid = finetune(
        {**FAST, "finetune.inits": ["imagenet"], "data.datasets": [AXIAL], "data.image_size": 32},
        runs_root=tmp_path / "runs",
        data_dir=synth_root,
    )
    cell = Run(grid.path / "cells" / "imagenet-linear-f1-s0").manifest
    assert cell["status"] == "finished" and cell["backbone"]["init"] == "imagenet"
    assert cell["backbone"]["file"] == str(path)


def _cli(args: list[str]):
    app = typer.Typer()
    app.command("finetune")(finetune_cmd)
    app.command("noop")(lambda: None)  # two commands: the first argument names the command
    return CliRunner().invoke(app, ["finetune", *args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fraction", "0"], "outside"),
        (["--fraction", "1.5"], "outside"),
        (["--fraction", "abc"], "not a number"),
        (["--fraction", "0.1,,"], None),  # empty items are dropped: valid
        (["--seeds", "0,x"], "malformed"),
        (["--seeds", "-1"], ">= 0"),
        (["--seeds", ","], "Empty list"),
        (["--init", "ssl,foo"], "finetune.inits"),
        (["--mode", "half"], "finetune.modes"),
        (["--fraction", "0.5", "--seeds", "0,0"], "twice"),
        (["--init", "random", "--cell", "7"], "out of range"),
        (["--init", "random", "--fraction", "1", "--datasets", "nope"], "Unknown dataset"),
    ],
)
def test_bad_options_are_one_line_user_errors(tmp_path, synth_root, args, message) -> None:
    base = ["--runs-root", str(tmp_path), "--data-dir", str(synth_root)]
    if "--datasets" not in args:
        base += ["--datasets", AXIAL, "--image-size", "32"]
    if "--init" not in args:
        base += ["--init", "random"]
    if message is None:
        assert parse_fractions(args[1]) == [0.1]
        return
    result = _cli([*args, *base])
    assert isinstance(result.exception, UserError), result.output
    assert message in result.exception.line() and "\n" not in result.exception.line()
    assert result.exception.exit_code == 2
    assert not list(tmp_path.glob("finetune-*"))  # nothing written


def test_option_parsers_and_missing_parent(tmp_path, synth_root) -> None:
    assert parse_fractions("0.5%,1%, 0.1") == [0.005, 0.01, 0.1]
    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_seeds(None) is None
    with pytest.raises(UserError, match="--datasets is required"):
        finetune({"finetune.inits": ["random"]}, runs_root=tmp_path)
    with pytest.raises(UserError, match="No finished pretrain run"):
        finetune({"finetune.inits": ["ssl"]}, runs_root=tmp_path)
    assert len(plan_cells(ft_stage.Recipe().finetune)) == 1
