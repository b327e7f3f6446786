#!/usr/bin/env python
"""Frozen feature extraction throughput (B/A) and the linear-probe grid's cost, in one run.

- A, forward only: the backbone in eval mode under ``inference_mode`` (+ bf16 autocast, channels_last
  as ``compute``'s auto rules choose) on ready-made, normalised device tensors of the same images.
- B, extraction: ``features.extract`` on the uint8 train and val pools, exactly as the finetune stage
  calls it (batch 256; uint8 -> float, normalise, copy, forward, features back to the CPU).
- A and B alternate over ``--rounds`` rounds; B/A is the median of per-round ratios.
- Grid: 6 fractions x 5 seeds = 30 cells of ``probes.fit_lbfgs`` (the recipe's ``c_grid``, features of
  the whole train split as the standardisation reference), each on a ``stratified_subset`` of the
  cached train features, selected on val, as the finetune stage calls it: identical subsets (fraction 1
  for every seed) reuse one fit: 26 fits for the default 30 cells. Printed as a fraction of the
  extraction time (B, train + val) and as a target check (<= 0.10).

Data: organs-like pools: a MIMeta root given by ``--data-dir`` (real organs, or any ``--datasets``), else
synthetic organ planes written once by ``medssl_cli.data.synth`` into ``--cache-dir`` (1,645 items per
plane: ~2,600 train + ~460 val images, as the real 2,613 + 468). The backbone is a random-init ResNet-18
(the finetune "random" init), or ``--weights`` (a pretrain run's backbone.safetensors).

Usage: ``python bench/features_throughput.py [--size 64] [--json out.json]``; ``--quick`` for tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
for p in (BENCH.parent, BENCH):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from timing import (  # noqa: E402
    count_flops,
    emit,
    env_info,
    interleave,
    median_ratio,
    parse_ints,
    peak_rss_gb,
    resolve_devices,
    sync,
)

from medssl_cli.barlowtwins.views import normalize, to_float  # noqa: E402
from medssl_cli.data.fractions import stratified_subset  # noqa: E402
from medssl_cli.data.pool import Pool, load_pool  # noqa: E402
from medssl_cli.models import build_backbone, load_backbone  # noqa: E402
from medssl_cli.readout.features import extract  # noqa: E402
from medssl_cli.readout.probes import fit_lbfgs  # noqa: E402
from medssl_cli.recipe import FinetuneRecipe  # noqa: E402
from medssl_cli.runtime import compute  # noqa: E402

FRACTIONS = "0.005,0.01,0.1,0.25,0.5,1.0"  # recipes/crc-bt.yaml's six
SEEDS = "0,1,2,3,4"
ORGAN_IDS = ["organs_axial", "organs_coronal", "organs_sagittal"]
NORM = ((0.5,), (0.5,))  # SSL / random init normalisation (x/255 - 0.5) / 0.5


def load_data(args: argparse.Namespace) -> tuple[Pool, Pool, dict[str, Any]]:
    from medssl_cli.data.registry import scan

    if args.data_dir:
        root = Path(args.data_dir)
        infos = scan(root)
        if args.datasets:
            names = args.datasets.split(",")
        else:  # the real organ planes, else their synthetic stand-ins
            names = ORGAN_IDS if all(i in infos for i in ORGAN_IDS) else [f"synthetic_{i}" for i in ORGAN_IDS]
    else:
        from medssl_cli.data.synth import make_synthetic

        root = Path(args.cache_dir) / f"organs-{args.size}px-{args.organs}"
        names = [f"synthetic_{i}" for i in ORGAN_IDS]
        if not all((root / n / "info.yaml").is_file() for n in names):
            t0 = time.perf_counter()
            make_synthetic(
                root, organs=args.organs, size=args.size, seed=0, which=("organs",), overwrite=True
            )
            print(
                f"[bench] synthetic organs written to {root} in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
    pools = [
        load_pool(root, names, [s], image_size=args.size, ram_budget_gb=args.ram_budget_gb)
        for s in ("train", "val")
    ]
    info = {
        "root": str(root),
        "datasets": names,
        "synthetic": pools[0].synthetic,
        "n_train": len(pools[0]),
        "n_val": len(pools[1]),
        "in_ram": pools[0].images.in_ram,
        "channels": pools[0].channels,
        "classes": pools[0].num_classes,
    }
    return pools[0], pools[1], info


def backbone_for(args: argparse.Namespace, channels: int) -> torch.nn.Module:
    if args.weights:
        return load_backbone(args.weights, channels, "replicate")[0]
    torch.manual_seed(0)
    return build_backbone(channels, "replicate")


def ready_batches(pools: list[Pool], device: torch.device, cl: bool, batch: int) -> list[torch.Tensor]:
    """The same images as extract sees them (float, normalised, on the device), made once."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    out = []
    for pool in pools:
        for s in range(0, len(pool), batch):
            x = pool.images[s : s + batch]
            x = to_float(x.to(device), x.shape[-1])
            out.append(normalize(x, *NORM).contiguous(memory_format=fmt))
    return out


def run_grid(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    k: int,
    fractions: list[float],
    seeds: list[int],
    c_grid: list[float],
) -> dict[str, Any]:
    """All (fraction, seed) cells, as ``stages.cell._linear`` does them: one fit per distinct subset.

    Identical subsets (fraction 1 for every seed) reuse the first fit, as finetune does (fit_lbfgs is
    deterministic). Returns total s, cells, fits run, per-fit s and s per fraction.
    """
    fitted: set[bytes] = set()
    per_fit, per_fraction = [], {}
    t0 = time.perf_counter()
    for fraction in fractions:
        t_fraction = time.perf_counter()
        for seed in seeds:
            idx = stratified_subset(y_train.numpy(), fraction, seed, k).indices
            if idx.tobytes() in fitted:
                continue
            fitted.add(idx.tobytes())
            t = time.perf_counter()
            fit_lbfgs(f_train[idx], y_train[idx], f_val, y_val, k, c_grid, reference=f_train)
            per_fit.append(time.perf_counter() - t)
        per_fraction[str(fraction)] = time.perf_counter() - t_fraction
    return {
        "s": time.perf_counter() - t0,
        "cells": len(fractions) * len(seeds),
        "fits_run": len(fitted),
        "per_fit_s": per_fit,
        "per_fraction_s": per_fraction,
    }


def measure(args: argparse.Namespace, device: torch.device, train: Pool, val: Pool) -> dict[str, Any]:
    bf16 = compute.use_bf16(device, args.precision)
    cl = compute.use_channels_last(device, args.channels_last, args.size)
    fmt = torch.channels_last if cl else torch.contiguous_format
    net = backbone_for(args, train.channels).to(device, memory_format=fmt).eval()
    batches = ready_batches([train, val], device, cl, args.batch)
    n = len(train) + len(val)
    feats: dict[str, torch.Tensor] = {}

    def forward_only() -> None:
        with torch.inference_mode(), compute.autocast(device, bf16):
            for x in batches:
                net(x)

    def extraction() -> None:
        for name, pool in (("train", train), ("val", val)):
            feats[name] = extract(
                net,
                pool.images,
                NORM,
                device=device,
                bf16=bf16,
                channels_last=cl,
                batch_size=args.batch,
                show_progress=False,
            )

    with torch.inference_mode():
        flops = count_flops(lambda: net(batches[0][:2])) / 2
    times, _ = interleave({"A": forward_only, "B": extraction}, device, args.rounds, args.warmup, 0.0)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    b_over_a = median_ratio(times["A"], times["B"])
    ft = FinetuneRecipe()
    c_grid = [float(c) for c in (args.c_grid.split(",") if args.c_grid else ft.c_grid)]
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = parse_ints(args.seeds)
    y_train, y_val = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    grids: list[dict[str, Any]] = []
    ext_around = []
    for _ in range(args.grid_rounds):  # grid and extraction alternate too (B before every grid)
        sync(device)
        t0 = time.perf_counter()
        extraction()
        sync(device)
        ext_around.append(time.perf_counter() - t0)
        grids.append(
            run_grid(
                feats["train"], y_train, feats["val"], y_val, train.num_classes, fractions, seeds, c_grid
            )
        )
    grid_s = statistics.median(g["s"] for g in grids)
    share = median_ratio([g["s"] for g in grids], ext_around)
    per_fit = [t for g in grids for t in g["per_fit_s"]]
    per_fraction = {
        f: statistics.median(g["per_fraction_s"][f] for g in grids) for f in grids[0]["per_fraction_s"]
    }
    return {
        "device": str(device),
        "device_name": compute.describe_device(device),
        "image_size": args.size,
        "dtype": "bf16" if bf16 else "fp32",
        "memory_format": "channels_last" if cl else "nchw",
        "batch": args.batch,
        "images": n,
        "rounds": args.rounds,
        "forward_only": {"images_per_s": n / a, "s": a},
        "extract": {"images_per_s": n / b, "s": b},
        "b_over_a": b_over_a,
        "b_over_a_target": 0.90,
        "b_over_a_met": b_over_a >= 0.90,
        "flops_per_image": flops,
        "forward_gflops": flops * n / a / 1e9,
        "grid": {
            "cells": grids[0]["cells"],
            "fits": grids[0]["cells"],  # = cells (older readers); fits_run: fits actually run
            "fits_run": grids[0]["fits_run"],
            "fractions": fractions,
            "seeds": seeds,
            "c_grid": c_grid,
            "features": list(feats["train"].shape),
            "s": grid_s,
            "per_fit_s_median": statistics.median(per_fit),
            "per_fit_s_max": max(per_fit),
            "per_fraction_s": per_fraction,
            "extraction_s": statistics.median(ext_around),
            "fraction_of_extraction": share,
            "target": 0.10,
            "met": share <= 0.10,
            "rounds": args.grid_rounds,
        },
        "peak_rss_gb": peak_rss_gb(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped where absent")
    p.add_argument("--size", type=int, default=64, help="image size (px) the pool is resized to")
    p.add_argument(
        "--data-dir", default=None, help="a MIMeta root (default: synthetic organs in --cache-dir)"
    )
    p.add_argument("--datasets", default=None, help="with --data-dir: ids (default: the three organ planes)")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medssl-bench"))
    p.add_argument("--organs", type=int, default=1645, help="synthetic items per organ plane")
    p.add_argument("--ram-budget-gb", type=float, default=8.0)
    p.add_argument("--weights", default=None, help="backbone.safetensors (default: random init)")
    p.add_argument("--batch", type=int, default=256, help="extraction batch (finetune uses 256)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--fractions", default=FRACTIONS)
    p.add_argument("--seeds", default=SEEDS)
    p.add_argument("--c-grid", default=None, help="default: the recipe's finetune.c_grid")
    p.add_argument("--grid-rounds", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (tests)")
    p.add_argument("--json", default=None, help="write the JSON here (else to stdout)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.organs, args.batch, args.rounds, args.warmup = 32, 33, 16, 2, 1
        args.fractions, args.seeds = "0.5,1.0", "0,1"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compute.configure_threads(args.threads)
    compute.seed_everything(0)
    devices = resolve_devices(args.devices)
    train, val, data = load_data(args)
    results = []
    for device in devices:
        print(
            f"[bench] {device}: {data['n_train']} + {data['n_val']} images at {args.size} px ...",
            file=sys.stderr,
            flush=True,
        )
        results.append(measure(args, device, train, val))
    out = {"bench": "features_throughput", "env": env_info(args, devices), "data": data, "results": results}
    cols = "device px=image_size dtype memory_format images A_img/s=forward_only.images_per_s "
    cols += "B_img/s=extract.images_per_s B/A=b_over_a cells=grid.cells fits=grid.fits_run grid_s=grid.s "
    cols += "extract_s=grid.extraction_s grid/extract=grid.fraction_of_extraction"
    emit(
        out,
        args.json,
        [("Feature extraction (A: forward only, B: features.extract), linear grid", cols, results)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
