"""Hostile split files and labels: overlapping splits, malformed lines, labels outside the class list,
and the leakage guard comparing images, not split names. Each case is one clear line (UserError / exit
2) and never a silent wrong result."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from medssl_cli.data.leakage import find_leakage
from medssl_cli.data.pool import load_pool
from medssl_cli.errors import UserError

AXIAL = "synthetic_organs_axial"


@pytest.fixture()
def root(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of one synthetic dataset, free to damage."""
    shutil.copytree(synth_root / AXIAL, tmp_path / AXIAL)
    return tmp_path


def load(root: Path, splits: list[str], supervised: bool = True):  # noqa: ANN201
    return load_pool(root, [AXIAL], splits, image_size=32, supervised=supervised)


def split_path(root: Path, split: str) -> Path:
    return root / AXIAL / "splits" / f"{split}.txt"


def test_a_test_image_listed_in_train_is_refused_at_load(root: Path) -> None:
    first_test = split_path(root, "test").read_text().splitlines()[0]
    with split_path(root, "train").open("a") as f:
        f.write("\n" + first_test + "\n")
    with pytest.raises(UserError, match=r"train.txt and .*test.txt share 1 image") as exc:
        load(root, ["train"], supervised=False)  # pretraining too: it would put a test image in the backbone
    assert "\n" not in exc.value.line()


def test_leakage_guard_compares_images_not_split_names() -> None:
    seen = {AXIAL: {"train": [1, 2, 3, 7]}}
    found = find_leakage(seen, {AXIAL: {"test": [3, 4, 7]}}, Path("/nonexistent"))
    assert [(f["pretrained_on"], f["same_images"]) for f in found] == [(f"{AXIAL}/train", 2)]
    assert find_leakage(seen, {AXIAL: {"test": [4, 5]}}, Path("/nonexistent")) == []


def test_trailing_blank_lines_are_fine(root: Path) -> None:
    before = load(root, ["train"]).source_idx.copy()
    split_path(root, "train").write_text(split_path(root, "train").read_text() + "\n\n  \n")
    assert np.array_equal(load(root, ["train"]).source_idx, before)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("images/abc.tiff", "names no image number"),
        ("images/-000001.tiff", "negative image number -1"),
        ("images/999999.tiff", "beyond the"),
        ("DUP", "listed twice"),
    ],
)
def test_bad_split_lines_name_file_and_line(root: Path, line: str, needle: str) -> None:
    lines = split_path(root, "val").read_text().splitlines()
    lines.insert(2, lines[0] if line == "DUP" else line)
    split_path(root, "val").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="val.txt, line 3") as exc:
        load(root, ["train"])  # even an unused split is checked: splits are validated together
    assert needle in exc.value.line()


def test_empty_missing_directory_and_binary_split_files(root: Path) -> None:
    split_path(root, "val").write_text("\n")
    with pytest.raises(UserError, match="'val' split is empty"):
        load(root, ["val"])
    split_path(root, "val").unlink()
    with pytest.raises(UserError, match="no 'val' split"):
        load(root, ["val"])
    split_path(root, "val").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        load(root, ["train"])
    split_path(root, "val").rmdir()
    split_path(root, "val").write_bytes(b"\xff\xfe\x00images")
    with pytest.raises(UserError, match="not UTF-8"):
        load(root, ["train"])


def test_split_named_twice_is_refused(root: Path) -> None:
    with pytest.raises(UserError, match="names a split twice"):
        load(root, ["train", "train"])


def _labels_file(root: Path) -> Path:
    return next((root / AXIAL / "task_labels").glob("*.npy"))


@pytest.mark.parametrize("bad", [99, -1])
def test_labels_outside_the_class_list_are_refused(root: Path, bad: int) -> None:
    f = _labels_file(root)
    labels = np.load(f)
    row = int(split_path(root, "test").read_text().split()[0].split("/")[-1].split(".")[0])
    labels[row] = bad
    np.save(f, labels)
    with pytest.raises(UserError, match=rf"labels outside the 11 classes.*: {bad}\.") as exc:
        load(root, ["test"])
    assert f.name in exc.value.line() and "'test' split" in exc.value.line()
    load(root, ["test"], supervised=False)  # pretraining reads no labels: not its concern


def test_nan_labels_and_too_few_class_names_are_refused(root: Path) -> None:
    f = _labels_file(root)
    labels = np.load(f).astype(np.float64)
    labels[int(split_path(root, "train").read_text().split()[0].split("/")[-1].split(".")[0])] = np.nan
    np.save(f, labels)
    with pytest.raises(UserError, match="nan"):
        load(root, ["train"])
    np.save(f, np.nan_to_num(labels, nan=0.0))
    load(root, ["train"])  # integral floats are class indices
    info_path = root / AXIAL / "info.yaml"
    info = yaml.safe_load(info_path.read_text())
    info["tasks"][0]["labels"] = {k: v for k, v in info["tasks"][0]["labels"].items() if k < 5}
    info_path.write_text(yaml.safe_dump(info))
    with pytest.raises(UserError, match="outside the 5 classes"):
        load(root, ["train"])


def test_cli_overlapping_splits_one_line_exit_2(root: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from medssl_cli.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    with split_path(root, "train").open("a") as f:
        f.write(split_path(root, "val").read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "pretrain",
                "--data-dir",
                str(root),
                "--datasets",
                AXIAL,
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--runs-root",
                str(tmp_path / "runs"),
            ]
        )
    out = capsys.readouterr()
    lines = [x for x in (out.out + out.err).splitlines() if x.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and "share 1 image" in lines[0], lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda i: i["tasks"][0].__setitem__("labels", ["a", "b"]), "labels must be a non-empty mapping"),
        (lambda i: i["tasks"][0].__setitem__("labels", {}), "labels must be a non-empty mapping"),
        (lambda i: i.__setitem__("id", None), "id must be a non-empty string"),
        (lambda i: i.__setitem__("splits_num_samples", [1, 2]), "splits_num_samples must be a mapping"),
        (lambda i: i.__setitem__("input_size", [1, 0, 32]), "H, W > 0"),
    ],
    ids=["labels-list", "labels-empty", "null-id", "counts-list", "zero-size"],
)
def test_malformed_info_fields_are_one_line(root: Path, edit, needle: str) -> None:  # noqa: ANN001
    info_path = root / AXIAL / "info.yaml"
    info = yaml.safe_load(info_path.read_text())
    edit(info)
    info_path.write_text(yaml.safe_dump(info))
    with pytest.raises(UserError, match="info.yaml") as exc:
        load(root, ["train"])
    assert needle in exc.value.line()


def test_non_utf8_info_and_zero_size_images(root: Path) -> None:
    import h5py

    info_path = root / AXIAL / "info.yaml"
    good = info_path.read_bytes()
    info_path.write_bytes(b"\xff\xfe" + good)
    with pytest.raises(UserError, match="not UTF-8"):
        load(root, ["train"])
    info_path.write_bytes(good)
    with h5py.File(root / AXIAL / "images.hdf5", "w") as f:
        f.create_dataset("images", shape=(0, 32, 32), dtype="uint8")
    with pytest.raises(UserError, match="none can be read|labels but"):
        load(root, ["train"])
