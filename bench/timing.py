"""Timing and reporting helpers shared by the benchmarks: device-synchronised blocks, interleaved
rounds with per-round ratios, a same-run matmul peak, FLOP counting, environment, JSON + table output."""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medssl_cli.runtime import compute


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls, device-synchronised at both ends only."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def interleave(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int, target_s: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-call seconds of each fn, ``rounds`` times, order alternating (ABC CBA ...) to cancel drift.

    After ``warmup`` untimed calls each fn runs ``reps`` calls per block, enough for ~``target_s``.
    CUDA peak memory of each fn's blocks goes into ``interleave.peak_mem`` (bytes).
    """
    reps: dict[str, int] = {}
    for name, fn in fns.items():
        t = math.inf
        for _ in range(max(1, warmup)):
            t = time_block(fn, device, 1)
        reps[name] = max(1, int(target_s / max(t, 1e-9)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    peak: dict[str, int] = {}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(time_block(fns[name], device, reps[name]))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    interleave.peak_mem = peak  # type: ignore[attr-defined]
    return times, reps


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r] (paired: both measured in the same round)."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def matmul_fn(n: int, bf16: bool, device: torch.device) -> tuple[Callable[[], Any], float]:
    """An n x n x n matmul in the step's dtype and its FLOPs (2 n^3)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n**3


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def env_info(args: argparse.Namespace, devices: list[torch.device]) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "devices": {str(d): compute.describe_device(d) for d in devices},
        "cpu_native_bf16": compute.cpu_has_native_bf16(),
        "argv": sys.argv[1:],
        "quick": bool(getattr(args, "quick", False)),
        "note": "ratios are medians of per-round ratios (interleaved); absolute rates depend on load",
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def parse_ints(text: str | None) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()] if text else []


def resolve_devices(text: str) -> list[torch.device]:
    out = []
    for name in [t.strip() for t in text.split(",") if t.strip()]:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"[bench] {name}: CUDA not available here, skipped", file=sys.stderr)
            continue
        out.append(torch.device(name))
    return out


def pick(record: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        record = record.get(key) if isinstance(record, dict) else None  # type: ignore[assignment]
    return record


def emit(result: dict[str, Any], json_path: str | None, tables: list[tuple[str, str, list[dict]]]) -> None:
    """JSON to ``json_path`` (table to stdout) or to stdout (tables to stderr: stdout stays parseable).

    A table is (title, columns, records); columns are space-separated ``header=key.path`` (or ``key``).
    """
    text = json.dumps(result, indent=2)
    out = sys.stdout
    if json_path:
        Path(json_path).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
        out = sys.stderr
    for title, cols, records in tables:
        spec = [(c.split("=")[0].replace("_", " "), c.split("=")[-1]) for c in cols.split()]
        rows = [[fmt(pick(r, path)) for _, path in spec] for r in records]
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(*[h for h, _ in spec], title=title)
            for row in rows:
                table.add_row(*row)
            Console(file=out, width=200).print(table)
        except ImportError:  # plain text
            print(title, *[" | ".join(r) for r in [[h for h, _ in spec], *rows]], sep="\n", file=out)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)
