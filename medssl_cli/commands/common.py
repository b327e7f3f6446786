"""Option definitions and parsing shared by the stage commands (no torch imports here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medssl_cli.errors import UserError

RECIPE = typer.Option(None, "--recipe", help="YAML recipe file (defaults < recipe < CLI options).")
DATA_DIR = typer.Option(
    None, "--data-dir", help="MIMeta root (default: $MEDSSL_DATA, else ~/.local/share/medssl/mimeta)."
)
RUNS_ROOT = typer.Option(
    None, "--runs-root", help="Where run directories live (default: $MEDSSL_RUNS, else ./runs)."
)
NAME = typer.Option(None, "--name", help="Name part of the run directory.")
DEVICE = typer.Option(None, "--device", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
SEED = typer.Option(None, "--seed", help="Random seed.")


def csv(text: str | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c']; None stays None (= option not given).

    An empty item between two values ('a,,b') is refused rather than dropped: such a typo must not
    run a different list than the one meant. Leading or trailing commas ('a,b,') are dropped."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    while items and not items[-1]:
        items.pop()
    while items and not items[0]:
        items.pop(0)
    if not items:
        raise UserError(f"Empty list '{text}'.", "Give comma-separated values, e.g. axial,coronal.")
    if not all(items):
        raise UserError(
            f"Empty item in the list '{text}' (two commas in a row).",
            "Remove the extra comma (or put the missing value there).",
        )
    return items


def runs_root(value: Path | None) -> Path:
    from medssl_cli.runs import default_runs_root

    return value if value is not None else default_runs_root()


def build_recipe(recipe_file: Path | None, overrides: dict[str, Any]) -> Any:
    """Defaults < recipe file < CLI overrides (``None`` = not given): ``recipe.resolve`` without a parent."""
    from medssl_cli.recipe import resolve

    return resolve(recipe_file, overrides)
