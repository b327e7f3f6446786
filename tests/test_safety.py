"""Nothing unsafe is loaded, every file is written atomically, and datasets above the budgets stream.

- A malicious pickle (its ``__reduce__`` would create a marker file) planted where medssl expects a
  checkpoint, weights, a feature cache or torchvision's ImageNet cache file is refused with one line
  (or, for a cache, ignored and rebuilt) and never executed: the marker stays absent. YAML python tags
  in a recipe or an ``info.yaml`` are refused the same way.
- Source checks: no ``torch.load`` without ``weights_only=True``, no unsafe YAML loader, no pickle; no
  file write outside ``medssl_cli/io.py`` except the listed lock/log/marker files.
- A RAM budget smaller than the dataset streams it from the memory map, one batch at a time, and still
  trains; the device budget decides whether images are copied to the device.
"""

from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_cli

from medssl_cli import models
from medssl_cli.io import read_json, write_json
from medssl_cli.recipe import Recipe, override
from medssl_cli.runs import Run
from medssl_cli.runtime import checkpoint

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medssl_cli"
AXIAL = "synthetic_organs_axial"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Evil:
    """Unpickling this runs ``open(marker, "w")``: the marker file proves code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, how: str = "torch") -> None:
    """A malicious pickle at ``path``: torch.save's zip format, or a plain pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"conv1.weight": Evil(marker)}
    if how == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def one_error(text: str) -> str:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The checks below can fail: loading these files the unsafe way does run the payload."""
    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    yaml.unsafe_load(f'!!python/object/apply:os.system ["touch {marker}"]')
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# Planted pickles


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, synth_root: Path) -> Path:
    """A pretrain run with a committed checkpoint, marked interrupted (resumable); cases copy it."""
    from medssl_cli.stages.pretrain import pretrain

    recipe = override(Recipe(), {
        "data.datasets": [AXIAL], "data.image_size": 32, "model.projector": [64, 64],
        "pretrain.epochs": 2, "pretrain.batch_size": 16, "pretrain.warmup_epochs": 1,
        "pretrain.checkpoint_every": 1, "compute.precision": "fp32", "compute.device": "cpu",
    })  # fmt: skip
    run = pretrain(recipe, data_dir=synth_root, runs_root=tmp_path_factory.mktemp("safety_runs"))
    run.set_status("interrupted")
    assert checkpoint.latest(run.file("checkpoint")) is not None
    return run.path


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-mismatch", "hash-forged"])
def test_planted_checkpoint_is_refused_without_executing(
    resumable: Path, tmp_path: Path, capsys, rehash: bool
) -> None:
    run = tmp_path / "run"
    shutil.copytree(resumable, run)
    marker = tmp_path / "pwned"
    (json_path,) = (run / "checkpoint").glob("step-*.json")
    tensors = json_path.with_suffix(".safetensors")
    plant(tensors, marker)
    if rehash:  # the attacker also rewrote the commit marker to match
        write_json(json_path, {**read_json(json_path), "sha256": checkpoint._sha256(tensors)})
    code, text = run_cli(["pretrain", "--resume", str(run)], capsys)
    assert code == 2
    line = one_error(text)
    assert ("is unreadable" if rehash else "is damaged") in line and tensors.stem in line
    assert not marker.exists()
    assert Run(run).status == "failed"  # not trained from scratch over the damaged checkpoint


def test_finetune_from_pickled_weights(make_fake_pretrain, tmp_path: Path, synth_root, capsys) -> None:
    runs = tmp_path / "runs"
    pre = make_fake_pretrain(runs).path
    marker = tmp_path / "pwned"
    plant(pre / "weights" / "backbone.safetensors", marker)
    argv = ["finetune", "--from", str(pre), "--runs-root", str(runs), "--data-dir", str(synth_root)]
    code, text = run_cli(argv, capsys)
    assert code == 2 and "is not a safetensors file" in one_error(text)
    assert not marker.exists()
    assert not list((tmp_path / "runs").glob("finetune-*"))  # refused before the grid was created


@pytest.mark.parametrize("hash_checked", [True, False], ids=["sha256-refuses", "weights-only-refuses"])
def test_imagenet_cache_pickle_is_refused(
    tmp_path: Path, synth_root, capsys, monkeypatch, hash_checked: bool
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "pwned"
    plant(models.imagenet_cache_path(), marker)
    if not hash_checked:  # a forged file name: only torch.load(weights_only=True) stands in the way
        monkeypatch.setattr(models, "_check_sha256", lambda p: "forged")
    argv = ["finetune", "--init", "imagenet", "--datasets", AXIAL, "--image-size", "32", "--device", "cpu",
            "--runs-root", str(tmp_path / "runs"), "--data-dir", str(synth_root)]  # fmt: skip
    code, text = run_cli(argv, capsys)
    assert code == 2
    line = one_error(text)
    assert ("is damaged" if hash_checked else "cannot be read (UnpicklingError)") in line
    assert not marker.exists()
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("finetune-*"))


def test_feature_cache_pickle_is_ignored_and_rebuilt(tmp_path: Path, synth_root, capsys) -> None:
    runs = tmp_path / "runs"
    argv = ["finetune", "--init", "random", "--datasets", AXIAL, "--image-size", "32", "--device", "cpu",
            "--runs-root", str(runs), "--data-dir", str(synth_root)]  # fmt: skip
    assert run_cli(argv, capsys)[0] == 0
    caches = sorted((runs / ".cache" / "features").glob("*.safetensors"))
    assert len(caches) == 2  # train and val features
    marker = tmp_path / "pwned"
    for p in caches:
        plant(p, marker, how="pickle")
    code, text = run_cli(argv, capsys)
    assert code == 0 and " ".join(text.split()).count("is unreadable; extracting again") == 2, text
    assert not marker.exists()
    for p in caches:  # rebuilt as real safetensors
        assert models.load_weights(p)[0]["features"].shape[0] > 0


def test_pickled_label_file_is_refused(tmp_path: Path, synth_root, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth_root / AXIAL, root / AXIAL)
    marker = tmp_path / "pwned"
    labels = np.empty(66, dtype=object)
    labels[:] = [Evil(marker)] * 66
    np.save(root / AXIAL / "task_labels" / "organ label.npy", labels, allow_pickle=True)
    argv = ["pretrain", "--datasets", AXIAL, "--image-size", "32", "--runs-root", str(tmp_path / "runs"),
            "--data-dir", str(root)]  # fmt: skip
    code, text = run_cli(argv, capsys)
    assert code == 2 and "organ label.npy is missing or unreadable" in one_error(text)
    assert not marker.exists()


PYTHON_TAG = '!!python/object/apply:os.system ["touch {marker}"]'


def test_yaml_python_tags_are_refused(tmp_path: Path, synth_root, capsys) -> None:
    marker = tmp_path / "pwned"
    tag = PYTHON_TAG.format(marker=marker)
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"pretrain:\n  epochs: {tag}\n")
    code, text = run_cli(["pretrain", "--recipe", str(recipe), "--data-dir", str(synth_root),
                          "--runs-root", str(tmp_path / "runs")], capsys)  # fmt: skip
    assert code == 2 and "uses the YAML tag" in one_error(text) and "refuses" in one_error(text)
    root = tmp_path / "data"
    shutil.copytree(synth_root / AXIAL, root / AXIAL)
    info = root / AXIAL / "info.yaml"
    info.write_text(info.read_text().replace("domain:", f"extra: {tag}\ndomain:", 1))
    code, text = run_cli(["pretrain", "--datasets", AXIAL, "--data-dir", str(root),
                          "--runs-root", str(tmp_path / "runs")], capsys)  # fmt: skip
    assert code == 2 and "info.yaml uses the YAML tag" in one_error(text)
    assert not marker.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --------------------------------------------------------------------------------------------
# Source checks


def _sources() -> list[tuple[str, ast.Module]]:
    files = sorted(PACKAGE.rglob("*.py"))
    return [(str(p.relative_to(REPO)), ast.parse(p.read_text(), str(p))) for p in files]


MODULES = {"torch", "yaml", "np", "numpy", "pickle", "json", "os", "h5py", "logging", "shutil"}
PICKLERS = {"pickle", "marshal", "dill", "joblib", "cloudpickle", "shelve"}
UNSAFE_YAML = {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
               "yaml.full_load_all"}  # fmt: skip


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function: ``torch.load``, ``open``, ``x.write_text`` -> ``*.write_text``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base in MODULES else f"*.{node.attr}"
    return "?"


def _kw(call: ast.Call, key: str) -> object:
    for k in call.keywords:
        if k.arg == key and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def unsafe_loads(sources: list[tuple[str, ast.Module]]) -> list[str]:
    bad = []
    for path, tree in sources:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in PICKLERS for n in names):
                    bad.append(f"{path}:{node.lineno}: imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            where = f"{path}:{node.lineno}: {name}"
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                bad.append(f"{where} without weights_only=True")
            if name in UNSAFE_YAML or (name.startswith("yaml.") and _kw(node, "Loader") is not None):
                bad.append(f"{where}: use yaml.safe_load")
            if name in {"np.load", "numpy.load"} and _kw(node, "allow_pickle") is not False:
                bad.append(f"{where} without allow_pickle=False")
    return bad


# Writes that are allowed outside io.py: (file, call) -> why.
ALLOWED_WRITES = {
    ("medssl_cli/runs.py", "open(a+)"): "RunLock's lock file (flock; no content)",
    ("medssl_cli/runs.py", "*.touch"): "writability probe of the runs root, deleted at once",
    ("medssl_cli/runs.py", "logging.FileHandler"): "the run's log.txt (a log, appended line by line)",
    ("medssl_cli/grids.py", "open(a+)"): "grid and cell lock files (flock; no content)",
    ("medssl_cli/grids.py", "*.touch"): "the empty .grid-claim marker",
    ("medssl_cli/grids.py", "os.open"): "the empty .grid-claim marker (O_EXCL)",
    ("medssl_cli/readout/features.py", "open(a+)"): "feature cache lock files (flock; no content)",
    ("medssl_cli/data/mimeta_format.py", "h5py.File(w)"): "_write_hdf5, called through io.write_with",
    ("medssl_cli/data/mimeta_format.py", "np.save"): "into an in-memory buffer, then io.write_bytes",
    ("medssl_cli/stages/embed.py", "np.savez"): "into an in-memory buffer, then io.write_bytes",
}
WRITERS = {"*.write_text", "*.write_bytes", "*.savefig", "*.to_csv", "*.tofile", "*.touch", "*.save_file",
           "save_file", "torch.save", "np.save", "np.savez", "np.savez_compressed", "numpy.save", "json.dump",
           "yaml.dump", "yaml.safe_dump", "pickle.dump", "os.open", "logging.FileHandler", "shutil.copy",
           "shutil.copyfile", "shutil.copy2"}  # fmt: skip


def raw_writes(sources: list[tuple[str, ast.Module]]) -> list[tuple[str, str, int]]:
    """(file, call, line) of every file write not made through medssl_cli.io (or a write_with callback)."""
    out = []
    for path, tree in sources:
        if path == "medssl_cli/io.py":
            continue
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if name == "open" or name == "h5py.File":
                given = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")]
                mode = "r" if not given else given[0].value if isinstance(given[0], ast.Constant) else "?"
                if not set(str(mode)) & set("wax+?"):
                    continue
                name = f"{name}({mode})"
            elif name not in WRITERS:
                continue
            if name in {"yaml.safe_dump", "yaml.dump"} and len(node.args) < 2 and not _kw(node, "stream"):
                continue  # returns a string
            up = parents.get(node)
            while up is not None and not isinstance(up, ast.Lambda):
                up = parents.get(up)
            wrapper = parents.get(up) if up is not None else None
            if isinstance(wrapper, ast.Call) and _name(wrapper.func).endswith("write_with"):
                continue  # io.write_with(path, lambda tmp: save_file(..., tmp)): atomic
            out.append((path, name, node.lineno))
    return out


def test_no_unsafe_loaders_in_the_package() -> None:
    import yaml

    from medssl_cli import io

    # io.load_yaml is the one yaml.load: its loader is a SafeLoader subclass (refuses duplicate keys)
    found = unsafe_loads(_sources())
    assert [f for f in found if not f.startswith("medssl_cli/io.py:")] == []
    assert len(found) <= 1 and issubclass(io._StrictLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError):
        io.load_yaml("!!python/object/apply:os.system ['true']", "x.yaml")
    planted = ast.parse("import torch, yaml, pickle\ntorch.load(p)\nyaml.load(t, Loader=yaml.FullLoader)\n")
    assert len(unsafe_loads([("x.py", planted)])) == 3  # the check sees what it is meant to


def test_every_file_write_goes_through_io() -> None:
    found = raw_writes(_sources())
    stray = [f"{p}:{line}: {name}" for p, name, line in found if (p, name) not in ALLOWED_WRITES]
    assert stray == [], "write through medssl_cli.io (write_json, write_with, ...): " + "; ".join(stray)
    planted = ast.parse(
        "from pathlib import Path\nPath(p).write_text('x')\nfig.savefig(p)\nwith open(p, 'w') as f: pass\n"
        "write_with(p, lambda t: fig.savefig(t))\nopen(p)\n"
    )
    assert [n for _, n, _ in raw_writes([("x.py", planted)])] == ["*.write_text", "*.savefig", "open(w)"]


# --------------------------------------------------------------------------------------------
# Resource guards


def test_tiny_ram_budget_streams_batches_and_trains(synth_root: Path, tmp_path: Path, monkeypatch) -> None:
    from medssl_cli.data import images
    from medssl_cli.data import pool as pool_module
    from medssl_cli.stages.pretrain import pretrain

    reads: list[int] = []
    real = images.read_images

    def spy(h5, idx, size, channels):  # noqa: ANN001, ANN202
        reads.append(len(idx))
        return real(h5, idx, size, channels)

    monkeypatch.setattr(images, "read_images", spy)
    monkeypatch.setattr(pool_module, "FINGERPRINT_SAMPLE", 4)  # the run's fingerprint reads 4 images once
    recipe = override(Recipe(), {
        "data.datasets": [AXIAL], "data.image_size": 32, "data.ram_budget_gb": 1e-6,
        "model.projector": [64, 64], "pretrain.epochs": 1, "pretrain.batch_size": 8,
        "compute.precision": "fp32", "compute.device": "cpu", "pretrain.rankme_samples": 16,
    })  # fmt: skip
    run = pretrain(recipe, data_dir=synth_root, runs_root=tmp_path)
    info = run.manifest
    assert info["status"] == "finished" and info["data"]["in_ram"] is False
    assert "images streamed" in run.file("log.txt").read_text()
    # one batch per read, never the whole split; RankMe reads its fixed sample (init and epoch 1)
    assert sorted(reads) == [4] + [8] * (33 // 8) + [16, 16]


def test_device_budget_decides_what_goes_to_the_device(synth_root: Path) -> None:
    from medssl_cli.barlowtwins.feed import BatchSource
    from medssl_cli.data.pool import load_pool

    pool = load_pool(synth_root, [AXIAL], ["train"], image_size=32, supervised=False)
    meta = torch.device("meta")  # stands in for an accelerator: no memory is used
    assert BatchSource(pool, meta, device_budget_gb=1.0).on_device  # 33 KB fits
    small = BatchSource(pool, meta, device_budget_gb=1e-9)
    assert not small.on_device and small.data is None
    assert small(torch.tensor([0, 5])).shape == (2, 1, 32, 32)  # gathered on the host per batch
    streamed = load_pool(synth_root, [AXIAL], ["train"], image_size=32, supervised=False, ram_budget_gb=1e-9)
    assert not streamed.images.in_ram and not BatchSource(streamed, meta, 1.0).on_device
