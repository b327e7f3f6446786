"""Optional pretraining measurements: where the views' time goes (``--profile-views``), A under other
settings (``--variants``: dtype x memory format, torch.compile, foreach Adam, cudnn.benchmark) and the
chunked step against the plain one (``--chunk``)."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from bench_pipeline import Pipeline, build, fmt_name, make_pool, view_feed
from timing import count_flops, interleave, matmul_fn, median_ratio, peak_rss_gb, sync

from medssl_cli.barlowtwins.chunked import chunked_train_step
from medssl_cli.runtime import compute
from medssl_cli.stages.pretrain import train_step


def profile_views(args: argparse.Namespace, device: torch.device, size: int, batch: int) -> list[dict]:
    """Where the views' time goes: the ops (CUDA: the kernels) with the most self time over 5 calls."""
    from torch.profiler import ProfilerActivity, profile

    pool = make_pool(max(args.pool, batch), args.channels, size)
    cl = compute.use_channels_last(device, args.channels_last, size)
    feed = view_feed(pool, device, batch, cl, args.device_budget_gb)
    for s in range(2):
        feed.make(s)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        for s in range(2, 7):
            feed.make(s)
        sync(device)
    events = list(prof.key_averages())
    if device.type == "cuda":
        # Kernels only: an aten op's device time is its kernels' time, so counting both would double it.
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        key, events = "self_device_time_total", kernels or events
    else:
        key = "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in rows) or 1.0
    return [
        {
            "op": e.key,
            "ms_per_batch": getattr(e, key, 0.0) / 5e3,
            "share": getattr(e, key, 0.0) / total,
            "calls_per_batch": e.count / 5,
            "total_ms_per_batch": total / 5e3,
        }
        for e in rows[:12]
    ]


def measure_variants(
    args: argparse.Namespace,
    device: torch.device,
    size: int,
    batch: int,
    net: torch.nn.Module,
    v1: torch.Tensor,
    v2: torch.Tensor,
    bf16: bool,
    cl: bool,
) -> list[dict[str, Any]]:
    """A under other settings, each paired with the default A in the same rounds: speed-up = t_A / t_X."""
    combos: list[dict[str, Any]] = [
        {"name": fmt_name(b, c), "bf16": b, "cl": c}
        for b in (False, True)
        for c in (False, True)
        if (b, c) != (bf16, cl)
    ]
    if device.type == "cpu" and not compute.cpu_has_native_bf16():
        combos = [c for c in combos if not c["bf16"]]
    if args.compile:
        combos.append({"name": f"compile+{fmt_name(bf16, cl)}", "bf16": bf16, "cl": cl, "compile": True})
    if device.type == "cuda":
        combos.append({"name": f"adam_foreach+{fmt_name(bf16, cl)}", "bf16": bf16, "cl": cl, "fused": False})
        combos.append(
            {"name": f"cudnn_benchmark+{fmt_name(bf16, cl)}", "bf16": bf16, "cl": cl, "cudnn": True}
        )
    base_net, base_opt = build(device, args.channels, args.projector, cl, batch)
    out = []
    for combo in combos:
        vnet, vopt = build(device, args.channels, args.projector, combo["cl"], batch, combo.get("fused"))
        fmt = torch.channels_last if combo["cl"] else torch.contiguous_format
        x1, x2 = v1.contiguous(memory_format=fmt), v2.contiguous(memory_format=fmt)
        compile_s = None
        if combo.get("compile"):
            vnet = torch.compile(vnet)
            t0 = time.perf_counter()
            train_step(vnet, vopt, x1, x2, 0.0051, combo["bf16"])
            sync(device)
            compile_s = time.perf_counter() - t0

        def variant(vnet=vnet, vopt=vopt, x1=x1, x2=x2, combo=combo) -> None:
            old = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
            if combo.get("cudnn"):
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
            try:
                train_step(vnet, vopt, x1, x2, 0.0051, combo["bf16"])
            finally:
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old

        fns = {"A": lambda: train_step(base_net, base_opt, v1, v2, 0.0051, bf16), "X": variant}
        times, _ = interleave(fns, device, args.rounds, args.warmup, args.target_s)
        x = statistics.median(times["X"])
        out.append(
            {
                "name": combo["name"],
                "samples_per_s": batch / x,
                "default_samples_per_s": batch / statistics.median(times["A"]),
                "speedup_vs_default": median_ratio(times["A"], times["X"]),
                "compile_s": compile_s,
            }
        )
        del vnet, vopt
    return out


def measure_chunked(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size, batch, chunk = args.chunk_size_px, args.chunk_batch, args.chunk
    bf16 = compute.use_bf16(device, args.precision)
    cl = compute.use_channels_last(device, args.channels_last, size)
    pool = make_pool(batch, args.channels, size)
    net, opt = build(device, args.channels, args.projector, cl, batch)
    v1, v2 = Pipeline(pool, net, opt, batch, device, bf16, cl, args.device_budget_gb).make_views(0)
    k = min(batch, 8)
    flops = count_flops(lambda: train_step(net, opt, v1[:k], v2[:k], 0.0051, bf16)) / k
    flops_chunked = (
        count_flops(lambda: chunked_train_step(net, opt, v1[:k], v2[:k], 0.0051, bf16, k // 2)) / k
    )
    mm, mm_flops = matmul_fn(args.matmul_n, bf16, device)
    fns = {
        "plain": lambda: train_step(net, opt, v1, v2, 0.0051, bf16),
        "chunked": lambda: chunked_train_step(net, opt, v1, v2, 0.0051, bf16, chunk),
        "M": mm,
    }
    times, reps = interleave(fns, device, args.rounds_chunk, args.warmup_chunk, 0.0)
    res: dict[str, Any] = {
        "device": str(device),
        "image_size": size,
        "batch": batch,
        "chunk": chunk,
        "dtype": "bf16" if bf16 else "fp32",
        "memory_format": "channels_last" if cl else "nchw",
        "rounds": args.rounds_chunk,
        "flops_per_sample": flops,
        "flops_per_sample_chunked": flops_chunked,
        "matmul_peak_gflops": mm_flops / statistics.median(times["M"]) / 1e9,
        "chunked_over_plain": median_ratio(times["plain"], times["chunked"]),
    }
    for name in ("plain", "chunked"):
        t = statistics.median(times[name])
        res[name] = {
            "samples_per_s": batch / t,
            "step_s": t,
            "useful_gflops": flops * batch / t / 1e9,
            "efficiency": median_ratio(
                [flops * batch / x / mm_flops for x in times[name]], [1 / m for m in times["M"]]
            ),
        }
    res["raw_s"] = times
    mem = getattr(interleave, "peak_mem", {})
    if mem:
        res["cuda_peak_mem_gb"] = {k: v / 2**30 for k, v in mem.items()}
    res["peak_rss_gb"] = peak_rss_gb()
    return res
