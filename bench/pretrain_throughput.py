#!/usr/bin/env python
"""Barlow Twins pretraining throughput: the model-only step (A) against the full pipeline (B).

All numbers come from one process and one run, so they share the machine's state: every quantity is
timed in rounds that interleave A, B, the views alone and a matmul peak (A B V M, then M V B A, ...),
and ratios are medians of per-round ratios, which cancels slow load drift on a shared machine.

- A, model step: ``stages.pretrain.train_step`` on ready-made, normalised device tensors.
- B, pipeline: what ``medssl pretrain`` does per step, with its own functions: ``batches.ViewFeed``
  (``BatchSource`` gather from a uint8 pool, on the device when it fits ``--device-budget-gb``;
  ``rank_batch``, ``view_generator``, ``augment.make_pair``, ``normalize``, channels_last; on CUDA the
  next step's views are made on a side stream while this step trains), ``set_lr``, ``train_step``,
  ``loss.item()`` at the loop's cadence (every step on CPU, every 25 on CUDA).
- I (CUDA only): B with the views made in line on the main stream, to show what the overlap buys.
- V, views: the data part of B alone (gather + views + normalise).
- M, matmul peak: an n x n matmul (default 4096) in the step's dtype (fp32, or bf16 under autocast).
- FLOPs per sample (1 sample = 2 views) are counted once with ``torch.utils.flop_counter`` on one step
  (2 FLOPs per multiply-add); achieved GFLOP/s = FLOPs/sample x samples/s; efficiency = that / M.
- ``--view-variants``: B and V again with the views ``torch.compile``d and/or the blur as banded
  matmuls (``blur.IMPLS``), in the same rounds: B/A and the views' speed-up for each.
- ``--variants``: A with every dtype x memory format (and ``--compile``; non-fused Adam and
  cudnn.benchmark on CUDA), each as a ratio to the default A.
- ``--chunk K``: plain vs ``chunked.chunked_train_step`` at ``--chunk-batch`` (256) and
  ``--chunk-size-px`` (224), efficiency counted with the plain step's FLOPs (useful work).

Usage: ``python bench/pretrain_throughput.py [--sizes 64,224] [--batches 32,64] [--json out.json]``.
``--quick`` is a seconds-long smoke configuration (32 px, batch 8) for tests. See bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_extras import measure_chunked, measure_variants, profile_views  # noqa: E402
from bench_pipeline import Pipeline, build, make_pool  # noqa: E402
from timing import (  # noqa: E402
    count_flops,
    emit,
    env_info,
    interleave,
    matmul_fn,
    median_ratio,
    parse_ints,
    peak_rss_gb,
    resolve_devices,
    sync,
)

from medssl_cli.runtime import compute  # noqa: E402
from medssl_cli.stages.pretrain import train_step  # noqa: E402

DEFAULT_BATCH = {64: 128, 224: 32}  # the cpu-probe's efficient batch sizes
ORGANS_TRAIN_POOL = 2613  # 3 planes x 871 official train images


# --------------------------------------------------------------------------------------------
# Measurements


def measure_config(args: argparse.Namespace, device: torch.device, size: int, batch: int) -> dict[str, Any]:
    bf16 = compute.use_bf16(device, args.precision)
    cl = compute.use_channels_last(device, args.channels_last, size)
    pool = make_pool(max(args.pool, batch), args.channels, size)
    net, opt = build(device, args.channels, args.projector, cl, batch)
    pipe = Pipeline(pool, net, opt, batch, device, bf16, cl, args.device_budget_gb)
    v1, v2 = pipe.make_views(10**6)  # ready tensors for A, made by the pipeline itself
    k = min(batch, 8)
    flops = count_flops(lambda: train_step(net, opt, v1[:k], v2[:k], 0.0051, bf16)) / k
    mm, mm_flops = matmul_fn(args.matmul_n, bf16, device)
    fns = {
        "A": lambda: train_step(net, opt, v1, v2, 0.0051, bf16),
        "B": pipe.full_step,
        "V": pipe.views_only,
        "M": mm,
    }
    if pipe.feed.side is not None:  # also B with the views made in line, to show what the overlap buys
        inline = Pipeline(
            pool, net, opt, batch, device, bf16, cl, args.device_budget_gb, overlap=False, source=pipe.source
        )
        fns["I"] = inline.full_step
    view_variants = add_view_variants(args, fns, pipe, pool, net, opt, batch, device, bf16, cl)
    times, reps = interleave(fns, device, args.rounds, args.warmup, args.target_s)
    a, b, v = (statistics.median(times[x]) for x in "ABV")
    peak = mm_flops / statistics.median(times["M"]) / 1e9
    ach = flops * batch / a / 1e9
    eff = median_ratio([flops * batch / t / mm_flops for t in times["A"]], [1 / t for t in times["M"]])
    b_over_a = median_ratio(times["A"], times["B"])
    target_ba = 0.95 if device.type == "cuda" else (0.90 if size < 224 else 0.85)
    target_eff = 0.85 if device.type == "cpu" and size >= 224 and batch <= 64 else None
    mem = getattr(interleave, "peak_mem", {})
    out = {
        "device": str(device),
        "device_name": compute.describe_device(device),
        "image_size": size,
        "channels": args.channels,
        "batch": batch,
        "dtype": "bf16" if bf16 else "fp32",
        "memory_format": "channels_last" if cl else "nchw",
        "pool_images": len(pool),
        "images_on_device": pipe.source.on_device,
        "rounds": args.rounds,
        "steps_per_block": reps,
        "model_step": {"samples_per_s": batch / a, "step_s": a},
        "pipeline": {"samples_per_s": batch / b, "step_s": b},
        "views": {"samples_per_s": batch / v, "s_per_batch": v},
        "b_over_a": b_over_a,
        "b_over_a_target": target_ba,
        "b_over_a_met": b_over_a >= target_ba,
        "views_share_of_step": median_ratio(times["V"], times["A"]),
        "b_over_a_from_views": 1 / (1 + median_ratio(times["V"], times["A"])),  # steadier: V runs many reps
        "flops_per_sample": flops,
        "achieved_gflops": ach,
        "pipeline_gflops": flops * batch / b / 1e9,
        "matmul_peak_gflops": peak,
        "matmul_n": args.matmul_n,
        "matmul_dtype": "bf16" if bf16 else "fp32",
        "efficiency": eff,
        "efficiency_target": target_eff,
        "efficiency_met": None if target_eff is None else eff >= target_eff,
        "peak_rss_gb": peak_rss_gb(),
    }
    if "I" in times:
        i = statistics.median(times["I"])
        out["pipeline_inline"] = {"samples_per_s": batch / i, "step_s": i}
        out["b_inline_over_a"] = median_ratio(times["A"], times["I"])
    out["views_overlap"] = pipe.feed.side is not None
    out["raw_s"] = times  # per-round seconds per call, to judge the noise
    if mem:
        out["cuda_peak_mem_gb"] = {k: v / 2**30 for k, v in mem.items()}
    if view_variants:
        out["view_variants"] = [
            {
                "name": name,
                "b_over_a": median_ratio(times["A"], times[f"B:{name}"]),
                "views_samples_per_s": batch / statistics.median(times[f"V:{name}"]),
                "views_x_default": median_ratio(times["V"], times[f"V:{name}"]),
                "compile_s": compile_s,
            }
            for name, compile_s in view_variants.items()
        ]
    if args.variants:
        out["variants"] = measure_variants(args, device, size, batch, net, v1, v2, bf16, cl)
    return out


# name: (torch.compile the views, blur implementation)
VIEW_VARIANTS = {
    "compiled": (True, "conv"),
    "matmul-blur": (False, "matmul"),
    "compiled+matmul-blur": (True, "matmul"),
}


def add_view_variants(
    args: argparse.Namespace,
    fns: dict[str, Any],
    pipe: Pipeline,
    pool: Any,
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: int,
    device: torch.device,
    bf16: bool,
    cl: bool,
) -> dict[str, float | None]:
    """With ``--view-variants``: a pipeline per variant (sharing the pool's device copy) as B:name and
    V:name in ``fns``. Compiled ones compile here, timed. Returns {name: compile seconds or None}."""
    out: dict[str, float | None] = {}
    if not args.view_variants:
        return out
    for name, (comp, blur) in VIEW_VARIANTS.items():
        p = Pipeline(
            pool, net, opt, batch, device, bf16, cl, args.device_budget_gb,
            source=pipe.source, compile_views=comp, blur=blur,
        )  # fmt: skip
        sync(device)
        t0 = time.perf_counter()
        p.views_only()  # compiles, if compiled
        sync(device)
        out[name] = time.perf_counter() - t0 if comp else None
        fns[f"B:{name}"], fns[f"V:{name}"] = p.full_step, p.views_only
    return out


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped where absent")
    p.add_argument("--sizes", default="64,224", help="image sizes (px)")
    p.add_argument("--batches", default=None, help="batch sizes for every size (default: 64->128, 224->32)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1: organs (CT), 3: crc")
    p.add_argument("--pool", type=int, default=ORGANS_TRAIN_POOL, help="uint8 images in the pool")
    p.add_argument("--projector", default="2048,2048,2048")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--device-budget-gb", type=float, default=4.0, help="0: stream batches (pinned on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target-s", type=float, default=2.0, help="seconds per timed block (more calls if fast)")
    p.add_argument("--matmul-n", type=int, default=4096)
    p.add_argument(
        "--view-variants", action="store_true", help="also B and the views compiled / with the matmul blur"
    )
    p.add_argument("--variants", action="store_true", help="also dtype x memory format (x compile) for A")
    p.add_argument("--compile", action="store_true", help="with --variants: a torch.compile variant")
    p.add_argument("--chunk", type=int, default=0, help="K > 0: plain vs chunked (chunks of K) step")
    p.add_argument("--chunk-batch", type=int, default=256)
    p.add_argument("--chunk-size-px", type=int, default=224)
    p.add_argument("--rounds-chunk", type=int, default=2)
    p.add_argument("--warmup-chunk", type=int, default=1)
    p.add_argument("--skip-main", action="store_true", help="only the --chunk comparison")
    p.add_argument(
        "--profile-views", action="store_true", help="per-op time of the views (torch.profiler), per size"
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (tests)")
    p.add_argument("--json", default=None, help="write the JSON here (else to stdout)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.pool, args.projector = "32", "8", 32, "64,64,64"
        args.rounds, args.warmup, args.target_s, args.matmul_n = 2, 1, 0.0, 256
        args.rounds_chunk, args.chunk_batch, args.chunk_size_px = 2, 8, 32
        args.chunk = args.chunk or 4
    args.projector = parse_ints(args.projector)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compute.configure_threads(args.threads)
    compute.seed_everything(0)  # as the pretrain stage (also fixes cuDNN to deterministic)
    devices = resolve_devices(args.devices)
    batches = parse_ints(args.batches)
    results, chunked = [], []
    for device in devices:
        if not args.skip_main:
            for size in parse_ints(args.sizes):
                for batch in batches or [DEFAULT_BATCH.get(size, 64)]:
                    print(f"[bench] {device} {size} px batch {batch} ...", file=sys.stderr, flush=True)
                    results.append(measure_config(args, device, size, batch))
                    if args.profile_views:
                        results[-1]["views_profile"] = profile_views(args, device, size, batch)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        if args.chunk:
            print(
                f"[bench] {device} chunked: {args.chunk_size_px} px, "
                f"batch {args.chunk_batch}, chunk {args.chunk}",
                file=sys.stderr,
                flush=True,
            )
            chunked.append(measure_chunked(args, device))
    out = {
        "bench": "pretrain_throughput",
        "env": env_info(args, devices),
        "results": results,
        "chunked": chunked,
    }
    main_cols = "device px=image_size batch dtype memory_format A_samples/s=model_step.samples_per_s "
    main_cols += "B_samples/s=pipeline.samples_per_s B/A=b_over_a B/A_inline=b_inline_over_a "
    main_cols += "views_samples/s=views.samples_per_s "
    main_cols += "GFLOP/s=achieved_gflops matmul_peak=matmul_peak_gflops efficiency"
    title = "Pretraining (A: model step, B: full pipeline; 1 sample = 2 views)"
    tables = [(title, main_cols, results)] if results else []
    prof = [{**row, "device": r["device"], "px": r["image_size"], "batch": r["batch"]}
            for r in results for row in r.get("views_profile", [])]  # fmt: skip
    if prof:
        cols = "device px batch op ms/batch=ms_per_batch share calls_per_batch"
        tables.append(("Views: ops by self time", cols, prof))
    vv = [{**v, "device": r["device"], "px": r["image_size"], "batch": r["batch"]}
          for r in results for v in r.get("view_variants", [])]  # fmt: skip
    if vv:
        cols = "device px batch variant=name B/A=b_over_a views_samples/s=views_samples_per_s "
        cols += "views_x_default=views_x_default compile_s"
        title = "View variants (B/A, and the views' speed-up vs the default views, same rounds)"
        tables.append((title, cols, vv))
    variants = [{**v, "device": r["device"], "px": r["image_size"], "batch": r["batch"]}
                for r in results for v in r.get("variants", [])]  # fmt: skip
    if variants:
        cols = "device px batch variant=name samples/s=samples_per_s x_default=speedup_vs_default compile_s"
        tables.append(("Variants of A (speed-up vs the default settings, same rounds)", cols, variants))
    cols = "device px=image_size batch chunk dtype plain_samples/s=plain.samples_per_s "
    cols += "chunked_samples/s=chunked.samples_per_s chunked/plain=chunked_over_plain "
    cols += "plain_eff=plain.efficiency chunked_eff=chunked.efficiency"
    if chunked:
        tables.append(("Chunked vs plain step (efficiency with the plain step's FLOPs)", cols, chunked))
    emit(out, args.json, tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
