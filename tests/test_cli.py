"""The CLI skeleton: fast --help without torch, version, data commands, one-line user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

from medssl_cli import __version__

REPO = Path(__file__).resolve().parents[1]


def test_help_does_not_import_torch_or_mimeta() -> None:
    code = (
        "import sys\nfrom medssl_cli.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('torch', 'mimeta', 'h5py', 'matplotlib', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    for sub in ("pretrain", "data"):
        out = subprocess.run(
            [sys.executable, "-c", code.replace("'--help'", f"'{sub}', '--help'")],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert "HEAVY []" in out.stdout, (sub, out.stdout + out.stderr)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(["--version"], capsys)
    assert code == 0 and __version__ in out


def test_data_synth_list_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(
        ["data", "synth", "--out", str(tmp_path), "--organs", "40", "--crc", "54", "--size", "32"], capsys
    )
    assert code == 0, out
    code, out = run_cli(["data", "list", "--data-dir", str(tmp_path)], capsys)
    assert code == 0 and "synthetic_organs_axial" in out and "synthetic_crc" in out
    code, out = run_cli(["data", "info", "synthetic_crc", "--data-dir", str(tmp_path)], capsys)
    assert code == 0 and "TUM" in out and "SYNTHETIC" in out
    code, out = run_cli(["data", "info", "synthetic_crk", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "Did you mean: synthetic_crc" in out and "Traceback" not in out


def test_missing_root_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(["data", "list", "--data-dir", str(tmp_path / "none")], capsys)
    assert code == 2 and "7884735" in out and "Traceback" not in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "--bogus"], "--bogus"),  # unknown option
        (["pretrain", "--epoch", "5"], "--epochs"),  # typo: the close option is named
        (["evaluate", "--k", "x"], "'--k'"),  # wrong type
        (["data", "info"], "Missing argument"),
    ],
)
def test_bad_options_are_one_line_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Typer's parser errors (typer >= 0.29 raises its own copy of click's) end like every user error."""
    code, out = run_cli(args, capsys)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in out and "Traceback" not in out, out
    assert lines[0].startswith("error:") and f"medssl {args[0]}" in out  # names the --help to read
