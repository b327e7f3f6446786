"""`medssl demo`: synthetic data -> pretrain -> finetune grid -> evaluate -> tsne -> report."""

from __future__ import annotations

from pathlib import Path

import typer

from medssl_cli.commands import common
from medssl_cli.console import console


def demo(
    data_dir: Path = common.DATA_DIR,
    runs_root: Path = common.RUNS_ROOT,
    recipe: Path = typer.Option(
        None, "--recipe", help="Recipe for every stage (default: recipes/demo.yaml)."
    ),
    docs: Path = typer.Option(
        None, "--docs", help="Also copy the figures and the table the README shows here."
    ),
    imagenet: bool = typer.Option(
        False, "--imagenet", help="Add an ImageNet t-SNE panel (weights must be cached)."
    ),
) -> None:
    """Run the whole pipeline on synthetic MIMeta data (written if absent) and print the report's path."""
    from medssl_cli.stages.demo import demo as run_demo

    out = run_demo(
        data_dir=data_dir,
        runs_root=common.runs_root(runs_root),
        recipe_file=recipe,
        imagenet=imagenet,
        docs=docs,
    )
    console.print(f"Report: {out / 'report.html'} (and report.md, summary.json)")
