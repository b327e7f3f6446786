"""Who launched this process and where it stands: torchrun's or srun's environment, parsed.

``detect`` reads the launcher variables into a ``Dist`` (rank, world size, local rank, master address
and port); every variable is checked (one line naming it when it is not an integer in range), and
``MEDSSL_DIST=off`` ignores them all. SLURM's own strings (host lists, tasks per node, the job's
rendezvous port) are parsed by the pure functions below. The process group itself: ``distributed``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from typing import Any

import torch.distributed as tdist

from medssl_cli.errors import UserError, short


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compact host list -> host names: ``a[01-03,7],b2`` -> a01 a02 a03 a7 b2.

    Zero padding follows the range start (``[08-10]`` -> 08 09 10); several bracket groups in one name
    (``r[1-2]n[1-2]``) expand to their product, as ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text.strip()):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("["):
                values: list[str] = []
                for rng in part[1:-1].split(","):
                    lo, _, hi = rng.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise ValueError(f"bad SLURM node list {text!r}")
                    values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
                choices.append(values)
            else:
                choices.append([part])
        hosts += ["".join(p) for p in product(*choices)]
    return hosts


def tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m:
            out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_port(job_id: str | None) -> int:
    """A port every task of a job agrees on without talking: 15000 + job id mod 17000 (15000-31999: below
    the ephemeral range, 32768+, where an outgoing connection may hold it)."""
    digits = re.sub(r"\D", "", job_id or "")
    return 15000 + int(digits or 0) % 17000


@dataclass
class Dist:
    """This process's place in a distributed job (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"  # none | torchrun | slurm
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str | None = None  # SLURM_JOB_ID

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        """For run.json."""
        backend = tdist.get_backend() if self.enabled and tdist.is_initialized() else None
        return {
            "world_size": self.world_size,
            "launcher": self.launcher,
            "backend": backend,
            "master": f"{self.master_addr}:{self.master_port}" if self.enabled else None,
            "slurm_job_id": self.job_id,
        }


# --------------------------------------------------------------------------------------------
# Environment


def detect(env: Mapping[str, str] | None = None) -> Dist:
    """Where this process stands: torchrun, srun, or alone (see the module doc)."""
    env = os.environ if env is None else env
    if env.get("MEDSSL_DIST", "").lower() in ("off", "0", "no"):
        return Dist(job_id=env.get("SLURM_JOB_ID"))  # one process, but still a SLURM job (--requeue)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = env_int(env, "WORLD_SIZE", "", 1)
        return _checked(
            Dist(
                rank=env_int(env, "RANK", "", 0),
                world_size=world,
                local_rank=env_int(env, "LOCAL_RANK", "0", 0),
                local_world_size=env_int(env, "LOCAL_WORLD_SIZE", str(world), 1),
                launcher="torchrun",
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=env_int(env, "MASTER_PORT", "29500", 1, 65535),
                job_id=env.get("SLURM_JOB_ID"),
            )
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = env_int(
            env, "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS", "", 1
        )
        job = env.get("SLURM_JOB_ID")
        if world > 1 and "SLURM_STEP_ID" not in env:
            # The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=N but is one process.
            raise UserError(
                f"SLURM_NTASKS={world} but this process was not started by srun (no SLURM_STEP_ID).",
                "Launch one task per GPU with `srun medssl pretrain ...`, or set MEDSSL_DIST=off.",
            )
        per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
        node = env_int(env, "SLURM_NODEID", "0", 0)
        local_world = per_node[node] if node < len(per_node) else world
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        nodes = (nodes or "").strip()
        master = env.get("MASTER_ADDR") or (expand_nodelist(nodes)[0] if nodes else "127.0.0.1")
        return _checked(
            Dist(
                rank=env_int(env, "SLURM_PROCID", "", 0),
                world_size=world,
                local_rank=env_int(env, "SLURM_LOCALID", "0", 0),
                local_world_size=local_world,
                launcher="slurm",
                master_addr=master,
                master_port=env_int(env, "MASTER_PORT", "", 1, 65535)
                if env.get("MASTER_PORT")
                else slurm_port(job),
                job_id=job,
            )
        )
    return Dist(job_id=env.get("SLURM_JOB_ID"))


def env_int(env: Mapping[str, str], key: str, default: str, low: int, high: int | None = None) -> int:
    """An integer environment variable set by a launcher (one line naming it when it is not one)."""
    raw = env.get(key, default)
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise UserError(
            f"Environment variable {key}={short(raw, 40)} is not an integer {bound}.",
            "It is set by torchrun or srun: launch through one of them, or unset it (MEDSSL_DIST=off "
            "ignores the launcher variables and runs one process).",
        )
    return value


def env_minutes(key: str, default: float) -> float:
    """A positive number of minutes from the environment (MEDSSL_DIST_TIMEOUT, MEDSSL_DIST_JOIN_TIMEOUT)."""
    raw = os.environ.get(key, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UserError(f"Environment variable {key}={short(raw, 40)} must be a number of minutes > 0.")
    return value


def _checked(d: Dist) -> Dist:
    if d.rank >= d.world_size or d.local_rank >= max(d.local_world_size, 1):
        raise UserError(
            f"Launcher variables disagree: rank {d.rank} (local {d.local_rank}) of {d.world_size} "
            f"(local {d.local_world_size}).",
            "Launch through torchrun or srun, or unset RANK/WORLD_SIZE (or set MEDSSL_DIST=off).",
        )
    return d
