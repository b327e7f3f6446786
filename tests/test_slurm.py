"""SLURM: the sbatch scripts run to completion in a faked one-task job, and a SIGUSR1 stop checkpoints,
requeues and resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medssl_cli.commands.common import build_recipe
from medssl_cli.runs import Run
from medssl_cli.runtime import checkpoint
from medssl_cli.stages import pretrain as stage

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
SCRIPTS = ("pretrain.sbatch", "pretrain-multinode.sbatch", "finetune-grid.sbatch")
TINY = """\
data:
  datasets: [synthetic_organs_axial, synthetic_organs_coronal, synthetic_organs_sagittal]
  image_size: 32
model: {projector: [64, 64]}
pretrain: {epochs: EPOCHS, batch_size: 32, lr: 0.001, warmup_epochs: 1, checkpoint_every: 1}
compute: {precision: fp32, threads: 1, device: cpu}
"""


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def job(tmp_path: Path, synth_root: Path) -> dict[str, str]:
    """Environment of a one-task SLURM job, with stub srun/scontrol/medssl first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its options (the scripts write them as --opt=value), run the command as the one task
    _stub(bin_dir / "srun", 'while [[ "${1:-}" == -* ]]; do shift; done\nexec "$@"\n')
    _stub(bin_dir / "scontrol", f'echo "$@" >> "{tmp_path}/scontrol.calls"\n')
    _stub(bin_dir / "medssl", f'exec "{sys.executable}" -m medssl_cli.cli "$@"\n')
    (tmp_path / "tiny.yaml").write_text(TINY.replace("EPOCHS", "1"))
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_CPUS_PER_TASK": "1",
        "MEDSSL_DATA": str(synth_root),
        "MEDSSL_RUNS": str(tmp_path / "runs"),
        "MEDSSL_RECIPE": str(tmp_path / "tiny.yaml"),
        "MEDSSL_NO_PROGRESS": "1",
    }


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_scripts_parse_and_ask_for_the_warning_signal_and_requeue() -> None:
    for name in SCRIPTS:
        path = SLURM / name
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text, name
        assert "srun --kill-on-bad-exit=1" in text, name


@pytest.mark.slow  # starts processes
def test_pretrain_scripts_then_grid_script_in_a_faked_job(job: dict[str, str], tmp_path: Path) -> None:
    _run(["bash", str(SLURM / "pretrain.sbatch")], job, tmp_path)
    run = Run(tmp_path / "runs" / "pretrain-4242")
    info = run.manifest
    assert info["status"] == "finished", info
    assert info["distributed"]["launcher"] == "slurm" and info["distributed"]["world_size"] == 1
    assert run.file("weights", "backbone.safetensors").is_file() and run.file("log.txt").is_file()

    # A requeued copy of the finished job: the same command finds the finished run and does nothing.
    before = run.file("weights", "backbone.safetensors").stat().st_mtime_ns
    _run(["bash", str(SLURM / "pretrain.sbatch")], job, tmp_path)
    assert run.file("weights", "backbone.safetensors").stat().st_mtime_ns == before

    multi = {**job, "SLURM_JOB_ID": "4343", "SLURM_JOB_NODELIST": "localhost,nohost[1-3]"}
    _run(["bash", str(SLURM / "pretrain-multinode.sbatch")], multi, tmp_path)
    assert Run(tmp_path / "runs" / "pretrain-4343").status == "finished"

    grid_env = {**job, "SLURM_JOB_ID": "4400", "SLURM_ARRAY_JOB_ID": "4399", "SLURM_ARRAY_TASK_ID": "0",
                "MEDSSL_FROM": str(run.path),
                "MEDSSL_GRID_ARGS": "--init ssl --mode linear --fraction 1 --seeds 0,1"}  # fmt: skip
    _run(["bash", str(SLURM / "finetune-grid.sbatch")], grid_env, tmp_path)
    grid = Run(tmp_path / "runs" / "finetune-4399")
    assert grid.manifest["stage"] == "finetune" and len(grid.manifest["cells"]) == 2
    metrics = list(grid.path.glob("cells/*/metrics.json"))
    assert len(metrics) == 1 and "val" in json.loads(metrics[0].read_text())  # cell 0 only
    assert not (tmp_path / "scontrol.calls").exists()  # nothing failed: no requeue


@pytest.mark.slow  # starts processes
def test_sigusr1_checkpoints_requeues_and_the_same_command_resumes(
    job: dict[str, str], tmp_path: Path
) -> None:
    """What a SLURM time limit does: SIGUSR1 mid-run -> checkpoint, `interrupted`, scontrol requeue,
    exit 138; the requeued job's identical command resumes and ends with the uninterrupted weights."""
    (tmp_path / "tiny.yaml").write_text(TINY.replace("EPOCHS", "6"))
    run_dir = tmp_path / "runs" / "pretrain-4242"
    cmd = [sys.executable, "-m", "medssl_cli.cli", "pretrain", "--recipe", str(tmp_path / "tiny.yaml"),
           "--run-dir", str(run_dir), "--requeue"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=job, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    history = run_dir / "history.jsonl"
    deadline = time.monotonic() + 300
    while not (history.is_file() and history.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # after epoch 1 of 6: 15 steps still to go
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, output
    assert "Stopped by SIGUSR1" in output and "checkpoint written" in output

    info = Run(run_dir).manifest
    assert info["status"] == "interrupted" and info["stop_signal"] == "SIGUSR1", info
    assert info["requeue"] == "requeued job 4242"
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    latest = checkpoint.latest(run_dir / "checkpoint")
    assert latest is not None and json.loads(latest.read_text())["step"] == info["stop_step"]
    assert 3 <= info["stop_step"] < 18

    # The requeued job runs the same command: it resumes from the checkpoint.
    again = _run(cmd, job, tmp_path)
    assert Run(run_dir).status == "finished", again.stdout + again.stderr
    assert "Resumed from step-" in (run_dir / "log.txt").read_text()

    threads = torch.get_num_threads()
    try:
        ref = stage.pretrain(build_recipe(tmp_path / "tiny.yaml", {}), data_dir=job["MEDSSL_DATA"],
                             runs_root=tmp_path / "ref")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(ref.file("weights", "backbone.safetensors")))
    b = load_file(str(run_dir / "weights" / "backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on the CPU
    losses = [[h["loss"] for h in map(json.loads, r.joinpath("history.jsonl").read_text().splitlines())]
              for r in (ref.path, run_dir)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 6


def _grid_job(tmp_path: Path, medssl_body: str) -> tuple[dict[str, str], Path]:
    """A grid array task whose `medssl` is a stub (its exit code is what the script acts on)."""
    bin_dir = tmp_path / "stubbin"
    bin_dir.mkdir()
    _stub(bin_dir / "srun", 'while [[ "${1:-}" == -* ]]; do shift; done\nexec "$@"\n')
    _stub(bin_dir / "scontrol", f'echo "$@" >> "{tmp_path}/scontrol.calls"\n')
    _stub(bin_dir / "medssl", medssl_body)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4400",
           "SLURM_ARRAY_JOB_ID": "4399", "SLURM_ARRAY_TASK_ID": "0",
           "MEDSSL_RUNS": str(tmp_path / "runs")}  # fmt: skip
    return env, tmp_path / "scontrol.calls"


def _grid_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = str(SLURM / "finetune-grid.sbatch")
    return subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("rc,requeued", [(1, True), (143, True), (2, False), (130, False), (0, False)])
def test_grid_script_requeues_failures_but_not_user_errors_or_sigint(
    tmp_path: Path, rc: int, requeued: bool
) -> None:
    env, calls = _grid_job(tmp_path, f"exit {rc}\n")
    out = _grid_script(env)
    assert out.returncode == rc, out.stdout + out.stderr
    assert calls.exists() == requeued
    assert not requeued or calls.read_text().split() == ["requeue", "4400"]
    bad = _grid_script({**env, "MEDSSL_MAX_RESTARTS": "x"})
    assert bad.returncode == 2 and "MEDSSL_MAX_RESTARTS" in bad.stderr


def test_grid_script_survives_sigterm_and_requeues(tmp_path: Path) -> None:
    """SLURM's SIGTERM reaches the batch shell too: it must wait for the cell, then requeue."""
    import signal
    import time

    started = tmp_path / "started"
    env, calls = _grid_job(tmp_path, f"trap 'sleep 1; exit 143' TERM\ntouch {started}\nsleep 30 & wait\n")
    proc = subprocess.Popen(["bash", str(SLURM / "finetune-grid.sbatch")], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for _ in range(100):
        if started.exists():
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # like SLURM: every process of the job
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert calls.read_text().split() == ["requeue", "4400"], out
