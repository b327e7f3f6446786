"""Hostile environments and options: stray launcher variables, over-long names, unbounded resources.

Each ends in one UserError line (exit 2 through the CLI), at once: never a traceback, never a
silent half hour waiting for peers that are not coming.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line

from medssl_cli.errors import UserError
from medssl_cli.runtime import distributed, launch
from medssl_cli.runtime.launch import detect


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT='99999'"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
        ({"RANK": "5", "WORLD_SIZE": "2"}, "rank 5 (local 0) of 2"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "many"}, "SLURM_NTASKS='many'"),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, "rank 3"),
    ],
)
def test_malformed_launcher_variables_are_one_line(env: dict[str, str], needle: str) -> None:
    with pytest.raises(UserError, match="MEDSSL_DIST=off") as err:
        detect(env)
    assert needle in str(err.value)


def test_cli_with_a_stray_non_numeric_world_size(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "abc")
    one_error_line(
        ["pretrain", "--datasets", "axial", "--data-dir", str(tmp_path), "--runs-root", str(tmp_path)],
        capsys,
        "WORLD_SIZE='abc'",
    )


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_bad_timeouts_are_one_line(monkeypatch, value: str) -> None:
    monkeypatch.setenv("MEDSSL_DIST_JOIN_TIMEOUT", value)
    with pytest.raises(UserError, match="MEDSSL_DIST_JOIN_TIMEOUT"):
        launch.env_minutes("MEDSSL_DIST_JOIN_TIMEOUT", 5)


def test_world_size_two_without_a_peer_gives_up_with_one_line(monkeypatch, port: int) -> None:
    """A stray RANK=0 WORLD_SIZE=2 (no torchrun agent, no second process) waited 30 silent minutes;
    now the wait is said at once and bounded by MEDSSL_DIST_JOIN_TIMEOUT."""
    monkeypatch.setenv("MEDSSL_DIST_JOIN_TIMEOUT", "0.05")  # 3 s
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    d = detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    t0 = time.monotonic()
    said: list[str] = []
    monkeypatch.setattr(distributed.LOG, "info", lambda msg, *a, **k: said.append(msg))
    with pytest.raises(UserError, match="did not all meet") as err:
        with distributed.session(d, torch.device("cpu")):
            pytest.fail("joined a process group without a peer")
    assert time.monotonic() - t0 < 60
    assert "MEDSSL_DIST_JOIN_TIMEOUT" in str(err.value)
    assert any("waiting up to 0.05 min for 2 ranks" in m for m in said)
    assert not torch.distributed.is_initialized()


def test_over_long_name_is_one_line_before_any_work(capsys, tmp_path: Path) -> None:
    long = "x" * 300  # 300 characters: mkdir failed with ENAMETOOLONG (a traceback) after loading data
    one_error_line(["pretrain", "--datasets", "nowhere", "--name", long, "--runs-root", str(tmp_path)],
                   capsys, "--name is 300 characters long", "at most 64")  # fmt: skip
    one_error_line(["finetune", "--from", str(tmp_path / "none"), "--name", long], capsys, "--name")
    assert list(tmp_path.iterdir()) == []
    from medssl_cli.recipe import Recipe
    from medssl_cli.runs import create_run

    assert create_run(tmp_path, "pretrain", Recipe(), name="y" * 64).path.name.startswith("pretrain-yyy")
    with pytest.raises(UserError, match="at most 64"):
        create_run(tmp_path, "pretrain", Recipe(), name="y" * 65)


@pytest.mark.parametrize(
    "key, value",
    [("data.ram_budget_gb", "nan"), ("data.ram_budget_gb", -1), ("compute.device_budget_gb", float("nan")),
     ("compute.device_budget_gb", "-0.5"), ("compute.threads", -2), ("data.ram_budget_gb", "inf")],
)  # fmt: skip
def test_nan_or_negative_resource_keys_are_refused(key: str, value: object) -> None:
    from medssl_cli.recipe import Recipe, override

    with pytest.raises(UserError, match=f"'{key}' must be a finite number >= 0"):
        override(Recipe(), {key: value})
    assert override(Recipe(), {key: 0}) is not None  # 0 is meaningful: stream / keep nothing on the device


def test_more_threads_than_cores_are_capped_with_a_warning(monkeypatch) -> None:
    from medssl_cli.runtime import compute

    said: list[str] = []
    monkeypatch.setattr(compute.LOG, "warning", lambda msg, *a, **k: said.append(msg))
    before = torch.get_num_threads()
    try:
        assert compute.configure_threads(1_000_000) == compute.cpu_count()
    finally:
        torch.set_num_threads(before)
    assert said and "1000000 is more than" in said[0]
