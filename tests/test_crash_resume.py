"""Crashes lose nothing: SIGKILL at random points, resume, and get exactly what an uninterrupted run gets.

- Pretraining (subprocess ``python -m medssl_cli.cli pretrain``) is killed three times at random points
  chosen from its observed progress (mid-epoch, and while a checkpoint is being written), resumed each
  time with ``--resume RUN`` (the killed run still says ``running``: the lock tells it is dead), and its
  final weights and loss history equal an uninterrupted run's bitwise (CPU, fp32, one thread). A poller
  reads every checkpoint the run commits while it runs: ``checkpoint.latest`` never returns one that
  cannot be read.
- A finetune grid is killed inside a cell; ``medssl finetune --resume GRID`` re-runs only the missing
  cells (finished cells' files are not rewritten) and the results equal an uninterrupted grid's.
- A second process cannot resume a run that a live process holds; SIGTERM stops a run cleanly.

The random points come from a seed printed on failure (``CRASH_SEED`` reproduces one).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from medssl_cli.cli import main
from medssl_cli.errors import UserError
from medssl_cli.io import read_json, read_jsonl
from medssl_cli.runtime import checkpoint

REPO = Path(__file__).resolve().parents[1]
AXIAL = "synthetic_organs_axial"
ENV = {**os.environ, "MEDSSL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SEED = int(os.environ.get("CRASH_SEED", random.SystemRandom().randrange(10**6)))
TIMEOUT = 240.0  # per wait; generous for a loaded 2-core machine (never a timing assertion)

PRETRAIN_RECIPE = f"""
data: {{datasets: [{AXIAL}], image_size: 32}}
model: {{projector: [64, 64]}}
pretrain: {{epochs: 8, batch_size: 8, lr: 0.001, warmup_epochs: 1, checkpoint_every: 1}}
compute: {{precision: fp32, device: cpu, threads: 1}}
"""
FINETUNE_RECIPE = f"""
data: {{datasets: [{AXIAL}], image_size: 32}}
finetune: {{inits: [random], modes: [linear, full], fractions: [0.5, 1.0], seeds: [0],
           epochs: 3, batch_size: 16, c_grid: [0.1, 1.0]}}
compute: {{precision: fp32, device: cpu, threads: 1}}
"""


def cli(*args: str, log: Path) -> subprocess.Popen:
    """``medssl ARGS`` in a fresh process (output to ``log``)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "medssl_cli.cli", *args], cwd=REPO, env=ENV, stdout=out, stderr=out
        )


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, what: str, poll: float = 0.01) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what} (seed {SEED})")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (seed {SEED})")
        time.sleep(poll)


def sigkill(proc: subprocess.Popen, what: str) -> None:
    assert proc.poll() is None, f"the run ended before the kill {what} (seed {SEED})"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL


def finish(proc: subprocess.Popen, log: Path) -> None:
    code = proc.wait(TIMEOUT * 2)
    assert code == 0, f"exit {code} (seed {SEED}):\n{log.read_text()[-3000:]}"


def history_len(run: Path) -> int:
    try:
        return len(read_jsonl(run / "history.jsonl"))
    except (ValueError, FileNotFoundError):  # never expected: history is written atomically
        return -1


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CheckpointWatcher(threading.Thread):
    """Polls a checkpoint folder; every committed checkpoint it sees must be complete and loadable.

    Files are opened first and read afterwards: an open file stays readable after the run rotates it
    away, and since medssl renames complete files into place, an opened file is never half-written.
    """

    def __init__(self, ckpt_dir: Path) -> None:
        super().__init__(daemon=True)
        self.dir = ckpt_dir
        self.stop = threading.Event()
        self.verified: set[str] = set()
        self.problems: list[str] = []

    def run(self) -> None:
        listing: list[str] = []
        while not self.stop.is_set():
            now = sorted(p.name for p in self.dir.glob("step-*")) if self.dir.is_dir() else []
            if now != listing:
                listing = now
                self.check()
            time.sleep(0.005)

    def check(self) -> None:
        try:
            latest = checkpoint.latest(self.dir)
        except UserError as exc:
            self.problems.append(f"latest() refused the folder: {exc}")
            return
        if latest is None or latest.name in self.verified:
            return
        try:
            fj, ft = open(latest, "rb"), open(latest.with_suffix(".safetensors"), "rb")
        except FileNotFoundError:
            return  # rotated away between latest() and open(): a newer one is committed
        with fj, ft:
            meta, blob = json.loads(fj.read()), ft.read()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            self.problems.append(f"{latest.name}: hash mismatch")
            return
        try:
            tensors = load_bytes(blob)
        except Exception as exc:  # noqa: BLE001 - any failure is what we look for
            self.problems.append(f"{latest.name}: unreadable ({exc})")
            return
        assert any(k.startswith("model/") for k in tensors)
        self.verified.add(latest.name)


@pytest.mark.slow  # starts processes
def test_pretrain_killed_three_times_equals_uninterrupted(synth_root: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PRETRAIN_RECIPE)
    common = ["--recipe", str(recipe), "--data-dir", str(synth_root)]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    log = tmp_path / "killed.log"
    reference = cli("pretrain", *common, "--run-dir", str(ref), log=tmp_path / "ref.log")  # runs alongside
    watcher = CheckpointWatcher(run / "checkpoint")
    watcher.start()
    kills = []
    try:
        proc = cli("pretrain", *common, "--run-dir", str(run), log=log)
        # Kill 1: mid-run, a random moment of an epoch after the first one.
        wait_for(lambda: history_len(run) >= 1, proc, "epoch 1")
        epoch_s = read_jsonl(run / "history.jsonl")[-1]["time_s"]
        time.sleep(rng.uniform(0.0, 0.8) * epoch_s)
        sigkill(proc, "1")
        kills.append(("mid-epoch", history_len(run)))
        assert read_json(run / "run.json")["status"] == "running"  # a SIGKILL leaves no trace but this

        # Kill 2: while a checkpoint is being written (its temporary file exists).
        proc = cli("pretrain", "--resume", str(run), log=log)
        target = max(history_len(run), 1) + rng.randint(1, 2)  # >= 2: a committed checkpoint to resume
        wait_for(lambda: history_len(run) >= target, proc, f"epoch {target}")
        ckpt = run / "checkpoint"
        wait_for(lambda: any(ckpt.glob(".step-*.tmp")), proc, "a checkpoint write", poll=0.001)
        sigkill(proc, "2")
        kills.append(("writing a checkpoint", history_len(run)))

        # Kill 3: a random moment of the epoch after the one it resumed from.
        proc = cli("pretrain", "--resume", str(run), log=log)
        target = history_len(run) + 1
        wait_for(lambda: history_len(run) >= target, proc, f"epoch {target}")
        time.sleep(rng.uniform(0.0, 0.8) * epoch_s)
        sigkill(proc, "3")
        kills.append(("mid-epoch", history_len(run)))

        finish(cli("pretrain", "--resume", str(run), log=log), log)
        finish(reference, tmp_path / "ref.log")
    finally:
        watcher.stop.set()
        watcher.join()
        if reference.poll() is None:
            reference.kill()
    info = read_json(run / "run.json")
    assert info["status"] == "finished", info
    assert not watcher.problems, (watcher.problems, SEED)
    assert len(watcher.verified) >= 2, (watcher.verified, SEED)  # it did see checkpoints come and go
    for name in ("backbone", "projector"):
        a = load_file(str(ref / "weights" / f"{name}.safetensors"))
        b = load_file(str(run / "weights" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), (name, kills, SEED)
    keys = ("epoch", "step", "loss", "on_diag", "off_diag", "lr")
    rows = [[{k: h[k] for k in keys} for h in read_jsonl(d / "history.jsonl")] for d in (ref, run)]
    assert rows[0] == rows[1] and len(rows[0]) == 8, (kills, SEED)
    assert (run / "log.txt").read_text().count("Resumed from step-") >= 2, (kills, SEED)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")], "stale temporaries were left"
    print(f"crash seed {SEED}: kills {kills}; checkpoints verified while running: {sorted(watcher.verified)}")


def test_resume_without_any_checkpoint_restarts_history(synth_root: Path, tmp_path: Path) -> None:
    """Killed before the first checkpoint (history already has lines): the restart rewrites history."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PRETRAIN_RECIPE.replace("epochs: 8", "epochs: 1").replace("every: 1", "every: 5"))
    run = tmp_path / "run"
    args = ["pretrain", "--recipe", str(recipe), "--data-dir", str(synth_root), "--run-dir", str(run)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    first = read_jsonl(run / "history.jsonl")
    # What a kill after the epoch's history line, before the weights, leaves behind:
    info = read_json(run / "run.json")
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    for p in (run / "weights").iterdir():
        p.unlink()
    assert not (run / "checkpoint").exists() or not any((run / "checkpoint").iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--resume", str(run)])
    assert exc.value.code == 0
    again = read_jsonl(run / "history.jsonl")
    assert [h["epoch"] for h in again] == [1]
    assert [h["loss"] for h in again] == [h["loss"] for h in first]


def _cell_files(cell: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(cell)): (p.stat().st_mtime_ns, sha(p)) for p in cell.rglob("*") if p.is_file()}


@pytest.mark.slow  # starts processes
def test_finetune_grid_sigkill_resume_runs_only_missing_cells(synth_root: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(FINETUNE_RECIPE)
    common = ["--recipe", str(recipe), "--data-dir", str(synth_root), "--init", "random"]
    ref_grid, grid = tmp_path / "ref" / "grid", tmp_path / "runs" / "grid"
    log = tmp_path / "grid.log"
    reference = cli("finetune", *common, "--grid-dir", str(ref_grid), log=tmp_path / "ref.log")
    try:
        proc = cli("finetune", *common, "--grid-dir", str(grid), log=log)
        # Cells: 2 linear, then 2 full (3 epochs each). Kill inside full cell k after e of its epochs.
        k, e = rng.randint(0, 1), rng.randint(1, 2)
        names = [c["name"] for c in read_json_when(grid / "run.json", proc)["cells"]]
        victim = grid / "cells" / [n for n in names if "-full-" in n][k]
        wait_for(lambda: history_len(victim) >= e, proc, f"epoch {e} of {victim.name}")
        time.sleep(rng.uniform(0.0, 0.05))
        finished = {
            c: _cell_files(grid / "cells" / c)
            for c in names
            if (grid / "cells" / c / "run.json").is_file()
            and read_json(grid / "cells" / c / "run.json")["status"] == "finished"
        }
        sigkill(proc, f"in {victim.name}")
        assert victim.name not in finished and len(finished) >= 2, (finished.keys(), SEED)
        assert read_json(victim / "run.json")["status"] == "running"
        finish(cli("finetune", "--resume", str(grid), log=log), log)
        finish(reference, tmp_path / "ref.log")
    finally:
        if reference.poll() is None:
            reference.kill()
    assert read_json(grid / "run.json")["status"] == "finished"
    for c, files in finished.items():  # not rewritten, not even touched
        assert _cell_files(grid / "cells" / c) == files, c
    text = (grid / "log.txt").read_text()
    assert text.count("finished before, skipped") == len(finished)
    assert f"{victim.name}: previous attempt (running) removed" in text
    for c in names:
        a, b = ref_grid / "cells" / c, grid / "cells" / c
        assert read_json(a / "metrics.json")["val"] == read_json(b / "metrics.json")["val"], c
        for w in sorted(p.name for p in (a / "weights").iterdir()):
            ta, tb = load_file(str(a / "weights" / w)), load_file(str(b / "weights" / w))
            assert ta.keys() == tb.keys() and all(ta[x].equal(tb[x]) for x in ta), (c, w)
    assert not [p for p in grid.rglob("*") if p.name.endswith(".tmp")]


def read_json_when(path: Path, proc: subprocess.Popen) -> dict:
    wait_for(path.is_file, proc, str(path))
    return read_json(path)


@pytest.mark.slow  # starts processes
def test_live_run_lock_refuses_a_second_resume_and_sigterm_interrupts(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PRETRAIN_RECIPE.replace("epochs: 8", "epochs: 200"))
    run, log = tmp_path / "run", tmp_path / "run.log"
    args = ["--recipe", str(recipe), "--data-dir", str(synth_root), "--run-dir", str(run)]
    proc = cli("pretrain", *args, log=log)
    try:
        wait_for(lambda: history_len(run) >= 1, proc, "epoch 1")
        with pytest.raises(SystemExit) as exc:
            main(["pretrain", "--resume", str(run)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "in use by another process" in err and "Traceback" not in err
        assert read_json(run / "run.json")["status"] == "running"  # the refused process marked nothing
        proc.send_signal(signal.SIGTERM)  # preemption: finish the step, checkpoint, mark interrupted
        assert proc.wait(TIMEOUT) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    info = read_json(run / "run.json")
    assert info["status"] == "interrupted" and info["stop_signal"] == "SIGTERM"
    latest = checkpoint.latest(run / "checkpoint")
    assert latest is not None and read_json(latest)["step"] == info["stop_step"]
    assert "Resume: --resume" in log.read_text()


def test_ctrl_c_stops_a_grid_between_cells_and_resume_finishes_it(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medssl_cli.runtime.preempt import StopFlag

    calls = {"n": 0}

    def second_check_sees_ctrl_c(self: StopFlag) -> bool:
        calls["n"] += 1
        if calls["n"] >= 2:
            self.signum = signal.SIGINT
        return self.signum is not None

    grid = tmp_path / "grid"
    argv = ["finetune", "--init", "random", "--datasets", AXIAL, "--image-size", "32", "--device", "cpu",
            "--fraction", "0.5,1", "--data-dir", str(synth_root), "--grid-dir", str(grid)]  # fmt: skip
    monkeypatch.setattr(StopFlag, "__bool__", second_check_sees_ctrl_c)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    monkeypatch.undo()
    out = capsys.readouterr()
    assert exc.value.code == 130 and "Traceback" not in out.err
    assert f"Resume: --resume {grid}" in " ".join(out.err.split())
    info = read_json(grid / "run.json")
    assert info["status"] == "interrupted" and info["cells_finished"] == 1
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--resume", str(grid)])
    assert exc.value.code == 0 and read_json(grid / "run.json")["status"] == "finished"
