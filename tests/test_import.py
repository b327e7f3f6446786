"""`medssl data import`: a folder of PNGs (or a CSV) becomes a MIMeta dataset that every stage reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_error_line
from PIL import Image

from medssl_cli.cli import main
from medssl_cli.data.importer import import_images
from medssl_cli.data.registry import validate_info

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(path: Path, value: int, size: int = 20, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    a = np.clip(rng.normal(value, 30, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([a, a // 2, 255 - a], -1) if rgb else a).save(path)


def _folder(
    root: Path, per_class: int = 12, classes: tuple[str, ...] = ("benign", "malignant", "normal")
) -> Path:
    for c, name in enumerate(classes):
        for k in range(per_class):
            _png(root / name / f"{k:03d}.png", 60 + 60 * c + k)
    return root


def test_folder_of_pngs_goes_through_every_stage(tmp_path: Path, capsys) -> None:
    src, data, runs = _folder(tmp_path / "pngs"), tmp_path / "data", tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        main(["data", "import", str(src), "--id", "my_scans", "--size", "32", "--data-dir", str(data)])
    assert exc.value.code in (0, None), capsys.readouterr()
    info = validate_info(data / "my_scans" / "info.yaml")
    assert info["input_size"] == [1, 32, 32] and info["tasks"][0]["labels"] == {
        0: "benign",
        1: "malignant",
        2: "normal",
    }
    assert (
        info["splits_num_samples"] == {"train": 24, "val": 6, "test": 6}
        and "by image" in info["split_method"]
    )
    from mimeta import MIMeta  # read back through the real package

    ds = MIMeta(str(data), "my_scans", "class", split="test")
    assert len(ds) == 6
    from medssl_cli.recipe import Recipe, override
    from medssl_cli.stages.evaluate import evaluate
    from medssl_cli.stages.finetune import finetune
    from medssl_cli.stages.pretrain import pretrain

    keys = {"data.datasets": ["my_scans"], "data.image_size": 32, "model.projector": [32, 32],
            "pretrain.epochs": 1, "pretrain.batch_size": 8, "compute.threads": 1}  # fmt: skip
    recipe = override(Recipe(), keys)
    pre = pretrain(recipe, data_dir=data, runs_root=runs)
    grid = finetune(
        {"finetune.c_grid": [1.0], "compute.threads": 1}, from_run=pre.path, runs_root=runs, data_dir=data
    )
    summary = evaluate({}, from_run=grid.path, runs_root=runs, data_dir=data)
    assert pre.status == "finished" and summary["cells"] and (grid.path / "cells").is_dir()


def test_csv_with_subjects_keeps_each_subject_in_one_split(tmp_path: Path) -> None:
    rows = ["path,label,subject"]
    for s in range(12):  # 12 patients x 2 images, label by patient
        for k in range(2):
            _png(tmp_path / "img" / f"p{s}_{k}.png", 40 + 10 * s + k, rgb=True)
            rows.append(f"img/p{s}_{k}.png,{'ill' if s % 2 else 'well'},patient{s}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    path = import_images(tmp_path / "data", "pts", csv_path=tmp_path / "list.csv", size=16)
    info = validate_info(path / "info.yaml")
    assert info["input_size"] == [3, 16, 16] and "by subject" in info["split_method"]
    splits = {s: (path / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    subject_of = {}
    for s, lines in splits.items():
        for line in lines:
            i = int(line.split("/")[1].split(".")[0])
            subject_of.setdefault(i // 2, set()).add(s)
    assert all(len(v) == 1 for v in subject_of.values())  # never one subject in two splits


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    cases = []
    one = tmp_path / "one"
    for k in range(5):
        _png(one / "only" / f"{k}.png", k)
    cases.append(([str(one)], "have one label"))
    mixed = _folder(tmp_path / "mixed", 4)
    _png(mixed / "benign" / "big.png", 7, size=40)
    cases.append(([str(mixed)], "--size"))
    broken = _folder(tmp_path / "broken", 4)
    (broken / "normal" / "bad.png").write_bytes(b"not an image")
    cases.append(([str(broken), "--size", "16"], "Cannot read image"))
    dicom = _folder(tmp_path / "dicom", 4)
    (dicom / "normal" / "scan.dcm").write_bytes(b"DICM")
    cases.append(([str(dicom), "--size", "16"], "DICOM"))
    few = _folder(tmp_path / "few", 2)
    cases.append(([str(few), "--size", "16"], "at least 3"))
    _folder(tmp_path / "c", 4)
    (tmp_path / "dup.csv").write_text(
        "path,label\nc/benign/000.png,a\nc/benign/000.png,b\nc/normal/001.png,b\n"
    )
    cases.append((["--csv", str(tmp_path / "dup.csv")], "listed twice"))
    (tmp_path / "two.csv").write_text(
        "path,label,subject,split\nc/benign/000.png,a,p1,train\nc/benign/001.png,a,p1,test\nc/normal/000.png,b,p2,val\n"
    )
    cases.append((["--csv", str(tmp_path / "two.csv")], "in two splits"))
    (tmp_path / "cols.csv").write_text("file,class\nc/benign/000.png,a\n")
    cases.append((["--csv", str(tmp_path / "cols.csv")], "'path' and 'label'"))
    cases.append(([str(tmp_path / "nowhere")], "does not exist"))
    cases.append(([str(few), "--csv", str(tmp_path / "dup.csv")], "not both"))
    return cases


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    for args, needle in _bad_inputs(tmp_path):
        one_error_line(["data", "import", *args, "--id", "x", "--data-dir", str(data)], capsys, needle)
        assert not data.exists() or not [p for p in data.iterdir() if not p.name.startswith(".")]
    one_error_line(["data", "import", str(_folder(tmp_path / "ok", 3)), "--id", "../x", "--size", "16",
                    "--data-dir", str(data)], capsys, "Dataset id")  # fmt: skip
