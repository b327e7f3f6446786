"""Distributed pretraining: launcher detection, and 2 gloo ranks == 1 process with the doubled batch."""

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
from safetensors.torch import load_file, save_file

from medssl_cli import lifecycle
from medssl_cli.barlowtwins.feed import epoch_order, rank_batch
from medssl_cli.errors import UserError
from medssl_cli.models import build_pretrain_net
from medssl_cli.recipe import Recipe, override
from medssl_cli.runs import Run, create_run
from medssl_cli.runtime import checkpoint, distributed, launch
from medssl_cli.runtime.launch import Dist, detect, expand_nodelist, tasks_per_node
from medssl_cli.stages import pretrain as stage

LAMBD = 0.0051
GLOBAL_BATCH = 16


# --------------------------------------------------------------------------------------------
# Environment detection


def test_expand_nodelist() -> None:
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("localhost") == ["localhost"]
    assert expand_nodelist("a[8-10],gpu-b2,c[1,3]") == ["a8", "a9", "a10", "gpu-b2", "c1", "c3"]
    assert expand_nodelist("n[098-100]") == ["n098", "n099", "n100"]
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    with pytest.raises(ValueError):
        expand_nodelist("node[a-b]")


def test_detect_torchrun_slurm_and_alone() -> None:
    assert detect({}) == Dist()
    tr = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "hostA", "MASTER_PORT": "1234"})  # fmt: skip
    assert (tr.rank, tr.world_size, tr.local_rank, tr.local_world_size) == (3, 8, 1, 4)
    assert (tr.launcher, tr.master_addr, tr.master_port, tr.is_main, tr.enabled) == (
        "torchrun", "hostA", 1234, False, True)  # fmt: skip
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]"}  # fmt: skip
    s = detect(slurm)
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size, s.launcher) == (5, 8, 1, 4, "slurm")
    assert (s.master_addr, s.master_port, s.job_id) == ("gpu07", 15000 + 4242, "4242")
    assert launch.slurm_port("12345678") == 15000 + 12345678 % 17000 < 32768  # below ephemeral ports
    assert detect({**slurm, "MASTER_ADDR": "ib-gpu07", "MASTER_PORT": "2000"}).master_addr == "ib-gpu07"
    assert detect({**slurm, "MEDSSL_DIST": "off"}).world_size == 1
    # The brief's faked single-task environment: one process, nothing to initialise.
    one = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
                  "SLURM_JOB_NODELIST": "localhost"})  # fmt: skip
    assert (one.world_size, one.launcher, one.master_addr, one.enabled) == (1, "slurm", "localhost", False)
    # The batch script itself (no srun step) must not wait for 8 ranks that never come.
    batch_shell = {k: v for k, v in slurm.items() if not k.startswith("SLURM_STEP")}
    with pytest.raises(UserError, match="not started by srun"):
        detect(batch_shell)


def test_rank_batches_partition_the_global_batch() -> None:
    order = epoch_order(100, seed=3, epoch=2)
    for s in range(3):
        parts = [rank_batch(order, s, 32, Dist(rank=r, world_size=4)) for r in range(4)]
        assert all(len(p) == 8 for p in parts)
        assert torch.equal(torch.cat(parts), order[s * 32 : (s + 1) * 32])
        assert torch.equal(rank_batch(order, s, 32, Dist()), order[s * 32 : (s + 1) * 32])


# --------------------------------------------------------------------------------------------
# 2 gloo ranks vs one process


def _net(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_pretrain_net(1, "replicate", [64, 64]).train().to(dtype)


def _views(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(GLOBAL_BATCH, 1, 32, 32, generator=g).to(dtype),
            torch.randn(GLOBAL_BATCH, 1, 32, 32, generator=g).to(dtype))  # fmt: skip


def _step(
    model: torch.nn.Module, net: torch.nn.Module, d: Dist, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One pretraining step (this rank's half of a fixed batch); returns the loss, the gradients and the
    state after the step (weights, BN running statistics), keys prefixed with the dtype."""
    v1, v2 = _views(dtype)
    idx = rank_batch(torch.arange(GLOBAL_BATCH), 0, GLOBAL_BATCH, d)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss, _, _ = stage.train_step(model, opt, v1[idx], v2[idx], LAMBD, False, d.world_size)
    out = {"loss": loss.reshape(1)}
    out.update({f"grad/{n}": p.grad for n, p in net.named_parameters()})
    out.update({f"state/{k}": v for k, v in net.state_dict().items()})
    tag = str(dtype).split(".")[-1]
    return {f"{tag}/{k}": v.detach().contiguous() for k, v in out.items()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "MEDSSL_DIST_TIMEOUT": "3"})  # fmt: skip
    d = detect()
    cpu = torch.device("cpu")
    with distributed.session(d, cpu):
        torch.set_num_threads(1)
        result = {}
        for dtype in (torch.float32, torch.float64):
            net = distributed.sync_batchnorm(_net(dtype), cpu)
            result.update(_step(distributed.wrap_ddp(net, d, cpu), net, d, dtype))
        save_file(result, f"{out}/rank{rank}.safetensors")

        # Setup errors: raised on every rank, with the failing rank's message.
        seen = {"agreed_signal": distributed.agree_signal(d, 10 if rank == 1 else 0)}
        seen["broadcast"] = distributed.from_main(d, lambda: f"made by rank {d.rank}")

        def bad_on_rank1() -> int:
            if d.rank == 1:
                raise UserError("images.hdf5 missing on node 2.", "Copy the data.")
            return 1

        def bad_on_rank0() -> int:
            raise UserError("runs root not writable.")

        for key, fn in (("check_all", lambda: distributed.check_all(d, bad_on_rank1)),
                        ("from_main", lambda: distributed.from_main(d, bad_on_rank0))):  # fmt: skip
            try:
                fn()
                seen[key] = "no error"
            except UserError as exc:
                seen[key] = exc.line()
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(seen))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _cat(d: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.cat([v.double().flatten() for k, v in sorted(d.items()) if k.startswith(prefix)])


@pytest.mark.slow  # starts processes
def test_two_gloo_ranks_equal_one_process_with_the_doubled_batch(tmp_path: Path, two_gloo_ranks) -> None:  # noqa: ANN001
    """2 ranks x 8 images (DDP, synchronised BN, all-reduced loss) == 1 process x 16 images.

    float64: loss, every gradient, the weights after an SGD step and the BN running statistics agree
    to 1e-5 (measured: 1.4e-7; the loss itself runs in float32). float32: the forward quantities (loss,
    BN statistics) agree to 1e-5 (measured 6e-7), the gradients to 3e-2 only (measured 2.5e-3): a
    float32 rounding difference can flip a ReLU or max-pool decision next to a tie, which moves a
    little gradient from one input to another (the forward stays continuous). One process on one
    rank's half is the control: it differs.
    """
    ranks = two_gloo_ranks(_worker, tmp_path, 600)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref: dict[str, torch.Tensor] = {}
        for dtype in (torch.float32, torch.float64):
            net = _net(dtype)
            ref.update(_step(net, net, Dist(), dtype))
        half_net = _net()  # control: one process on one rank's half, no synchronisation
        v1, v2 = _views(torch.float32)
        opt = torch.optim.SGD(half_net.parameters(), lr=0.1)
        half_loss, _, _ = stage.train_step(half_net, opt, v1[:8], v2[:8], LAMBD, False, 1)
    finally:
        torch.set_num_threads(threads)

    assert ranks[0].keys() == ranks[1].keys() == ref.keys()
    assert any(k.endswith("running_var") for k in ref)
    for r in ranks:
        for k in ref:
            if k.endswith("num_batches_tracked"):
                assert torch.equal(r[k], ref[k]), k
            elif k.startswith("float64/"):
                assert _rel(r[k], ref[k]) < 1e-5, k  # loss, gradients, weights after the step, BN stats
            elif "running_" in k or k.endswith("/loss"):
                assert _rel(r[k], ref[k]) < 1e-5, k
        assert _rel(_cat(r, "float32/grad/"), _cat(ref, "float32/grad/")) < 3e-2
        for k in ref:  # DDP keeps the ranks identical
            assert torch.equal(r[k], ranks[0][k]), k
    loss = float(ref["float32/loss"])
    assert abs(float(half_loss) - loss) > 1e-3 * abs(loss)  # the checks above can tell the difference

    for r in range(2):
        seen = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert seen["agreed_signal"] == 10 and seen["broadcast"] == "made by rank 0"
        assert "images.hdf5 missing on node 2" in seen["check_all"]
        assert "runs root not writable" in seen["from_main"]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["check_all"].startswith("rank 1: images.hdf5 missing")


def test_global_batchnorm_alone_is_batchnorm() -> None:
    """Without a process group (or in eval mode) the converted layers compute exactly as before."""
    torch.manual_seed(0)
    x = torch.randn(6, 1, 32, 32)
    a = _net()
    b = distributed.sync_batchnorm(_net(), torch.device("cpu"))
    assert any(isinstance(m, distributed.GlobalBatchNorm) for m in b.modules())
    assert a.state_dict().keys() == b.state_dict().keys()
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.eval()(x), b.eval()(x))


# --------------------------------------------------------------------------------------------
# Run directory and requeue


def _recipe(**extra: object) -> Recipe:
    return override(Recipe(), {"data.image_size": 32, "pretrain.epochs": 2, **extra})


def test_resolve_target(tmp_path: Path) -> None:
    r = _recipe()
    assert lifecycle.resolve_target("pretrain", r, None, None) == ("new", None)
    assert lifecycle.resolve_target("pretrain", r, None, tmp_path / "a") == ("new", str(tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    assert lifecycle.resolve_target("pretrain", r, None, tmp_path / "empty")[0] == "new"
    run = create_run(tmp_path, "pretrain", r, path=tmp_path / "job-7")
    assert lifecycle.resolve_target("pretrain", r, None, run.path) == ("resume", str(run.path))
    with pytest.raises(UserError, match=r"other settings \(pretrain.epochs differ\)"):
        lifecycle.resolve_target("pretrain", _recipe(**{"pretrain.epochs": 3}), None, run.path)
    with pytest.raises(UserError, match="is a pretrain run, not a finetune run"):
        lifecycle.resolve_target("finetune", r, None, run.path)
    with pytest.raises(UserError, match="either --resume"):
        lifecycle.resolve_target("pretrain", r, run.path, run.path)
    run.set_status("finished")
    assert lifecycle.resolve_target("pretrain", r, None, run.path) == ("finished", str(run.path))
    with pytest.raises(UserError, match="already finished"):
        lifecycle.resolve_target("pretrain", r, run.path, None)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not a medssl run"):
        lifecycle.resolve_target("pretrain", r, None, tmp_path / "junk")


def test_requeue_calls_scontrol_only_when_it_should(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.txt"
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    job = Dist(job_id="99")
    monkeypatch.setenv("PATH", str(stub.parent), prepend=os.pathsep)
    assert lifecycle.requeue(job, signal.SIGINT) == "not requeued (SIGINT)"
    assert lifecycle.requeue(Dist(), signal.SIGUSR1) == "not requeued (not a SLURM job)"
    assert lifecycle.requeue(Dist(rank=1, world_size=2, job_id="99"), signal.SIGUSR1) == "not rank 0"
    assert not log.exists()
    assert lifecycle.requeue(job, signal.SIGUSR1) == "requeued job 99"
    assert lifecycle.requeue(job, signal.SIGTERM) == "requeued job 99"
    assert log.read_text().splitlines() == ["requeue 99", "requeue 99"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert lifecycle.requeue(job, signal.SIGUSR1) == "not requeued (no scontrol)"
    assert lifecycle.exit_code(signal.SIGUSR1) == 138 and lifecycle.exit_code(signal.SIGTERM) == 143


# --------------------------------------------------------------------------------------------
# End to end: torchrun, 2 CPU processes


def _child_with_rank(parent: int, rank: int) -> int | None:
    """The pid of ``parent``'s child process whose environment has RANK=<rank> (a torchrun worker)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{parent}\n" not in status.read_text():
                continue
            env = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(status.parent.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_torchrun_two_ranks_stop_on_one_rank_and_resume_exactly(synth_root: Path, tmp_path: Path) -> None:
    """SIGUSR1 reaches rank 1 only: both ranks stop at the same step, rank 0 checkpoints; the same
    torchrun command resumes and ends with the weights of an uninterrupted 2-process run."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "data: {datasets: [synthetic_organs_axial, synthetic_organs_coronal, synthetic_organs_sagittal], "
        "image_size: 32}\nmodel: {projector: [64, 64]}\n"
        "pretrain: {epochs: 3, batch_size: 32, lr: 0.001, warmup_epochs: 1, checkpoint_every: 1}\n"
        "compute: {precision: fp32, threads: 1, device: cpu}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MEDSSL_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1", "MEDSSL_DIST_TIMEOUT": "5"}  # fmt: skip

    def torchrun(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "medssl_cli.cli", "pretrain", "--recipe", str(recipe), "--run-dir", str(run_dir),
                "--data-dir", str(synth_root)]  # fmt: skip

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        torchrun(stopped), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while not ((stopped / "history.jsonl").is_file() and (stopped / "history.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    pid = _child_with_rank(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output
    info = Run(stopped).manifest
    assert info["status"] == "interrupted" and info["stop_signal"] == "SIGUSR1", output[-3000:]
    assert info["distributed"]["world_size"] == 2 and info["distributed"]["backend"] == "gloo"
    latest = checkpoint.latest(stopped / "checkpoint")
    assert latest is not None and json.loads(latest.read_text())["step"] == info["stop_step"]
    assert (stopped / "log.rank1.txt").is_file()

    for run_dir in (stopped, tmp_path / "straight"):
        out = subprocess.run(torchrun(run_dir), env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        assert Run(run_dir).status == "finished"
    a = load_file(str(stopped / "weights" / "backbone.safetensors"))
    b = load_file(str(tmp_path / "straight" / "weights" / "backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "Resumed from step-" in (stopped / "log.rank1.txt").read_text()


def test_guarded_run_records_stop_failure_and_refuses_a_live_run(tmp_path: Path) -> None:
    from medssl_cli.runs import RunLock
    from medssl_cli.runtime.preempt import Interrupted

    run = create_run(tmp_path, "pretrain", _recipe(), path=tmp_path / "r")
    with RunLock(run.path), pytest.raises(UserError, match="in use by another process"):
        lifecycle.guarded_run(run, Dist(), lambda stop: None)
    assert run.status == "running"  # the live run is not marked failed

    def stop_at_step_5(stop: object) -> None:
        raise Interrupted(str(run.path), signal.SIGTERM, 5)

    with pytest.raises(Interrupted):
        lifecycle.guarded_run(run, Dist(), stop_at_step_5, requeue_job=True)
    info = run.manifest
    assert (info["status"], info["stop_signal"], info["stop_step"]) == ("interrupted", "SIGTERM", 5)
    assert info["requeue"] == "not requeued (not a SLURM job)"

    def crash(stop: object) -> None:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError):
        lifecycle.guarded_run(run, Dist(), crash)
    assert run.status == "failed" and run.manifest["error"] == "RuntimeError: CUDA out of memory"


def test_dist_off_keeps_the_slurm_job_id() -> None:
    """MEDSSL_DIST=off (one process in a batch script) is still a SLURM job: --requeue needs its id."""
    d = launch.detect({"MEDSSL_DIST": "off", "SLURM_JOB_ID": "7100", "SLURM_NTASKS": "4"})
    assert not d.enabled and d.job_id == "7100"


def test_stop_flag_keeps_sigint_over_requeue_signals() -> None:
    from medssl_cli.runtime.preempt import StopFlag

    f = StopFlag()
    f._handle(signal.SIGINT, None)
    f._handle(signal.SIGUSR1, None)  # a later time-limit warning does not turn a stop into a requeue
    f._handle(signal.SIGTERM, None)
    assert f.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        f._handle(signal.SIGINT, None)
    g = StopFlag()
    g._handle(signal.SIGUSR1, None)
    g._handle(signal.SIGINT, None)  # Ctrl-C after the warning: a graceful stop for good, not an abort
    assert g.signum == signal.SIGINT
