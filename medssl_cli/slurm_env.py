"""SLURM's environment strings, parsed: host lists, tasks per node, the job's rendezvous port.

Pure functions (no torch), used by ``distributed.detect``.
"""

from __future__ import annotations

import re
from itertools import product


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
