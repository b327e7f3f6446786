"""Bad input through the real CLI entry: one line, exit code 2, no traceback, nothing half-written.

One table (``CASES``), one test. Every case builds its own broken input from copies of the shared
32 px synthetic MIMeta root and of one fake finished pretrain run, runs ``medssl_cli.cli.main(argv)``
and checks: the exit code, one ``error:`` line holding a distinctive substring, no ``Traceback``, no
temporary file (``*.tmp``) anywhere under the case's folder, and no run directory left ``running``
(none created, or marked ``failed``). A few rows are inputs that medssl accepts (``--fraction 5%``,
a fraction below one image per class: the per-class floor is applied and reported): exit code 0.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from medssl_cli import io as mio
from medssl_cli.cli import main
from medssl_cli.data.mimeta_format import TaskSpec, write_mimeta_dataset
from medssl_cli.io import read_json, write_json
from medssl_cli.models import backbone_meta, build_backbone, load_weights, save_weights

AXIAL = "synthetic_organs_axial"
TMP_NAME = re.compile(r"\.tmp($|-)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fake_pre(tmp_path_factory, make_fake_pretrain) -> Path:
    """A finished pretrain run (seeded random backbone, 1-channel axial, 32 px); cases copy it."""
    return make_fake_pretrain(tmp_path_factory.mktemp("bad_input_pre")).path


@dataclass
class Env:
    tmp: Path  # the case's own folder: everything the case makes or the CLI writes is under it
    data: Path  # the clean synthetic root (shared, never written)
    fake_pre: Path

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"

    def broken(self, damage: Callable[[Path], None], ds: str = AXIAL) -> Path:
        """A data root holding a copy of ``ds`` after ``damage(folder)``."""
        root = self.tmp / "data"
        shutil.copytree(self.data / ds, root / ds)
        damage(root / ds)
        return root

    def pre(self, mutate: Callable[[Path], None] | None = None, name: str = "pretrain-copy") -> Path:
        """A copy of the fake pretrain run under the case's runs root, after ``mutate(run_dir)``."""
        dst = self.runs / name
        shutil.copytree(self.fake_pre, dst)
        if mutate is not None:
            mutate(dst)
        return dst

    def recipe(self, text: str) -> Path:
        p = self.tmp / "recipe.yaml"
        p.write_text(text)
        return p

    def pretrain(self, *extra: str, data: Path | None = None) -> list[str]:
        tiny = self.tmp / "tiny.yaml"
        tiny.write_text("model:\n  projector: [64, 64]\npretrain:\n  warmup_epochs: 1\n")
        return ["pretrain", "--data-dir", str(data or self.data), "--runs-root", str(self.runs),
                "--datasets", AXIAL, "--image-size", "32", "--epochs", "1", "--batch-size", "16",
                "--precision", "fp32", "--device", "cpu", "--recipe", str(tiny), *extra]  # fmt: skip

    def finetune(self, *extra: str, data: Path | None = None, datasets: str = AXIAL) -> list[str]:
        """A random-init linear grid on 32 px axial (no pretrain run needed)."""
        return ["finetune", "--data-dir", str(data or self.data), "--runs-root", str(self.runs),
                "--init", "random", "--datasets", datasets, "--image-size", "32", "--device", "cpu",
                *extra]  # fmt: skip

    def finetune_from(self, run: Path, *extra: str) -> list[str]:
        return ["finetune", "--from", str(run), "--data-dir", str(self.data), "--runs-root", str(self.runs),
                "--device", "cpu", *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------- damage


def _set_status(status: str, **fields: object) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        write_json(run / "run.json", {**read_json(run / "run.json"), "status": status, **fields})

    return mutate


def _rewrite_h5(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        with h5py.File(folder / "images.hdf5", "r") as f:
            images = f["images"][()]
        (folder / "images.hdf5").unlink()
        with h5py.File(folder / "images.hdf5", "w") as f:
            f.create_dataset("images", data=fn(images))

    return damage


def _truncate(path_in_folder: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        p = folder / path_in_folder
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])

    return damage


def _labels(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        p = folder / "task_labels" / "organ label.npy"
        np.save(p, fn(np.load(p)))

    return damage


def _info(fn: Callable[[str], str]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        p = folder / "info.yaml"
        p.write_text(fn(p.read_text()))

    return damage


def _drop_tasks(text: str) -> str:
    import yaml

    info = yaml.safe_load(text)
    del info["tasks"]
    return yaml.safe_dump(info)


def _weights(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        fn(run / "weights" / "backbone.safetensors")

    return mutate


def _truncate_file(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _not_safetensors(p: Path) -> None:
    p.write_bytes(b"PK\x03\x04 this is a zip archive (torch.save), not safetensors" * 10)


def _meta_arch(p: Path) -> None:
    state, meta = load_weights(p)
    save_weights(p, state, {**meta, "arch": "resnet50"})


def _other_shapes(p: Path) -> None:
    state, meta = load_weights(p)
    state = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    save_weights(p, state, meta)


def _three_channels(p: Path) -> None:
    _, meta = load_weights(p)
    meta = {**meta, **backbone_meta(3, "replicate", 32)}
    save_weights(p, build_backbone(3), meta)


def _multilabel_root(env: Env) -> Path:
    root = env.tmp / "data"
    rng = np.random.default_rng(0)
    n = 30
    images = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)
    task = TaskSpec("findings", "MULTILABEL_CLASSIFICATION", {0: "a", 1: "b", 2: "c"},
                    rng.integers(0, 2, (n, 3)))  # fmt: skip
    splits = {"train": np.arange(0, 20), "val": np.arange(20, 25), "test": np.arange(25, 30)}
    write_mimeta_dataset(root, "multilabel_only", images, [task], splits)
    return root


def _disk_full_on(pattern: str) -> Callable[[Env, pytest.MonkeyPatch], None]:
    """os.replace in medssl_cli.io fails with ENOSPC for targets whose name matches ``pattern``."""

    def patch(env: Env, mp: pytest.MonkeyPatch) -> None:
        real = os.replace

        def replace(src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            if re.search(pattern, Path(dst).name):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst, *a, **k)

        mp.setattr(mio.os, "replace", replace)

    return patch


def _offline(env: Env, mp: pytest.MonkeyPatch) -> None:
    mp.setenv("TORCH_HOME", str(env.tmp / "empty_torch_home"))


def _grid_finished_with(fraction: float, floor: bool) -> Callable[[Env, str], None]:
    def check(env: Env, out: str) -> None:
        (grid,) = env.runs.glob("finetune-*")
        assert read_json(grid / "run.json")["status"] == "finished"
        (cell,) = (grid / "cells").iterdir()
        info = read_json(cell / "run.json")
        assert info["fraction"] == fraction and info["subset"]["floor_raised"] is floor
        assert info["subset"]["n"] == 11  # one image per organ class
        if floor:
            assert "one-image-per-class floor raised it to 11" in out

    return check


# ---------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    message: str  # distinctive substring of the one error line (or of the output, for code 0)
    code: int = 2
    failed_run: bool = False  # refused after its run directory was made: the run must be marked failed
    patch: Callable[[Env, pytest.MonkeyPatch], None] | None = None
    check: Callable[[Env, str], None] | None = None


# fmt: off
CASES = [
    # ---- data root and datasets
    Case("data-root-missing", lambda e: e.pretrain(data=e.tmp / "nope"), "does not exist"),
    Case("data-root-empty", lambda e: e.pretrain(data=e.tmp), "holds no MIMeta dataset"),
    Case("dataset-typo", lambda e: e.pretrain("--datasets", "synthetic_organs_axail"),
         "Did you mean: synthetic_organs_axial"),
    Case("task-unknown", lambda e: e.finetune("--task", "organ lable"), "no task 'organ lable'"),
    Case("pool-classes-differ", lambda e: e.finetune(datasets=f"{AXIAL},synthetic_crc"),
         "label spaces differ"),
    Case("split-missing", lambda e: e.finetune(data=e.broken(lambda d: (d / "splits/val.txt").unlink())),
         "has no 'val' split"),
    Case("multilabel-only-dataset",
         lambda e: e.finetune(data=_multilabel_root(e), datasets="multilabel_only"),
         "has no multiclass task (only MULTILABEL_CLASSIFICATION)"),
    # ---- fractions, seeds, sizes
    Case("fraction-zero", lambda e: e.finetune("--fraction", "0"), "outside (0, 1]"),
    Case("fraction-negative", lambda e: e.finetune("--fraction", "-0.1"), "outside (0, 1]"),
    Case("fraction-above-one", lambda e: e.finetune("--fraction", "1.5"), "outside (0, 1]"),
    Case("fraction-not-a-number", lambda e: e.finetune("--fraction", "half"), "is not a number"),
    Case("fraction-percent-accepted", lambda e: e.finetune("--fraction", "5%"), "Grid:", code=0,
         check=_grid_finished_with(0.05, floor=True)),
    Case("fraction-floor-one-per-class", lambda e: e.finetune("--fraction", "0.01"), "Grid:", code=0,
         check=_grid_finished_with(0.01, floor=True)),
    Case("class-without-images",
         lambda e: e.finetune(data=e.broken(_labels(lambda y: np.where(y == 10, 9, y)))),
         "have no training image", failed_run=True),
    Case("seeds-malformed", lambda e: e.finetune("--seeds", "0,x"), "--seeds '0,x' is malformed"),
    Case("batch-larger-than-train-set", lambda e: e.pretrain("--batch-size", "4096"),
         "larger than the 33 pretraining images"),
    Case("image-size-too-small", lambda e: e.pretrain("--image-size", "4"), "Image size 4 is not supported"),
    Case("image-size-too-large", lambda e: e.finetune("--image-size", "5000"),
         "Image size 5000 is not supported"),
    # ---- broken dataset files
    Case("info-yaml-invalid", lambda e: e.pretrain(data=e.broken(_info(lambda t: "id: [unclosed\n" + t))),
         "info.yaml is not valid YAML"),
    Case("info-yaml-missing-fields", lambda e: e.pretrain(data=e.broken(_info(_drop_tasks))),
         "lacks the field(s) tasks"),
    Case("hdf5-missing", lambda e: e.pretrain(data=e.broken(lambda d: (d / "images.hdf5").unlink())),
         "images.hdf5 is missing"),
    Case("hdf5-truncated", lambda e: e.pretrain(data=e.broken(_truncate("images.hdf5"))),
         "images.hdf5 is not a readable HDF5 file"),
    Case("hdf5-wrong-dtype", lambda e: e.pretrain(data=e.broken(_rewrite_h5(lambda x: x.astype(np.float32)))),
         "images are float32, MIMeta stores uint8"),
    Case("hdf5-rows-disagree-with-labels",
         lambda e: e.pretrain(data=e.broken(_rewrite_h5(lambda x: x[:-5]))), "lists 66 labels but"),
    Case("label-file-shorter", lambda e: e.pretrain(data=e.broken(_labels(lambda y: y[:-3]))),
         "lists 63 labels but"),
    Case("label-file-truncated",
         lambda e: e.pretrain(data=e.broken(_truncate("task_labels/organ label.npy"))),
         "organ label.npy is missing or unreadable"),
    # ---- recipes
    Case("recipe-yaml-syntax", lambda e: e.pretrain("--recipe", str(e.recipe("pretrain: [1, 2\n"))),
         "is not valid YAML at line"),
    Case("recipe-unknown-key", lambda e: e.pretrain("--recipe", str(e.recipe("pretrain:\n  epoch: 3\n"))),
         "Unknown recipe key 'pretrain.epoch'. Did you mean: epochs"),
    Case("recipe-wrong-type", lambda e: e.pretrain("--recipe", str(e.recipe("pretrain:\n  lr: fast\n"))),
         "'pretrain.lr' must be a number"),
    Case("recipe-file-missing", lambda e: e.pretrain("--recipe", str(e.tmp / "nope.yaml")),
         "Recipe file not found"),
    # ---- --from
    Case("from-nothing", lambda e: e.finetune_from(e.tmp / "no-such-run"), "no such run directory"),
    Case("from-running-run", lambda e: e.finetune_from(e.pre(_set_status("running"))), "is still running"),
    Case("from-failed-run", lambda e: e.finetune_from(e.pre(_set_status("failed"))),
         "did not finish (status: failed)"),
    Case("from-wrong-stage", lambda e: e.finetune_from(e.pre(_set_status("finished", stage="tsne"))),
         "is a tsne run, but a pretrain run is needed"),
    Case("from-not-a-run", lambda e: e.finetune_from(e.tmp), "is not a medssl run (no run.json)"),
    # ---- weights (checked before the grid is created)
    Case("weights-truncated", lambda e: e.finetune_from(e.pre(_weights(_truncate_file))),
         "is not a safetensors file"),
    Case("weights-not-safetensors", lambda e: e.finetune_from(e.pre(_weights(_not_safetensors))),
         "is not a safetensors file"),
    Case("weights-missing", lambda e: e.finetune_from(e.pre(_weights(Path.unlink))),
         "Weights file not found"),
    Case("weights-other-arch", lambda e: e.finetune_from(e.pre(_weights(_meta_arch))),
         "holds weights for arch='resnet50'"),
    Case("weights-other-shapes", lambda e: e.finetune_from(e.pre(_weights(_other_shapes))),
         "do not fit the resnet18 network: missing 30 (e.g. layer4.0.conv1.weight)"),
    Case("weights-other-channels", lambda e: e.finetune_from(e.pre(_weights(_three_channels))),
         "trained on 3-channel images, but the fine-tuning data has 1 channel"),
    Case("imagenet-not-cached-offline", lambda e: e.finetune("--init", "imagenet"),
         "ImageNet weights not found", patch=_offline),
    # ---- run directories and disks
    Case("runs-root-not-writable",
         lambda e: [*e.pretrain(), "--runs-root", str(e.tmp / "afile" / "runs")], "is not writable"),
    Case("pretrain-run-dir-not-a-run", lambda e: e.pretrain("--run-dir", str(e.pre() / "weights")),
         "is not a medssl run"),
    Case("pretrain-run-dir-other-settings", lambda e: e.pretrain("--run-dir", str(e.pre())),
         "holds a run with other settings"),
    Case("pretrain-resume-finished", lambda e: e.pretrain("--resume", str(e.pre())), "already finished"),
    Case("pretrain-resume-and-run-dir",
         lambda e: e.pretrain("--resume", str(e.pre()), "--run-dir", str(e.tmp)), "not both"),
    Case("finetune-grid-dir-not-a-grid", lambda e: e.finetune("--grid-dir", str(e.pre())),
         "not a finetune grid"),
    Case("finetune-resume-not-a-grid", lambda e: e.finetune("--resume", str(e.pre())), "not a finetune grid"),
    Case("disk-full-at-start", lambda e: e.pretrain(), "Disk full while writing", patch=_disk_full_on(".")),
    Case("disk-full-mid-run", lambda e: e.pretrain("--epochs", "2"), "Disk full while writing",
         failed_run=True, patch=_disk_full_on(r"\.safetensors$")),
]
# fmt: on


def _prepare_afile(env: Env) -> None:
    (env.tmp / "afile").write_text("a file where the runs root's parent folder should be")


def _running_runs(root: Path) -> set[Path]:
    out = set()
    for p in root.rglob("run.json"):
        try:
            if read_json(p).get("status") == "running":
                out.add(p.parent)
        except ValueError:
            out.add(p.parent)  # an unreadable run.json is as bad as a stale 'running'
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, synth_root: Path, fake_pre: Path, capsys, monkeypatch) -> None:
    env = Env(tmp_path, synth_root, fake_pre)
    _prepare_afile(env)
    argv = case.argv(env)
    planted = _running_runs(tmp_path)  # runs the case set to 'running' on purpose
    if case.patch is not None:
        case.patch(env, monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    monkeypatch.undo()
    out = capsys.readouterr()
    text = out.out + out.err
    assert exc.value.code == case.code, text
    assert "Traceback" not in text, text
    if case.code == 2:
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, text
        assert case.message in errors[0], text
    else:
        assert case.message in text, text
    leftovers = [p for p in tmp_path.rglob("*") if TMP_NAME.search(p.name)]
    assert not leftovers, leftovers
    assert _running_runs(tmp_path) <= planted
    if case.check is not None:
        case.check(env, text)
    else:  # refused: nothing new under the runs root, or (failed_run) runs marked failed
        planted_dirs = {env.runs / "pretrain-copy"}
        new = [p for p in (env.runs.iterdir() if env.runs.exists() else []) if p not in planted_dirs]
        new = [p for p in new if p.name != ".cache"]
        assert bool(new) == case.failed_run, new
        for run_dir in new:
            for run_json in [run_dir / "run.json", *run_dir.glob("cells/*/run.json")]:
                assert read_json(run_json)["status"] == "failed", run_json
