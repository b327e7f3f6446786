"""User errors from files, paths and list options: unreadable or damaged recipe / run / checkpoint files,
unwritable outputs, empty list items, synth sizes; each is one ``error:`` line and exit code 2.

Cases go through the real CLI entry (``medssl_cli.cli.main``) where that is cheap, else call the
function and expect a ``UserError``. Run directories are minimal fakes (run.json + recipe.yaml): every
case fails before any data or weights would be read. Read-only file systems are simulated by
monkeypatching (tests run as root, where chmod does not stop writes).
"""

from __future__ import annotations

import errno
import logging
import pathlib
from pathlib import Path

import pytest
from cli_helpers import fake_run, one_error_line, run_cli  # noqa: F401 - shared CLI helpers

from medssl_cli import lifecycle, runs
from medssl_cli.commands.common import csv
from medssl_cli.data import synth
from medssl_cli.errors import UserError
from medssl_cli.recipe import read_recipe_file
from medssl_cli.runtime import checkpoint


# ---------------------------------------------------------------------------------------- 1: recipe file
def test_recipe_file_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe garbage")
    one_error_line(
        ["pretrain", "--recipe", str(bad), "--runs-root", str(tmp_path)], capsys, str(bad), "UTF-8"
    )
    assert not list(tmp_path.glob("pretrain-*"))


def test_recipe_file_unreadable_or_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="is a directory"):
        read_recipe_file(tmp_path)
    f = tmp_path / "r.yaml"
    f.write_text("pretrain: {epochs: 1}\n")

    def denied(self: Path, *a: object, **k: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    with pytest.raises(UserError, match="unreadable"):
        read_recipe_file(f)


# ------------------------------------------------------------------------------- 2: parent's recipe.yaml
@pytest.mark.parametrize(
    ("recipe", "needles"),
    [
        (None, ("recipe.yaml", "missing")),
        ("data: [\n", ("recipe.yaml", "not valid YAML")),
        ("pretrain: {epoch: 3}\n", ("recipe.yaml", "pretrain.epoch")),
        ("- a\n", ("recipe.yaml", "not a mapping")),
        (b"\xff\xfe", ("recipe.yaml", "UTF-8")),
    ],
    ids=["missing", "invalid-yaml", "unknown-key", "not-a-mapping", "not-utf8"],
)
def test_parent_run_recipe_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: str | bytes | None, needles: tuple[str, ...]
) -> None:
    run = fake_run(tmp_path / "runs", recipe=recipe if isinstance(recipe, str | None) else "")
    if isinstance(recipe, bytes):
        (run / "recipe.yaml").write_bytes(recipe)
    line = one_error_line(
        ["tsne", "--from", str(run), "--runs-root", str(tmp_path / "runs")], capsys, *needles
    )
    assert str(run) in line  # the file is named
    with pytest.raises(UserError, match="recipe.yaml"):
        runs.Run(run).recipe()


# --------------------------------------------------------------------------- 3: run.json / checkpoint JSON
def test_run_json_not_an_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path / "runs")
    (run / "run.json").write_text("[]\n")
    one_error_line(
        ["tsne", "--from", str(run), "--runs-root", str(tmp_path / "runs")], capsys, "run.json", "damaged"
    )
    with pytest.raises(UserError, match="damaged"):
        runs.Run(run).manifest  # noqa: B018
    # a damaged run.json among others is no run: `--from` defaulting to the newest still works
    assert runs.list_runs(tmp_path / "runs") == []
    with pytest.raises(UserError, match="No finished pretrain run"):
        runs.find_latest(tmp_path / "runs", "pretrain")


def test_checkpoint_json_not_an_object(tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "step-000000004.safetensors").write_bytes(b"x")
    (ckpt / "step-000000004.json").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="is damaged"):
        checkpoint.latest(ckpt)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(UserError, match="is damaged"):
        checkpoint.load(ckpt / "step-000000004.json", net, opt, total_steps=10)


# ----------------------------------------------------------------------------------------- 4: report --out
@pytest.mark.parametrize("sub", ["", "sub"], ids=["file", "below-a-file"])
def test_report_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: str) -> None:
    fake_run(tmp_path / "runs")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = afile / sub if sub else afile
    one_error_line(["report", "--runs-root", str(tmp_path / "runs"), "--out", str(out)], capsys, str(out))
    assert afile.read_text() == "keep me"


def test_report_out_read_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_run(tmp_path / "runs")
    out = tmp_path / "ro" / "rep"
    _read_only(monkeypatch, tmp_path / "ro")
    one_error_line(
        ["report", "--runs-root", str(tmp_path / "runs"), "--out", str(out)], capsys, str(out), "not writable"
    )


# ------------------------------------------------------------------------------------------ 5: synth --out
def _read_only(monkeypatch: pytest.MonkeyPatch, where: Path) -> None:
    """Creating anything under ``where`` fails with EROFS, as on a read-only mount."""
    real = pathlib.Path.mkdir

    def mkdir(self: Path, *a: object, **k: object) -> None:
        if self == where or where in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


SYNTH = ["--organs", "33", "--crc", "27", "--size", "16"]


@pytest.mark.parametrize("sub", ["", "sub"], ids=["file", "below-a-file"])
def test_synth_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = afile / sub if sub else afile
    one_error_line(["data", "synth", "--out", str(out), *SYNTH], capsys, str(out), "file")
    assert afile.read_text() == "keep me"


def test_synth_out_read_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _read_only(monkeypatch, tmp_path / "ro")
    out = tmp_path / "ro" / "data"
    one_error_line(["data", "synth", "--out", str(out), *SYNTH], capsys, str(out), "not writable", "--out")


# ------------------------------------------------------------------------- 6: run directory not writable
def test_attach_log_run_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = runs.Run(fake_run(tmp_path))
    handlers = list(runs.LOG.handlers)
    (run.path / "log.txt").mkdir()  # opening the log fails (IsADirectoryError)
    with pytest.raises(UserError, match="is not writable"):
        runs.attach_log(run)

    def refuse(*a: object, **k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(logging, "FileHandler", refuse)
    with pytest.raises(UserError, match=r"not writable \(.*Read-only file system\)"):
        runs.attach_log(run, rank=1)
    before = (run.path / "run.json").read_text()
    with pytest.raises(UserError, match="not writable"), lifecycle.recording(run):
        pass
    assert (run.path / "run.json").read_text() == before  # nothing marked
    assert runs.LOG.handlers == handlers  # no handler left attached


# ----------------------------------------------------------------------------- 7: empty items in lists
@pytest.mark.parametrize(
    "args",
    [["--fraction", "0.5,,1"], ["--seeds", "0,,1"], ["--seeds", "0, ,1"]],
    ids=["fraction", "seeds", "seeds-space"],
)
def test_empty_list_item_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    line = one_error_line(
        ["finetune", *args, "--init", "random", "--runs-root", str(tmp_path)], capsys, args[1], "Empty item"
    )
    assert "--help" not in line
    assert not list(tmp_path.iterdir())


def test_list_spaces_still_accepted() -> None:
    assert csv(" 0.5 , 1 ") == ["0.5", "1"]
    assert csv("axial, coronal") == ["axial", "coronal"]
    with pytest.raises(UserError, match="Empty item"):
        csv("a,,b")


# ------------------------------------------------------------------------------------ 8: synth --size
def test_synth_size_upper_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    one_error_line(["data", "synth", "--out", str(out), "--size", "3000"], capsys, "3000", "--size 512")
    assert not out.exists()


def test_synth_memory_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "_available_memory", lambda: 100 * 2**20)  # 100 MiB left
    with pytest.raises(UserError, match="GiB of memory"):
        synth.make_synthetic(tmp_path / "data", organs=600, crc=900, size=256)
    assert not (tmp_path / "data").exists()
