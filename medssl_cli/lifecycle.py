"""Runs that survive preemption and time limits: a stable run directory, rank-guarded training, requeue.

SLURM sends SIGUSR1 ``--signal=USR1@120`` seconds before the time limit, SIGTERM on preemption. The
training loop (``preempt.StopFlag``) finishes its step, rank 0 writes a checkpoint and marks the run
``interrupted``; with ``requeue`` (``--requeue``) and a SLURM job, rank 0 then runs ``scontrol requeue
$SLURM_JOB_ID``. The job starts again with the same command, and ``--run-dir DIR`` (fixed, e.g.
``runs/pretrain-$SLURM_JOB_ID``) makes that command continue the run: ``resolve_target``.

Exit codes of a stage command: 0 finished (or already finished), 2 a user error (one line, nothing
half-written), 128 + signal number when stopped by a signal after a checkpoint (130 Ctrl-C, 138
SIGUSR1, 143 SIGTERM), 1 a crash (traceback; the run is marked ``failed``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medssl_cli.errors import TrainingDiverged, UserError
from medssl_cli.recipe import Recipe, diff
from medssl_cli.runs import Run, RunLock, attach_log, detach_log
from medssl_cli.runtime import distributed
from medssl_cli.runtime.launch import Dist
from medssl_cli.runtime.preempt import Interrupted, StopFlag

LOG = logging.getLogger("medssl")
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # time-limit warning, preemption; never Ctrl-C


def exit_code(signum: int) -> int:
    """Exit code of a run stopped by a signal, as a shell reports it: 128 + signal number."""
    return 128 + signum if signum else 1


def requeue(d: Dist, signum: int) -> str:
    """``scontrol requeue $SLURM_JOB_ID`` (rank 0; SIGUSR1/SIGTERM in a SLURM job only). Returns what
    happened, for run.json and the log; never raises (a missing scontrol is logged and skipped)."""
    if not d.is_main:
        return "not rank 0"
    if signum not in REQUEUE_SIGNALS:
        return f"not requeued ({signal.Signals(signum).name if signum else 'no signal'})"
    if not d.job_id:
        return "not requeued (not a SLURM job)"
    exe = shutil.which("scontrol")
    if exe is None:
        LOG.warning("Requeue skipped: scontrol not found on PATH.")
        return "not requeued (no scontrol)"
    try:
        out = subprocess.run([exe, "requeue", d.job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOG.warning(f"scontrol requeue {d.job_id} failed: {exc}")
        return f"requeue failed ({exc})"
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip()
        LOG.warning(f"scontrol requeue {d.job_id} failed: {msg}")
        return f"requeue failed ({msg})"
    LOG.info(f"Requeued SLURM job {d.job_id}; the same command resumes from the run directory.")
    return f"requeued job {d.job_id}"


def resolve_target(
    stage: str, recipe: Recipe, resume: Path | str | None, run_dir: Path | str | None
) -> tuple[str, str | None]:
    """Which run a stage command means: ``("new", None)``; ``("new", dir)`` for an absent or empty
    ``--run-dir``; ``("resume", dir)`` for ``--resume DIR`` or a ``--run-dir`` holding an unfinished run
    of ``stage`` (interrupted, failed, or ``running`` after a kill: the run lock tells a live one) made
    with the same recipe; ``("finished", dir)`` for a ``--run-dir`` whose run finished. Else UserError."""
    if resume is not None and run_dir is not None:
        raise UserError("Pass either --resume RUN or --run-dir DIR, not both.")
    if resume is None and run_dir is None:
        return "new", None
    p = Path(run_dir if run_dir is not None else resume)  # type: ignore[arg-type]
    option = "--run-dir" if run_dir is not None else "--resume"
    if run_dir is not None and (not p.exists() or (p.is_dir() and not any(p.iterdir()))):
        return "new", str(p)
    info = Run(p).manifest  # UserError when there is no run.json
    if info.get("stage") != stage:
        raise UserError(f"{option} {p} is a {info.get('stage')} run, not a {stage} run.")
    if resume is not None:
        if info.get("status") == "finished":
            raise UserError(f"Run {p} already finished.", "Start a new run instead of --resume.")
        return "resume", str(p)
    changed = diff(Run(p).recipe(), recipe)
    if changed:
        raise UserError(
            f"--run-dir {p} holds a run with other settings ({', '.join(changed[:6])} differ).",
            "Repeat the original options, or pass a new --run-dir.",
        )
    if info.get("status") == "finished":
        return "finished", str(p)
    if info.get("status") == "failed":
        LOG.warning(f"Resuming {p}, which failed before: {info.get('error')}")
    return "resume", str(p)


def outcome(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """How a run ends on ``exc``, the one rule for every stage: (status, run.json fields saying why).

    A stop request (``Interrupted``: Ctrl-C, SIGTERM, SIGUSR1) and a second Ctrl-C (stop at once) are
    ``interrupted`` (resumable); anything else is ``failed`` with one error line."""
    if isinstance(exc, Interrupted):
        name = signal.Signals(exc.signum).name if exc.signum else None
        return "interrupted", {"stop_signal": name, "stop_step": exc.step}
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", {"stop_signal": "SIGINT", "stop_note": "Ctrl-C: stopped at once"}
    if isinstance(exc, TrainingDiverged):
        return "failed", {"error": "loss diverged (NaN/Inf)"}
    if isinstance(exc, UserError):
        return "failed", {"error": exc.line()}
    return "failed", {"error": f"{type(exc).__name__}: {exc}"}


@contextlib.contextmanager
def logging_to(run: Run, rank: int = 0) -> Iterator[Run]:
    """The block's log lines also go to the run's log.txt (log.rank<k>.txt on rank k > 0)."""
    handler = attach_log(run, rank)
    try:
        yield run
    finally:
        detach_log(handler)


@contextlib.contextmanager
def recording(run: Run, rank: int = 0) -> Iterator[Run]:
    """A single-process run in motion (a grid cell, an evaluate or t-SNE run): its log file, and its
    status on the way out by ``outcome``."""
    with logging_to(run, rank):
        try:
            yield run
        except BaseException as exc:
            status, fields = outcome(exc)
            run.set_status(status, **fields)
            raise


def guarded_run(run: Run, d: Dist, body: Callable[[StopFlag], None], requeue_job: bool = False) -> Run:
    """``body(stop)`` on every rank with the run's bookkeeping: rank 0 holds the run lock and writes the
    outcome to run.json (``outcome``; after a stop, the requeue); every rank logs to its own file
    (log.txt, log.rank<k>.txt). Barriers keep any rank from exiting before rank 0 committed."""
    with logging_to(run, d.rank), contextlib.ExitStack() as stack:
        # A second process on a live run is refused before anything is marked (on every rank).
        distributed.check_all(d, lambda: stack.enter_context(RunLock(run.path)) if d.is_main else None)
        try:
            with StopFlag() as stop:
                body(stop)
        except BaseException as exc:
            status, fields = outcome(exc)
            if d.is_main:
                run.set_status(status, **fields)
                if isinstance(exc, Interrupted) and requeue_job:
                    run.update(requeue=requeue(d, exc.signum))
            if isinstance(exc, Interrupted):
                distributed.barrier(d)  # srun --kill-on-bad-exit must not kill rank 0 mid-commit
            elif status == "failed" and d.enabled:
                LOG.error(f"rank {d.rank} failed: {fields['error']}")
            raise
    distributed.barrier(d)  # rank 0 wrote weights and status before any rank returns
    return run
