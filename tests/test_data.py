"""Data layer: byte-exact bulk reader vs mimeta, pooling, fractions, root errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl_cli.data.fractions import parse_fraction, stratified_subset
from medssl_cli.data.images import ImageArray, open_h5, read_images, to_chw
from medssl_cli.data.pool import load_pool
from medssl_cli.data.registry import resolve_names, resolve_root, scan
from medssl_cli.errors import UserError


def _mimeta_items(root: Path, ds: str, task: str, split: str) -> tuple[list[int], torch.Tensor, np.ndarray]:
    from mimeta import MIMeta
    from torchvision.transforms import PILToTensor

    MIMeta._infos = None
    m = MIMeta(str(root), ds, task, split=split, transform=PILToTensor())
    images = torch.stack([m[i][0] for i in range(len(m))])
    return list(m.split_indices), images, np.asarray(m.labels)


@pytest.mark.parametrize(
    "ds,task", [("synthetic_organs_axial", "organ label"), ("synthetic_crc", "tissue class")]
)
def test_bulk_reader_is_byte_exact_with_mimeta(synth_root: Path, ds: str, task: str) -> None:
    pool = load_pool(synth_root, [ds], ["test"], image_size=32)
    rows, expected, labels = _mimeta_items(synth_root, ds, task, "test")
    assert pool.source_idx.tolist() == rows
    assert torch.equal(pool.images[:], expected)
    assert np.array_equal(pool.labels, labels)


def test_channel_conversion_matches_pil(synth_root: Path) -> None:
    """RGB -> gray must equal PIL's convert('L'), which mimeta uses for channel mismatches."""
    from PIL import Image

    h5 = open_h5(synth_root / "synthetic_crc" / "images.hdf5")
    rows = h5.rows(np.arange(10))
    ours = to_chw(rows, 1)
    for i in range(10):
        pil = torch.from_numpy(np.array(Image.fromarray(rows[i]).convert("L")))
        assert torch.equal(ours[i, 0], pil)


def test_lazy_and_in_ram_arrays_agree(synth_root: Path) -> None:
    h5 = open_h5(synth_root / "synthetic_crc" / "images.hdf5")
    parts = [(h5, np.array([5, 1, 9, 3])), (h5, np.array([0, 2]))]
    ram = ImageArray(parts, 16, 3, in_ram=True)
    lazy = ImageArray(parts, 16, 3, in_ram=False)
    idx = torch.tensor([5, 0, 2, 4])
    assert torch.equal(ram[idx], lazy[idx])
    assert torch.equal(ram[:], read_images(h5, np.array([5, 1, 9, 3, 0, 2]), 16, 3))


def test_ram_budget_switches_to_streaming(synth_root: Path) -> None:
    pool = load_pool(synth_root, ["synthetic_crc"], ["train"], image_size=32, ram_budget_gb=1e-6)
    assert not pool.images.in_ram
    full = load_pool(synth_root, ["synthetic_crc"], ["train"], image_size=32)
    assert full.images.in_ram
    assert torch.equal(pool.images[torch.arange(7)], full.images[torch.arange(7)])


def test_fingerprint_covers_rows_and_pixels(synth_root: Path, tmp_path: Path) -> None:
    a = load_pool(synth_root, ["synthetic_crc"], ["train"], image_size=32)
    moved = tmp_path / "moved"  # the same files under another root (e.g. a node's scratch disk)
    shutil.copytree(synth_root / "synthetic_crc", moved / "synthetic_crc")
    assert load_pool(moved, ["synthetic_crc"], ["train"], image_size=32).fingerprint() == a.fingerprint()
    assert load_pool(synth_root, ["synthetic_crc"], ["val"], image_size=32).fingerprint() != a.fingerprint()
    import h5py

    with h5py.File(moved / "synthetic_crc" / "images.hdf5", "r+") as f:  # other pixels, same ids and rows
        f["images"][...] = 255 - f["images"][...]
    b = load_pool(moved, ["synthetic_crc"], ["train"], image_size=32)
    assert b.seen() == a.seen() and not torch.equal(b.images[:], a.images[:])
    assert b.fingerprint() != a.fingerprint()
    assert a.matches(a.provenance()) and not b.matches(a.provenance())
    import hashlib
    import json

    # runs made before fingerprint version 2 recorded the rows only: still resumable on the same rows
    rows_only = hashlib.sha256(json.dumps(a.seen(), sort_keys=True).encode()).hexdigest()[:16]
    assert a.matches({"fingerprint": rows_only}) and b.matches({"fingerprint": rows_only})
    assert not a.matches({"fingerprint": a.fingerprint()})  # a version-2 value read as version 1


def test_pooling_three_planes(synth_root: Path) -> None:
    pool = load_pool(
        synth_root,
        ["synthetic_organs_axial", "synthetic_organs_coronal", "synthetic_organs_sagittal"],
        ["train"],
        image_size=32,
    )
    single = load_pool(synth_root, ["synthetic_organs_axial"], ["train"], image_size=32)
    assert len(pool) == 3 * len(single)
    assert pool.num_classes == 11 and pool.channels == 1
    prov = pool.provenance()
    assert prov["splits"] == ["train"] and prov["synthetic"]["synthetic_organs_axial"] is True
    assert set(pool.seen()) == set(pool.dataset_ids)
    assert all(set(v) == {"train"} for v in pool.seen().values())


def test_pooling_label_space_mismatch_is_an_error(synth_root: Path) -> None:
    with pytest.raises(UserError, match="label spaces differ"):
        load_pool(
            synth_root, ["synthetic_organs_axial", "synthetic_crc"], ["train"], image_size=32, channels="3"
        )
    with pytest.raises(UserError, match="mix 1- and 3-channel"):
        load_pool(
            synth_root,
            ["synthetic_organs_axial", "synthetic_crc"],
            ["train"],
            image_size=32,
            supervised=False,
        )
    pool = load_pool(
        synth_root,
        ["synthetic_organs_axial", "synthetic_crc"],
        ["train"],
        image_size=32,
        supervised=False,
        channels="3",
    )
    assert pool.channels == 3 and pool.conversions == ["synthetic_organs_axial: 1->3 channels"]


def test_aliases_and_typos(real_ids_root: Path, synth_root: Path) -> None:
    infos = scan(real_ids_root)
    assert resolve_names(["axial", "coronal", "sagittal"], infos) == [
        "organs_axial",
        "organs_coronal",
        "organs_sagittal",
    ]
    assert resolve_names(["organs", "crc"], infos)[-1] == "crc"
    with pytest.raises(UserError, match="Did you mean: .*organs_axial"):
        resolve_names(["organs_axail"], infos)
    with pytest.raises(UserError, match="synthetic_organs_axial"):
        resolve_names(["axial"], scan(synth_root))


def test_data_root_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="does not exist.*7884735"):
        resolve_root(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no MIMeta dataset.*medssl data synth"):
        resolve_root(tmp_path)
    monkeypatch.setenv("MEDSSL_DATA", str(tmp_path / "env"))
    with pytest.raises(UserError, match="env"):
        resolve_root(None)


def test_task_selection(synth_root: Path) -> None:
    with pytest.raises(UserError, match="no task 'organ lable'.*organ label"):
        load_pool(synth_root, ["synthetic_organs_axial"], ["train"], task="organ lable", image_size=32)


def test_missing_split_is_an_error(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(synth_root / "synthetic_crc", root / "synthetic_crc")
    (root / "synthetic_crc" / "splits" / "val.txt").unlink()
    with pytest.raises(UserError, match="no 'val' split"):
        load_pool(root, ["synthetic_crc"], ["val"], image_size=32)


# ----------------------------------------------------------------------------- fractions


def test_fraction_subsets_are_stratified_floored_nested_deterministic() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 11, size=871)
    labels[:11] = np.arange(11)
    small = stratified_subset(labels, 0.005, seed=3, num_classes=11)
    assert small.floor_raised and len(small.indices) == 11 and small.requested == 4
    assert sorted(set(labels[small.indices].tolist())) == list(range(11))
    prev = small.indices
    for f in (0.01, 0.1, 0.25, 0.5, 1.0):
        sub = stratified_subset(labels, f, seed=3, num_classes=11)
        assert set(prev.tolist()) <= set(sub.indices.tolist())  # nested
        for c in range(11):  # stratified: each class near its share
            n_c = int((labels == c).sum())
            assert sub.per_class[c] == max(1, int(np.floor(f * n_c + 0.5)))
        prev = sub.indices
    assert len(prev) == 871
    again = stratified_subset(labels, 0.1, seed=3, num_classes=11)
    assert np.array_equal(again.indices, stratified_subset(labels, 0.1, seed=3, num_classes=11).indices)
    other = stratified_subset(labels, 0.1, seed=4, num_classes=11)
    assert not np.array_equal(other.indices, again.indices)


def test_missing_class_cannot_be_floored() -> None:
    with pytest.raises(UserError, match="no training image"):
        stratified_subset(np.array([0, 0, 1]), 0.5, seed=0, num_classes=3)


@pytest.mark.parametrize("text,value", [("0.005", 0.005), ("0.5%", 0.005), ("1", 1.0), (0.25, 0.25)])
def test_parse_fraction(text: str, value: float) -> None:
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "-0.1", "1.5", "abc", "nan", "150%"])
def test_parse_fraction_rejects(text: str) -> None:
    with pytest.raises(UserError):
        parse_fraction(text)


@pytest.mark.filterwarnings("ignore:Dataset ID .* does not match directory name")  # mimeta's, expected
def test_dataset_folder_named_other_than_its_id(synth_root: Path, tmp_path: Path) -> None:
    """mimeta maps ids to folders by info.yaml; so does the pixel reader (it built root/<id>)."""
    root = tmp_path / "root"
    shutil.copytree(synth_root / "synthetic_crc", root / "crc_v1")  # id synthetic_crc, another folder name
    pool = load_pool(root, ["synthetic_crc"], ["train"], image_size=32)
    want = load_pool(synth_root, ["synthetic_crc"], ["train"], image_size=32)
    assert torch.equal(pool.images[:], want.images[:]) and (pool.labels == want.labels).all()
    shutil.copytree(synth_root / "synthetic_crc", root / "crc_v2")  # the same id twice
    with pytest.raises(UserError, match="Two folders .* 'synthetic_crc'"):
        load_pool(root, ["synthetic_crc"], ["train"], image_size=32)
