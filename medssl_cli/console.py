"""Terminal output: one rich console (stderr), the 'medssl' logger, and progress bars.

Stage functions log through ``logging.getLogger("medssl")``; the CLI shows those lines on the terminal
and ``runs.attach_log`` also writes them to the run's ``log.txt``. Progress bars show rate and ETA.
"""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)
LOG = logging.getLogger("medssl")


def setup_logging(verbose: bool = False) -> None:
    """Show the 'medssl' logger on the terminal (once)."""
    if not any(isinstance(h, RichHandler) for h in LOG.handlers):
        handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)
    LOG.propagate = False


def progress(unit: str = "samples") -> Progress:
    """A progress bar with count, rate (``unit``/s), elapsed time, ETA and a free ``info`` field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.1f} " + unit + "/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=os.environ.get("MEDSSL_NO_PROGRESS") == "1",
    )
