"""Synthetic MIMeta writer: format read back by the real `mimeta` package, splits, determinism,
overwrite refusal, atomicity, and a learnability check (above chance, far from perfect)."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from medssl_cli.data import mimeta_format, synth
from medssl_cli.data.mimeta_format import TaskSpec, write_mimeta_dataset
from medssl_cli.data.synth import CRC_LABELS, ORGAN_LABELS, make_synthetic
from medssl_cli.errors import UserError

SIZE = 32
ORGAN_IDS = [f"synthetic_organs_{p}" for p in synth.PLANES]
TASK = {**{i: "organ label" for i in ORGAN_IDS}, "synthetic_crc": "tissue class"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("mimeta")
    assert make_synthetic(r, organs=77, crc=90, size=SIZE, seed=0) == [*ORGAN_IDS, "synthetic_crc"]
    return r


def _mimeta(root: Path, dataset_id: str, split: str):
    import torchvision
    from mimeta import MIMeta

    MIMeta._infos = None  # the loader caches the dataset list per root on the class
    return MIMeta(
        str(root), dataset_id, TASK[dataset_id], split=split, transform=torchvision.transforms.PILToTensor()
    )


def _split(root: Path, dataset_id: str, split: str) -> np.ndarray:
    text = (root / dataset_id / "splits" / f"{split}.txt").read_text()
    return np.array([int(line.split("/")[-1].split(".")[0]) for line in text.split("\n")])


def test_reads_back_through_mimeta(root):
    from mimeta import MIMeta, get_available_datasets

    MIMeta._infos = None
    assert sorted(get_available_datasets(str(root))) == sorted(TASK)
    for did in TASK:
        names, c = (CRC_LABELS, 3) if did == "synthetic_crc" else (ORGAN_LABELS, 1)
        with h5py.File(root / did / "images.hdf5", "r") as f:
            raw = f["images"][:]
        info = MIMeta.get_info_dict(str(root), did)
        assert sum(info["splits_num_samples"].values()) == info["total_num_samples"] == len(raw)
        for split in synth.SPLITS:
            ds = _mimeta(root, did, split)
            assert len(ds) == info["splits_num_samples"][split] > 0
            assert ds.classes == dict(enumerate(names)) and ds.num_channels == c
            assert set(ds.labels.tolist()) == set(range(len(names))), f"{did}/{split} misses a class"
            img, label = ds[len(ds) - 1]
            assert img.dtype.is_floating_point is False and tuple(img.shape) == (c, SIZE, SIZE)
            want = raw[ds.split_indices[-1]]
            assert np.array_equal(img.numpy(), want[None] if c == 1 else want.transpose(2, 0, 1))
            assert label.shape == () and int(label) == int(ds.labels[-1])


def test_exact_format(root):
    for did in TASK:
        d = root / did
        with h5py.File(d / "images.hdf5", "r") as f:
            assert list(f.keys()) == ["images"]
            ds = f["images"]
            assert ds.dtype == np.uint8 and ds.chunks is None and ds.compression is None
            n = len(ds)
            assert ds.shape == ((n, SIZE, SIZE, 3) if did == "synthetic_crc" else (n, SIZE, SIZE))
        labels = np.load(d / "task_labels" / f"{TASK[did]}.npy")  # file name keeps the space
        assert labels.dtype == np.int64 and labels.shape == (n,)
        info = yaml.safe_load((d / "info.yaml").read_text())
        assert info["synthetic"] is True and "synthetic" in info["description"].lower()
        assert "seed 0" in info["description"] and info["domain"].startswith("Synthetic")
        assert info["input_size"] == [3 if did == "synthetic_crc" else 1, SIZE, SIZE]
        assert all(isinstance(k, int) for k in info["tasks"][0]["labels"])
        seen = []
        for split in synth.SPLITS:
            text = (d / "splits" / f"{split}.txt").read_text()
            assert not text.endswith("\n") and all(
                re.fullmatch(r"images/\d{6}\.tiff", x) for x in text.split("\n")
            )
            seen += _split(root, did, split).tolist()
        assert sorted(seen) == list(range(n)), "splits must partition the images"
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_planes_share_items_and_splits(root):
    ref = np.load(root / ORGAN_IDS[0] / "task_labels" / "organ label.npy")
    imgs = []
    for did in ORGAN_IDS:
        assert np.array_equal(np.load(root / did / "task_labels" / "organ label.npy"), ref)
        for split in synth.SPLITS:
            assert np.array_equal(_split(root, did, split), _split(root, ORGAN_IDS[0], split))
        with h5py.File(root / did / "images.hdf5", "r") as f:
            imgs.append(f["images"][:])
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])


def test_organ_split_by_patient_and_fractions():
    items, splits = synth._organ_items(600, seed=3)
    owner = {}
    for name, idx in splits.items():
        for p in np.unique(items["patient"][idx]):
            assert owner.setdefault(p, name) == name, "a patient crosses splits"
        assert set(items["labels"][idx].tolist()) == set(range(11))
    frac = [len(splits[s]) / 600 for s in synth.SPLITS]
    assert abs(frac[0] - 0.53) < 0.06 and abs(frac[1] - 0.09) < 0.04 and abs(frac[2] - 0.38) < 0.06
    for n in range(33, 80):  # smallest sets: every class still in every split
        items, splits = synth._organ_items(n, seed=n)
        assert all(set(items["labels"][idx].tolist()) == set(range(11)) for idx in splits.values()), n
    labels = np.arange(900) % 9
    crc = synth._stratified(labels, synth.CRC_FRACTIONS, np.random.default_rng(0))
    assert [len(crc[s]) for s in synth.SPLITS] == [639, 126, 135]


def test_deterministic(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_synthetic(tmp_path / name, organs=33, crc=27, size=SIZE, seed=seed, which=("organs", "crc"))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 24 and files == sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    h5 = Path("synthetic_crc/images.hdf5")
    assert (tmp_path / "a" / h5).read_bytes() != (tmp_path / "c" / h5).read_bytes()


def test_which_and_real_ids(tmp_path):
    ids = make_synthetic(tmp_path, organs=33, size=SIZE, which=("organs",), ids="real")
    assert ids == ["organs_axial", "organs_coronal", "organs_sagittal"]
    from mimeta import MIMeta, get_available_datasets

    MIMeta._infos = None
    assert sorted(get_available_datasets(str(tmp_path))) == ids
    assert MIMeta.get_info_dict(str(tmp_path), "organs_axial")["synthetic"] is True
    with pytest.raises(UserError):
        make_synthetic(tmp_path, which=("liver",))


def test_overwrite_refused_then_allowed(tmp_path):
    make_synthetic(tmp_path, organs=33, size=SIZE, seed=0, which=("organs",))
    before = (tmp_path / ORGAN_IDS[0] / "images.hdf5").read_bytes()
    with pytest.raises(UserError, match="already exist"):
        make_synthetic(tmp_path, organs=33, size=SIZE, seed=1, which=("organs",))
    assert (tmp_path / ORGAN_IDS[0] / "images.hdf5").read_bytes() == before
    make_synthetic(tmp_path, organs=33, size=SIZE, seed=1, which=("organs",), overwrite=True)
    assert (tmp_path / ORGAN_IDS[0] / "images.hdf5").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ORGAN_IDS)


def _tiny(n: int = 6) -> tuple[np.ndarray, list[TaskSpec], dict]:
    task = TaskSpec("a task", "MULTICLASS_CLASSIFICATION", {0: "x", 1: "y"}, np.arange(n) % 2)
    return np.zeros((n, 8, 8), np.uint8), [task], {"train": np.arange(4), "test": np.arange(4, n)}


@pytest.mark.parametrize("victim", ["_write_hdf5", "write_yaml"])
def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch, victim):
    images, tasks, splits = _tiny()
    write_mimeta_dataset(tmp_path, "old", images, tasks, splits)
    old = {p.name: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise RuntimeError("injected crash")

    monkeypatch.setattr(mimeta_format, victim, boom)
    for did in ("new", "old"):
        with pytest.raises(RuntimeError, match="injected"):
            write_mimeta_dataset(tmp_path, did, images + 1, tasks, splits, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"], "half dataset or temp folder left"
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()} == old


def test_writer_rejects_bad_input(tmp_path):
    images, tasks, splits = _tiny()
    with pytest.raises(ValueError, match="uint8"):
        write_mimeta_dataset(tmp_path, "d", images.astype(np.float32), tasks, splits)
    with pytest.raises(ValueError, match="disjoint"):
        write_mimeta_dataset(tmp_path, "d", images, tasks, {"train": [0, 1], "test": [1, 2]})
    with pytest.raises(ValueError, match="may not set"):
        write_mimeta_dataset(tmp_path, "d", images, tasks, splits, {"input_size": [1, 2, 2]})
    d = write_mimeta_dataset(tmp_path, "d", images, tasks, splits, {"name": "D", "domain": "Test"})
    assert not (d / "splits" / "val.txt").exists()  # empty split: no file, like the official writer
    assert yaml.safe_load((d / "info.yaml").read_text())["splits_num_samples"] == {
        "train": 4,
        "val": 0,
        "test": 2,
    }
    assert (d / "task_labels" / "a task.npy").exists()


def test_organs_learnable_but_not_trivial():
    """Logistic regression on raw pixels is clearly above chance (1/11) and far from perfect; mean
    intensity alone is near chance. Measured at 32 px, 231 items: 0.51 and 0.13 (600 items: 0.56
    and 0.12, while a small supervised CNN reaches ~0.9: the structure is learnable)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    items, splits = synth._organ_items(231, seed=0)
    x = synth._organ_plane(items, "axial", SIZE, np.random.default_rng(0)).reshape(231, -1) / 255.0
    y = items["labels"]
    tr, te = np.concatenate([splits["train"], splits["val"]]), splits["test"]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-3
    with threadpool_limits(1):  # multi-threaded BLAS on a busy 2-core box makes lbfgs 50x slower
        clf = LogisticRegression(C=0.01, max_iter=500).fit((x[tr] - mu) / sd, y[tr])
        m = x.mean(1, keepdims=True)
        acc_mean = LogisticRegression(max_iter=500).fit(m[tr], y[tr]).score(m[te], y[te])
    acc = clf.score((x[te] - mu) / sd, y[te])
    print(f"raw-pixel LR {acc:.3f}, mean-intensity LR {acc_mean:.3f} (chance {1 / 11:.3f}, n_test {len(te)})")
    assert 0.25 < acc < 0.9
    assert acc_mean < 0.3
