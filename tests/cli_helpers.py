"""Shared by the user-error suites: run the real CLI entry and check the one-line error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl_cli.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out + cap.err


def one_error_line(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI; assert exit code 2, exactly one line, starting with 'error:', holding ``needles``."""
    code, out = run_cli(args, capsys)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, out
    assert "Traceback" not in out, out
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for needle in needles:
        assert needle in lines[0], out
    return lines[0]


def fake_run(root: Path, name: str = "pre", stage: str = "pretrain", recipe: str | None = "{}\n") -> Path:
    """A finished run directory with only run.json (+ recipe.yaml unless ``recipe`` is None)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"stage": stage, "status": "finished", "started": "x"}))
    if recipe is not None:
        (d / "recipe.yaml").write_text(recipe)
    return d
