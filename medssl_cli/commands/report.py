"""`medssl report`: options -> ``stages.report.report`` (matplotlib loads lazily)."""

from __future__ import annotations

from pathlib import Path

import typer

from medssl_cli.commands import common
from medssl_cli.console import console


def report(
    from_grid: Path | None = typer.Option(
        None,
        "--from",
        help="Report one finetune grid (with its pretrain run and that run's t-SNE/kNN runs) "
        "instead of every run under the runs root.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: a new report-<name>-<stamp>/ run under the runs root)."
    ),
    runs_root: Path | None = common.RUNS_ROOT,
    name: str | None = common.NAME,
) -> None:
    """report.md, a self-contained report.html (figures embedded) and summary.json: pretraining,
    the label-efficiency comparison (mean ± std and 95% CI over seeds, test metrics), the
    accuracy-vs-fraction plot, t-SNE, confusion matrices, provenance, and every missing or failed run.
    """
    from medssl_cli.stages.report import report as run_report

    target = run_report(runs_root=common.runs_root(runs_root), from_grid=from_grid, out=out, name=name)
    console.print(f"Report: {target / 'report.html'}\n        {target / 'report.md'}", soft_wrap=True)
