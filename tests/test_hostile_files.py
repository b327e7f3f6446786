"""Hostile files written by medssl itself and then damaged or swapped: weights, checkpoints, run files.

Each case must end in one UserError naming the file (or, for the report, an entry under "Missing or
failed"), never a traceback, and never a silently wrong result (a checkpoint whose step lies beyond
the end must not mark a run finished without training).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medssl_cli.errors import UserError
from medssl_cli.io import read_json, write_json
from medssl_cli.models import load_weights, save_weights
from medssl_cli.readout import backbones
from medssl_cli.recipe import Recipe, override
from medssl_cli.runs import Run
from medssl_cli.runtime import checkpoint
from medssl_cli.runtime.preempt import Interrupted, StopFlag
from medssl_cli.stages import pretrain as stage

# --------------------------------------------------------------------------------------------
# Weights files: metadata that does not parse, NaN values


def _rewrite(path: Path, meta_changes: dict[str, str | None], nan: bool = False) -> None:
    state, meta = load_weights(path)
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    if nan:
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_weights(path, state, meta)


@pytest.mark.parametrize(
    "changes",
    [
        {"in_channels": "one"},
        {"in_channels": "7"},
        {"gray_mode": "sideways"},
        {"norm_mean": "not json"},
        {"norm_mean": "[0.5, 0.5]"},  # two values for one channel
        {"norm_std": "[0]"},
        {"norm_std": '["a"]'},
        {"norm_mean": "[NaN]"},
        {"datasets": "{"},
        {"datasets": "[1, 2]"},
        {"image_size": "big"},
        {"image_size": "-3"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_weights_with_unparsable_metadata_are_one_line(make_fake_pretrain, tmp_path: Path, changes) -> None:
    run = make_fake_pretrain(tmp_path, name="meta")
    path = run.file("weights", "backbone.safetensors")
    backbones.from_pretrain_run(run, 1)  # intact: loads
    _rewrite(path, changes)
    with pytest.raises(UserError, match="unreadable metadata") as err:
        backbones.from_pretrain_run(run, 1)
    assert str(path) in str(err.value) and next(iter(changes)) in str(err.value)


def test_weights_with_nan_values_are_refused(make_fake_pretrain, tmp_path: Path) -> None:
    run = make_fake_pretrain(tmp_path, name="nan")
    path = run.file("weights", "backbone.safetensors")
    _rewrite(path, {}, nan=True)
    with pytest.raises(UserError, match="NaN or infinite values in 1 tensor"):
        backbones.from_pretrain_run(run, 1)
    # a fine-tuned copy saved by medssl (from_file) is read through the same checks
    loaded = make_fake_pretrain(tmp_path, name="copy")
    b = backbones.from_pretrain_run(loaded, 1)
    saved = tmp_path / "ft.safetensors"
    save_weights(saved, b.module, {**b.metadata(), "in_channels": "1", "arch": "resnet18",
                                   "conv1_channels": "3", "gray_mode": "replicate"})  # fmt: skip
    assert backbones.from_file(saved, 1).key == b.key
    _rewrite(saved, {"data_channels": "many"})
    with pytest.raises(UserError, match="data_channels"):
        backbones.from_file(saved, 1)


# --------------------------------------------------------------------------------------------
# Checkpoints that pass the hash check but do not belong to this run

PLANES = ["synthetic_organs_axial", "synthetic_organs_coronal", "synthetic_organs_sagittal"]


def _tiny() -> Recipe:
    return override(
        Recipe(),
        {
            "data.datasets": PLANES,
            "data.image_size": 32,
            "model.projector": [64, 64],
            "pretrain.epochs": 2,
            "pretrain.batch_size": 32,
            "pretrain.warmup_epochs": 1,
            "pretrain.checkpoint_every": 1,
            "pretrain.rankme_every": 0,
            "compute.precision": "fp32",
        },
    )


@pytest.fixture(scope="module")
def interrupted(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain run stopped mid-way (status interrupted) with one committed checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    calls = {"n": 0}
    original = StopFlag.__bool__

    def stop_at_5(self: StopFlag) -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            self.signum = 10
            return True
        return False

    StopFlag.__bool__ = stop_at_5  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupted):
            stage.pretrain(_tiny(), data_dir=synth_root, runs_root=root)
    finally:
        StopFlag.__bool__ = original  # type: ignore[method-assign]
    (run_dir,) = root.iterdir()
    return run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _ckpt(run_dir: Path) -> Path:
    latest = checkpoint.latest(run_dir / "checkpoint")
    assert latest is not None
    return latest


def _rehash(json_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite the tensor file and store its hash, so the damage passes the hash check."""
    from medssl_cli.io import write_safetensors

    tpath = json_path.with_suffix(".safetensors")
    write_safetensors(tpath, tensors)
    meta = read_json(json_path)
    meta["sha256"] = hashlib.sha256(tpath.read_bytes()).hexdigest()
    write_json(json_path, meta)


def _edit_json(**changes: object):  # noqa: ANN202
    def edit(json_path: Path) -> None:
        meta = read_json(json_path)
        for k, v in changes.items():
            if v is ...:
                meta.pop(k, None)
            else:
                meta[k] = v
        write_json(json_path, meta)

    return edit


def _drop_key(json_path: Path) -> None:
    t = load_file(str(json_path.with_suffix(".safetensors")))
    del t[next(k for k in t if k.startswith("model/backbone.layer2"))]
    _rehash(json_path, t)


def _reshape(json_path: Path) -> None:
    t = load_file(str(json_path.with_suffix(".safetensors")))
    k = next(k for k in t if k.startswith("model/projector") and k.endswith("weight"))
    t[k] = torch.zeros(3, 3)
    _rehash(json_path, t)


def _drop_acc(json_path: Path) -> None:
    t = load_file(str(json_path.with_suffix(".safetensors")))
    _rehash(json_path, {k: v for k, v in t.items() if k != "extra/acc_loss"})


DAMAGE = {
    "step beyond the end": (_edit_json(step=10_000), "step 10000 outside"),
    "negative step": (_edit_json(step=-1), "step -1 outside"),
    "step not a number": (_edit_json(step="5"), "step '5' outside"),
    "no step": (_edit_json(step=...), "step None outside"),
    "rng not a mapping": (_edit_json(rng=[1, 2]), "field 'rng'"),
    "rng values wrong": (_edit_json(rng={"numpy": ["MT19937", [1], 0, 0, 0.0]}), "RNG state"),
    "acc_time missing": (_edit_json(acc_time=...), "field 'acc_time'"),
    "a model tensor missing": (_drop_key, "missing 1"),
    "a tensor of the wrong shape": (_reshape, "shape mismatches 1"),
    "a running sum missing": (_drop_acc, "counters"),
    "optimizer groups wrong": (_edit_json(optimizer={"param_groups": [], "scalars": {}}), "optimizer state"),
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_checkpoint_that_passes_the_hash_but_not_the_run_is_one_line(
    interrupted: Path, tmp_path: Path, what: str
) -> None:
    run_dir = _copy_run(interrupted, tmp_path / "run")
    damage, message = DAMAGE[what]
    damage(_ckpt(run_dir))
    with pytest.raises(UserError, match="Checkpoint .*step-") as err:
        stage.pretrain(_tiny(), resume=run_dir)
    assert message in str(err.value), str(err.value)
    info = Run(run_dir).manifest
    assert info["status"] != "finished" and not (run_dir / "weights" / "backbone.safetensors").exists()


def test_intact_checkpoint_still_resumes(interrupted: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(interrupted, tmp_path / "run")
    stage.pretrain(_tiny(), resume=run_dir)
    assert Run(run_dir).status == "finished"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


# --------------------------------------------------------------------------------------------
# Run files that parse but hold the wrong types: `medssl report` lists the run, never crashes

WRONG = ["x", [1], None, {"a": 1}, -5, 1e300, True]


def _key_paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            if len(prefix) < 2:
                out += _key_paths(v, (*prefix, k))
    return out


def _damaged_variants(root: Path) -> list[tuple[Path, tuple | None, object]]:
    variants: list[tuple[Path, tuple | None, object]] = []
    for f in sorted(root.rglob("*.json")):
        variants += [(f, None, whole) for whole in ([], "x", {})]
        variants += [(f, p, bad) for p in _key_paths(read_json(f)) for bad in WRONG]
    return variants


def _apply(f: Path, path: tuple | None, bad: object) -> None:
    data = read_json(f)
    if path is None:
        data = bad
    else:
        d = data
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = bad
    f.write_text(json.dumps(data))


def test_report_lists_damaged_run_files_instead_of_crashing(tmp_path: Path) -> None:
    """Every JSON file of a pretrain run, a grid and its cells, a kNN and a t-SNE run, each key down to
    depth 3 replaced by each wrong type in turn (every 3rd variant here: ~1,700): the report's layout
    never raises, every run is either reported or listed, and a run whose values crash the layout is
    listed as damaged. Without `screen` 290 of the 5,229 variants crashed the report."""
    from test_report import PLAN, make_grid, make_knn, make_pretrain, make_tsne

    from medssl_cli.stages import report as rep
    from medssl_cli.stages.report.collect import collect_root

    root = tmp_path / "runs"
    pre = make_pretrain(root, "pretrain-a-20260101-000000")
    make_grid(root, "finetune-a-20260101-000100", pre, PLAN)
    make_knn(root, "evaluate-knn-20260101-000200", pre, ["organs_axial"])
    make_tsne(root, "tsne-a-20260101-000300", pre)
    runs = sorted(p.name for p in root.iterdir())
    variants = _damaged_variants(root)
    assert len(variants) > 3000
    listed_damaged = 0
    for f, path, bad in variants[::3]:
        original = f.read_text()
        _apply(f, path, bad)
        try:
            col = rep.screen(collect_root(root))
            rep._trial(col)  # the whole collection lays out
            shown = {r["name"] for r in [*col.pretrain, *col.grids, *col.knn, *col.tsne]}
            problems = " ".join(f"{p['where']} {p['what']}" for p in col.problems)
            assert all(r in shown or r in problems for r in runs), (f, path, bad, problems)
            listed_damaged += "damaged" in problems
        finally:
            f.write_text(original)
    assert listed_damaged > 50


@pytest.mark.parametrize(
    "target, path",
    [
        ("evaluate-knn-20260101-000200/metrics.json", ("test", "accuracy")),
        ("finetune-a-20260101-000100/cells/ssl-linear-f0.1-s0/metrics.json", ("test", "accuracy")),
        ("pretrain-a-20260101-000000/run.json", ("metrics", "final_loss")),
        ("tsne-a-20260101-000300/metrics.json", ("tsne", "perplexity")),
        ("finetune-a-20260101-000100/run.json", ("cells",)),
    ],
)
def test_medssl_report_with_one_damaged_file_lists_it(tmp_path: Path, target: str, path: tuple) -> None:
    from test_report import PLAN, make_grid, make_knn, make_pretrain, make_tsne

    from medssl_cli.stages.report import report

    root = tmp_path / "runs"
    pre = make_pretrain(root, "pretrain-a-20260101-000000")
    make_grid(root, "finetune-a-20260101-000100", pre, PLAN)
    make_knn(root, "evaluate-knn-20260101-000200", pre, ["organs_axial"])
    make_tsne(root, "tsne-a-20260101-000300", pre)
    _apply(root / target, path, "x")
    out = report(runs_root=root, name="t")
    summary = read_json(out / "summary.json")
    damaged = [p for p in summary["missing_or_failed"] if "damaged" in p["what"]]
    assert [p["where"] for p in damaged] == [target.split("/")[0]], damaged
    assert "Missing or failed" in (out / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# Feature caches: checked by what they hold, not only their row count


def _cache_case(synth_root: Path, tmp_path: Path):  # noqa: ANN202
    from medssl_cli.data.pool import load_pool
    from medssl_cli.readout import features

    pool = load_pool(synth_root, ["synthetic_organs_axial"], ["val"], image_size=32)
    lb = backbones.random_init(1, "replicate", 0)
    cpu = torch.device("cpu")

    def get() -> features.FeatureSet:
        return features.cached(tmp_path, lb, pool, device=cpu, bf16=False, channels_last=False)

    return get


def _swap_tensor(path: Path, name: str, fn) -> None:  # noqa: ANN001
    from safetensors import safe_open

    from medssl_cli.io import write_safetensors

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    t = load_file(str(path))
    t[name] = fn(t[name])
    write_safetensors(path, t, meta)


def _swap_meta(path: Path, key: str, value: str) -> None:
    from safetensors import safe_open

    from medssl_cli.io import write_safetensors

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    write_safetensors(path, load_file(str(path)), {**meta, key: value})


CACHE_DAMAGE = {
    "NaN features": lambda p: _swap_tensor(p, "features", lambda f: f / 0),
    "other image rows": lambda p: _swap_tensor(p, "source_idx", lambda r: r.flip(0)),
    "one feature column": lambda p: _swap_tensor(p, "features", lambda f: f[:, :1].contiguous()),
    "float64 features": lambda p: _swap_tensor(p, "features", lambda f: f.double()),
    "metadata of another backbone": lambda p: _swap_meta(p, "backbone", "0123456789abcdef"),
    "metadata of other images": lambda p: _swap_meta(p, "images", "x"),
}  # fmt: skip


@pytest.mark.parametrize("what", list(CACHE_DAMAGE))
def test_a_feature_cache_that_does_not_match_is_rebuilt(synth_root: Path, tmp_path: Path, what: str) -> None:
    get = _cache_case(synth_root, tmp_path)
    first = get()
    assert not first.hit and get().hit
    CACHE_DAMAGE[what](first.path)
    again = get()  # before: served as long as the row count matched (NaN rows, a 1-wide matrix, ...)
    assert not again.hit and torch.equal(again.features, first.features)


# --------------------------------------------------------------------------------------------
# Stops and places: a second Ctrl-C is a stop, a read-only --grid-dir is named as such


def test_second_ctrl_c_marks_the_run_interrupted_and_it_resumes(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def second_ctrl_c(self: StopFlag) -> bool:  # what the handler raises on a second SIGINT
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(StopFlag, "__bool__", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        stage.pretrain(_tiny(), data_dir=synth_root, runs_root=tmp_path)
    monkeypatch.undo()
    (run_dir,) = tmp_path.iterdir()
    info = Run(run_dir).manifest
    assert info["status"] == "interrupted" and info["stop_signal"] == "SIGINT" and "error" not in info
    stage.pretrain(_tiny(), resume=run_dir)
    assert Run(run_dir).status == "finished"


def test_ctrl_c_inside_a_recorded_stage_is_interrupted_not_failed(tmp_path: Path) -> None:
    from medssl_cli.lifecycle import recording
    from medssl_cli.runs import create_run

    run = create_run(tmp_path, "evaluate", Recipe(), name="k")
    with pytest.raises(KeyboardInterrupt), recording(run):
        raise KeyboardInterrupt
    assert run.manifest["status"] == "interrupted" and "error" not in run.manifest


def test_read_only_grid_dir_is_named_as_grid_dir(
    make_fake_pretrain, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import pathlib

    from medssl_cli.stages.finetune import finetune

    pre = make_fake_pretrain(tmp_path / "runs", name="ro")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = pathlib.Path.mkdir

    def mkdir(self: Path, *a: object, **k: object) -> None:
        if self == ro or ro in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    ov = {"finetune.inits": ["random"], "finetune.fractions": [1.0], "finetune.seeds": [0]}
    with pytest.raises(UserError, match="--grid-dir .* cannot be created: .* not writable") as err:
        finetune(ov, from_run=pre.path, runs_root=tmp_path / "runs", grid_dir=ro / "grid", cell=0,
                 data_dir=synth_root)  # fmt: skip
    assert "--runs-root" not in str(err.value)
