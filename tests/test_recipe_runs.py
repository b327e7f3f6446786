"""Recipes (precedence, validation) and the run-directory convention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medssl_cli.errors import UserError
from medssl_cli.recipe import Recipe, load_recipe, override
from medssl_cli.runs import RunLock, create_run, find_latest, list_runs, resolve_run

REPO = Path(__file__).resolve().parents[1]


def test_precedence_defaults_file_cli(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("pretrain:\n  epochs: 7\n  lr: 0.5\ndata:\n  image_size: 64\n")
    r = override(load_recipe(f), {"pretrain.epochs": 3, "pretrain.batch_size": None})
    assert r.pretrain.epochs == 3  # CLI beats file
    assert r.pretrain.lr == 0.5  # file beats default
    assert r.pretrain.batch_size == Recipe().pretrain.batch_size  # None = option not given
    assert r.data.image_size == 64


def test_unknown_key_and_wrong_type_name_the_key(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("pretrain:\n  epoch: 7\n")
    with pytest.raises(UserError, match=r"Unknown recipe key 'pretrain.epoch'.*epochs"):
        load_recipe(f)
    f.write_text("pretrain:\n  epochs: many\n")
    with pytest.raises(UserError, match=r"'pretrain.epochs' must be an integer"):
        load_recipe(f)
    f.write_text("pretrain:\n  optimizer: sgd\n")
    with pytest.raises(UserError, match=r"'pretrain.optimizer' must be one of"):
        load_recipe(f)
    f.write_text("pretrain: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_recipe(f)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_load(name: str) -> None:
    load_recipe(REPO / "recipes" / name)


def test_organs_study_recipe_is_the_study_setup() -> None:
    r = load_recipe(REPO / "recipes" / "organs-bt-study.yaml")
    assert r.data.datasets == ["axial", "coronal", "sagittal"] and r.data.splits == ["train"]
    assert (r.pretrain.epochs, r.pretrain.batch_size, r.pretrain.optimizer, r.pretrain.lr) == (
        1000,
        256,
        "adam",
        0.03,
    )
    assert r.data.image_size == 224
    assert r.pretrain.weight_decay == 0.03  # the study's Adam weight decay


def test_recipe_hash_is_stable_and_sensitive() -> None:
    assert Recipe().hash() == Recipe().hash()
    assert override(Recipe(), {"pretrain.epochs": 5}).hash() != Recipe().hash()


def test_run_directories(tmp_path: Path) -> None:
    r = Recipe()
    a = create_run(tmp_path, "pretrain", r, name="x")
    b = create_run(tmp_path, "pretrain", r, name="x")  # same second: distinct directories
    assert a.path != b.path
    assert (a.path / "recipe.yaml").is_file() and a.status == "running"
    info = json.loads((a.path / "run.json").read_text())
    assert info["stage"] == "pretrain" and info["recipe_hash"] == r.hash() and "torch" in info["versions"]
    with pytest.raises(UserError, match="No finished pretrain run"):
        find_latest(tmp_path, "pretrain")
    with pytest.raises(UserError, match="still running"):
        resolve_run(a.path, tmp_path, "pretrain")
    a.set_status("finished")
    b.set_status("failed")
    assert find_latest(tmp_path, "pretrain").path == a.path
    with pytest.raises(UserError, match="did not finish"):
        resolve_run(b.path, tmp_path, "pretrain")
    with pytest.raises(UserError, match="is a pretrain run, but a finetune run"):
        resolve_run(a.path, tmp_path, "finetune")
    with pytest.raises(UserError, match="no such run directory"):
        resolve_run(tmp_path / "nothing", tmp_path, "pretrain")
    assert [x.path for x in list_runs(tmp_path, "pretrain")] == [a.path, b.path]
    assert a.recipe() == r


def test_unwritable_runs_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not writable"):
        create_run(blocker / "runs", "pretrain", Recipe())


def test_run_lock_is_exclusive(tmp_path: Path) -> None:
    run = create_run(tmp_path, "pretrain", Recipe())
    code = (
        "import sys; from medssl_cli.runs import RunLock; from medssl_cli.errors import UserError\n"
        f"try:\n    RunLock({str(run.path)!r}).__enter__()\n"
        "except UserError as e:\n    print(e); sys.exit(3)\n"
    )
    with RunLock(run.path):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 3 and "in use by another process" in out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0


def test_concurrent_processes_get_distinct_runs(tmp_path: Path) -> None:
    code = (
        "from medssl_cli.runs import create_run; from medssl_cli.recipe import Recipe\n"
        f"print(create_run({str(tmp_path)!r}, 'pretrain', Recipe(), name='same').path)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(4)
    ]
    paths = [p.communicate()[0].strip() for p in procs]
    assert len(set(paths)) == 4
