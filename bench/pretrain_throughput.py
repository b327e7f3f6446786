#!/usr/bin/env python
"""Barlow Twins pretraining throughput: the model-only step (A) against the full pipeline (B).

All numbers come from one process and one run, so they share the machine's state: every quantity is
timed in rounds that interleave A, B, the views alone and a matmul peak (A B V M, then M V B A, ...),
and ratios are medians of per-round ratios, which cancels slow load drift on a shared machine.

- A, model step: ``stages.pretrain.train_step`` on ready-made, normalised device tensors.
- B, pipeline: what ``medssl pretrain`` does per step, with its own functions: ``batches.BatchSource`` gather
  from a uint8 pool (on the device when it fits ``--device-budget-gb``), ``rank_batch``, ``view_generator``,
  ``augment.make_pair``, ``normalize``, channels_last, ``set_lr``, ``train_step``, ``loss.item()`` at
  the loop's cadence (every step on CPU, every 25 on CUDA).
- V, views: the data part of B alone (gather + views + normalise).
- M, matmul peak: an n x n matmul (default 4096) in the step's dtype (fp32, or bf16 under autocast).
- FLOPs per sample (1 sample = 2 views) are counted once with ``torch.utils.flop_counter`` on one step
  (2 FLOPs per multiply-add); achieved GFLOP/s = FLOPs/sample x samples/s; efficiency = that / M.
- ``--variants``: A with every dtype x memory format (and ``--compile``; non-fused Adam and
  cudnn.benchmark on CUDA), each as a ratio to the default A.
- ``--chunk K``: plain vs ``chunked.chunked_train_step`` at ``--chunk-batch`` (256) and
  ``--chunk-size-px`` (224), efficiency counted with the plain step's FLOPs (useful work).

Usage: ``python bench/pretrain_throughput.py [--sizes 64,224] [--batches 32,64] [--json out.json]``.
``--quick`` is a seconds-long smoke configuration (32 px, batch 8) for tests. See bench/README.md.
"""

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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from medssl_cli import compute  # noqa: E402
from medssl_cli.augment import make_pair, normalize  # noqa: E402
from medssl_cli.batches import BatchSource, epoch_order, rank_batch, view_generator  # noqa: E402
from medssl_cli.chunked import chunked_train_step  # noqa: E402
from medssl_cli.distributed import Dist  # noqa: E402
from medssl_cli.models import build_pretrain_net  # noqa: E402
from medssl_cli.optim import build_optimizer, param_groups, set_lr  # noqa: E402
from medssl_cli.recipe import PretrainRecipe, ViewsRecipe  # noqa: E402
from medssl_cli.stages.pretrain import NORM_MEAN, NORM_STD, train_step  # noqa: E402

DEFAULT_BATCH = {64: 128, 224: 32}  # the cpu-probe's efficient batch sizes
ORGANS_TRAIN_POOL = 2613  # 3 planes x 871 official train images


# --------------------------------------------------------------------------------------------
# Timing helpers (shared with features_throughput.py)


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


# --------------------------------------------------------------------------------------------
# The pipeline, as stages/pretrain.py runs it


class RamImages:
    """A uint8 (N, C, S, S) pool in RAM with the parts of ``data.images.ImageArray`` BatchSource reads."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.in_ram = True
        self.nbytes = data.numel()

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.data[idx]


class RamPool:
    def __init__(self, data: torch.Tensor) -> None:
        self.images = RamImages(data)
        self.channels, self.image_size = data.shape[1], data.shape[-1]

    def __len__(self) -> int:
        return len(self.images)


def make_pool(n: int, channels: int, size: int, seed: int = 0) -> RamPool:
    """Random uint8 images (the views' cost does not depend on the pixel values)."""
    g = torch.Generator().manual_seed(seed)
    return RamPool(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g))


class Pipeline:
    """The per-step body of ``stages.pretrain._train`` (one process), on a fixed net and optimizer."""

    def __init__(
        self,
        pool: RamPool,
        net: torch.nn.Module,
        opt: torch.optim.Optimizer,
        batch: int,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
        budget_gb: float,
        views: ViewsRecipe | None = None,
        lambd: float = 0.0051,
        seed: int = 0,
    ) -> None:
        self.pool, self.net, self.opt, self.batch = pool, net, opt, batch
        self.device, self.bf16, self.channels_last, self.lambd, self.seed = (
            device,
            bf16,
            channels_last,
            lambd,
            seed,
        )
        self.views = views or ViewsRecipe()
        self.source = BatchSource(pool, device, budget_gb)  # type: ignore[arg-type]
        self.spe = max(1, len(pool) // batch)
        self.mean, self.std = (NORM_MEAN,) * pool.channels, (NORM_STD,) * pool.channels
        self.sync_every = 1 if device.type == "cpu" else 25  # as the training loop
        self.step, self._order = 0, (-1, None)

    def make_views(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, s = divmod(step, self.spe)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.pool), self.seed, epoch))
        x = self.source(rank_batch(self._order[1], s, self.batch, Dist()))
        g = view_generator(self.seed, step, 0, self.device)
        v1, v2 = make_pair(x, self.views, self.pool.image_size, g)
        v1, v2 = normalize(v1, self.mean, self.std), normalize(v2, self.mean, self.std)
        if self.channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        return v1, v2

    def views_only(self) -> None:
        self.make_views(self.step)
        self.step += 1

    def full_step(self) -> None:
        set_lr(self.opt, self.step, 10**9, 0)
        v1, v2 = self.make_views(self.step)
        loss, _, _ = train_step(self.net, self.opt, v1, v2, self.lambd, self.bf16)
        self.step += 1
        if self.step % self.sync_every == 0:
            loss.item()


def build(
    device: torch.device,
    channels: int,
    projector: list[int],
    bf16_fmt_cl: bool,
    batch: int,
    fused: bool | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = build_pretrain_net(channels, "replicate", projector).train()
    net = net.to(device, memory_format=torch.channels_last if bf16_fmt_cl else torch.contiguous_format)
    if fused is False:  # the non-fused (foreach) Adam, to compare with build_optimizer's fused one
        groups = param_groups(net, 0.03, 0.03, 0.0)
        return net, torch.optim.Adam(groups, lr=0.03, fused=False, foreach=True)
    return net, build_optimizer(net, PretrainRecipe(batch_size=batch), batch)


def fmt_name(bf16: bool, cl: bool) -> str:
    return f"{'bf16' if bf16 else 'fp32'}+{'channels_last' if cl else 'nchw'}"


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
    out["raw_s"] = times  # per-round seconds per call, to judge the noise
    if mem:
        out["cuda_peak_mem_gb"] = {k: v / 2**30 for k, v in mem.items()}
    if args.variants:
        out["variants"] = measure_variants(args, device, size, batch, net, v1, v2, bf16, cl)
    return out


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
    p.add_argument("--variants", action="store_true", help="also dtype x memory format (x compile) for A")
    p.add_argument("--compile", action="store_true", help="with --variants: a torch.compile variant")
    p.add_argument("--chunk", type=int, default=0, help="K > 0: plain vs chunked (chunks of K) step")
    p.add_argument("--chunk-batch", type=int, default=256)
    p.add_argument("--chunk-size-px", type=int, default=224)
    p.add_argument("--rounds-chunk", type=int, default=2)
    p.add_argument("--warmup-chunk", type=int, default=1)
    p.add_argument("--skip-main", action="store_true", help="only the --chunk comparison")
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
    main_cols += "B_samples/s=pipeline.samples_per_s B/A=b_over_a views_samples/s=views.samples_per_s "
    main_cols += "GFLOP/s=achieved_gflops matmul_peak=matmul_peak_gflops efficiency"
    title = "Pretraining (A: model step, B: full pipeline; 1 sample = 2 views)"
    tables = [(title, main_cols, results)] if results else []
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
