"""Full fine-tuning with DDP: 2 gloo ranks on CPU equal one process, and a torchrun grid writes once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medssl_cli.models import LinearHead, build_backbone
from medssl_cli.runtime import distributed
from medssl_cli.runtime.launch import Dist, detect
from medssl_cli.stages.finetune import full_ft

GLOBAL_BATCH = 11  # odd: the ranks get 6 and 5 images
CLASSES = 3


def _parts() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = build_backbone(1).train().double()
    head = LinearHead(full_ft.FEATURE_DIM, CLASSES).train().double()
    return backbone, head


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 1, 32, 32, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def _step(backbone: torch.nn.Module, head: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """One full-FT step on this rank's share of the fixed batch: mean loss over the GLOBAL batch,
    gradients (before the optimiser moves the weights they belong to) and the BN running statistics."""
    cpu = torch.device("cpu")
    if d.enabled:
        backbone = distributed.sync_batchnorm(backbone, cpu)
    model = distributed.wrap_ddp(torch.nn.Sequential(backbone, head), d, cpu)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.0)  # lr 0: grads stay visible
    x, y = _batch()
    idx = full_ft.rank_slice(torch.arange(GLOBAL_BATCH), d.rank, d.world_size)
    ce = full_ft.train_step(model, opt, x[idx], y[idx], GLOBAL_BATCH, d.world_size)
    loss = distributed.all_reduce_sum(ce) / GLOBAL_BATCH
    out = {"loss": loss.reshape(1)}
    out.update({f"grad/backbone.{n}": p.grad for n, p in backbone.named_parameters()})
    out.update({f"grad/head.{n}": p.grad for n, p in head.named_parameters()})
    out.update({f"state/{k}": v for k, v in backbone.state_dict().items() if "running_" in k})
    return {k: v.detach().contiguous() for k, v in out.items()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "MEDSSL_DIST_TIMEOUT": "3"})  # fmt: skip
    d = detect()
    with distributed.session(d, torch.device("cpu")):
        torch.set_num_threads(1)
        save_file(_step(*_parts(), d), f"{out}/rank{rank}.safetensors")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.slow  # starts processes
def test_two_gloo_ranks_full_ft_step_equals_one_process(tmp_path: Path, two_gloo_ranks) -> None:  # noqa: ANN001
    """2 ranks (6 + 5 images, DDP, synchronised BN, loss scaled by W/B) == 1 process on all 11 images,
    float64: loss, backbone and head gradients and BN running statistics to 1e-8."""
    ranks = two_gloo_ranks(_worker, tmp_path, 300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _step(*_parts(), Dist())
        backbone, head = _parts()
        x, y = _batch()
        mean_loss = torch.nn.functional.cross_entropy(head(backbone(x)), y)
    finally:
        torch.set_num_threads(threads)
    assert (
        abs(float(ref["loss"]) - float(mean_loss.detach())) < 1e-12
    )  # train_step with W=1 is the plain mean
    assert any(k.startswith("grad/head.") for k in ref) and any("running_var" in k for k in ref)
    for r in ranks:
        assert r.keys() == ref.keys()
        for k in ref:
            assert _rel(r[k], ref[k]) < 1e-8, k
        for k in ref:
            assert torch.allclose(r[k], ranks[0][k], rtol=0, atol=1e-12), k  # the ranks agree
    x, y = _batch()
    backbone, head = _parts()  # control: one process on rank 0's share only
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.0)
    full_ft.train_step(torch.nn.Sequential(backbone, head), opt, x[:6], y[:6], 6, 1)
    assert _rel(head.weight.grad, ref["grad/head.weight"]) > 1e-3  # the checks above can tell


def test_rank_slices_partition_a_batch() -> None:
    b = torch.arange(11)
    parts = [full_ft.rank_slice(b, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), b) and [len(p) for p in parts] == [4, 4, 3]


@pytest.mark.slow  # starts processes
def test_torchrun_full_grid_two_ranks(synth_root: Path, tmp_path: Path, port: int) -> None:
    """torchrun, 2 CPU ranks: one grid, one set of cell files, world size 2 recorded, per-rank logs; the
    linear cell runs on rank 0 while rank 1 waits."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MEDSSL_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1", "MEDSSL_DIST_TIMEOUT": "3"}  # fmt: skip
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={port}", "-m", "medssl_cli.cli", "finetune", "--init", "random",
           "--mode", "linear,full", "--fraction", "1", "--seeds", "0", "--epochs", "2", "--batch-size", "16",
           "--datasets", "synthetic_organs_axial", "--image-size", "32", "--device", "cpu",
           "--runs-root", str(runs), "--data-dir", str(synth_root)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    grids = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    assert len(grids) == 1, list(runs.iterdir())
    grid = grids[0]
    info = json.loads((grid / "run.json").read_text())
    assert info["status"] == "finished" and info["cells_finished"] == 2
    assert info["distributed"]["world_size"] == 2 and info["distributed"]["backend"] == "gloo"
    assert (grid / "log.txt").is_file() and (grid / "log.rank1.txt").is_file()
    cells = sorted(p.name for p in (grid / "cells").iterdir())
    assert cells == ["random-full-f1-s0", "random-linear-f1-s0"]
    full = grid / "cells" / "random-full-f1-s0"
    cell = json.loads((full / "run.json").read_text())
    assert cell["status"] == "finished" and cell["distributed"]["world_size"] == 2
    history = [json.loads(line) for line in (full / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]  # written once (by rank 0), not once per rank
    assert (full / "weights" / "backbone.safetensors").is_file() and (full / "metrics.json").is_file()
    assert (full / "log.txt").is_file() and (full / "log.rank1.txt").is_file()
    assert sorted(p.name for p in runs.iterdir()) == [".cache", grid.name]  # no second grid, no temporaries
