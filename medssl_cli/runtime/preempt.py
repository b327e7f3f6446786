"""Graceful stops: Ctrl-C, SIGTERM and SIGUSR1 (SLURM's warning before a time limit or preemption).

The first signal only sets a flag; the training loop finishes its current step, writes a checkpoint,
marks the run ``interrupted`` and raises ``Interrupted``. A second Ctrl-C stops at once (the last
committed checkpoint stays valid: checkpoints are atomic).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


# What a finetune grid keeps when it stops (cells have no checkpoints): stages/cell.py, full_ft.py.
GRID_KEPT = "finished cells are kept, unfinished ones run again from their start"


class Interrupted(Exception):
    """Training stopped on request; resume with the same run (``step`` goes into run.json's stop_step).

    ``kept``: what the stop kept, for the message; by default pretraining's checkpoint at ``step``.
    """

    def __init__(self, run_dir: str, signum: int, step: int, kept: str | None = None) -> None:
        self.run_dir = run_dir
        self.signum = signum
        self.step = step
        name = signal.Signals(signum).name if signum else "a stop request"
        what = f" at step {step}; checkpoint written" if kept is None else f"; {kept}"
        super().__init__(f"Stopped by {name}{what}. Resume: --resume {run_dir}")


class StopFlag:
    """Context manager that turns the signals above into a flag the training loop polls."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self.signum != signal.SIGINT:  # SIGINT (a stop for good) is not replaced by USR1/TERM (requeue)
            self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
