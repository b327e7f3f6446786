"""Faults while writing: a full disk during any safetensors write is the documented one line, and no
library temporary file survives a kill (medssl serialises safetensors itself and renames atomically)."""

from __future__ import annotations

import errno
import pathlib
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from medssl_cli import io
from medssl_cli.errors import UserError
from medssl_cli.models import build_backbone, save_weights
from medssl_cli.runs import RunLock
from medssl_cli.runtime import checkpoint


@pytest.fixture()
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pathlib.Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:  # medssl's temporaries are '.<name>.<random>.tmp'
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") and "tmp" in p.name]


def test_disk_full_while_writing_weights_is_one_line(tmp_path: Path, full_disk: None) -> None:
    net = build_backbone(1)
    with pytest.raises(UserError, match="Disk full while writing .*backbone.safetensors") as exc:
        save_weights(tmp_path / "weights" / "backbone.safetensors", net, {"arch": "resnet18"})
    assert "\n" not in exc.value.line() and "resume" in exc.value.line()
    assert not (tmp_path / "weights" / "backbone.safetensors").exists() and _no_temporaries(tmp_path)


def test_disk_full_while_writing_a_checkpoint_is_one_line(tmp_path: Path, full_disk: None) -> None:
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(UserError, match="Disk full while writing"):
        checkpoint.save(tmp_path / "checkpoint", 3, net, opt, {}, {})
    assert _no_temporaries(tmp_path)


def test_library_errors_wrapping_enospc_count_as_disk_full() -> None:
    assert io.disk_full(SafetensorError("Error while serializing: IoError(Os { code: 28 }) (os error 28)"))
    assert io.disk_full(RuntimeError("[Errno 28] No space left on device"))
    assert not io.disk_full(SafetensorError("header too large"))
    assert not io.disk_full(OSError(errno.EACCES, "Permission denied"))


def test_safetensors_written_by_medssl_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    io.write_safetensors(tmp_path / "x.safetensors", t, {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"]) and _no_temporaries(tmp_path)


def test_run_lock_removes_stale_safetensors_temporaries(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    left = [tmp_path / "checkpoint" / ".tmpA1b2C3", tmp_path / ".recipe.yaml.x1y2z3.tmp"]
    for p in left:
        p.write_bytes(b"half")
    keep = tmp_path / "checkpoint" / ".tmpnotes"  # not safetensors' pattern (6 characters after .tmp)
    keep.write_bytes(b"user file")
    with RunLock(tmp_path):
        pass
    assert not any(p.exists() for p in left) and keep.exists()


def test_concurrent_evaluates_of_one_grid_lose_no_split(tmp_path: Path, monkeypatch) -> None:
    """Two evaluates (--split test, --split val) updating one cell at once: both splits survive."""
    import threading
    import time

    from medssl_cli.stages import evaluate as ev

    cell = tmp_path / "cells" / "c0" / "metrics.json"
    cell.parent.mkdir(parents=True)
    io.write_json(cell, {"val": {"accuracy": 0.5}})
    real = ev.read_json

    def slow_read(path):  # noqa: ANN001, ANN202 - widen the read-modify-write window
        data = real(path)
        time.sleep(0.3)
        return data

    monkeypatch.setattr(ev, "read_json", slow_read)
    threads = [
        threading.Thread(target=ev.record_cell_metrics, args=(tmp_path, cell, s, {"accuracy": a}, {}, {}))
        for s, a in (("test", 0.7), ("val", 0.6))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = io.read_json(cell)
    assert m["test"] == {"accuracy": 0.7} and m["val"] == {"accuracy": 0.6}
    assert set(m["evaluated"]) == {"test", "val"}
