"""VICReg and SimCLR beside Barlow Twins: the losses against direct float64 references, exact under
two processes, the methods' recipe defaults, and a run of each recorded and reported by method."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medssl_cli.methods import objective
from medssl_cli.methods.simclr import simclr_loss
from medssl_cli.methods.vicreg import vicreg_loss
from medssl_cli.recipe import METHOD_DEFAULTS, Recipe, resolve

ROOT = Path(__file__).resolve().parents[1]


def vicreg_reference(x: torch.Tensor, y: torch.Tensor, sim: float, std: float, cov: float) -> torch.Tensor:
    """The official VICReg code's loss, line by line (float64)."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x, cov_y = (x.T @ x) / (n - 1), (y.T @ y) / (n - 1)
    off = lambda m: m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()  # noqa: E731
    cov_loss = off(cov_x).pow_(2).sum().div(d) + off(cov_y).pow_(2).sum().div(d)
    return sim * repr_loss + std * std_loss + cov * cov_loss


def simclr_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent by its definition, one anchor at a time (float64)."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        p = i + n if i < n else i - n
        s = z @ z[i] / t
        others = torch.cat([s[:i], s[i + 1 :]])
        total = total - (s[p] - torch.logsumexp(others, 0))
    return total / (2 * n)


def _pair(n: int = 16, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_vicreg_matches_the_official_code() -> None:
    z1, z2 = _pair()
    loss, inv, rest = vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    torch.testing.assert_close(loss, vicreg_reference(z1, z2, 25.0, 25.0, 1.0))
    torch.testing.assert_close(inv, F.mse_loss(z1, z2))
    torch.testing.assert_close(loss, 25.0 * inv + rest)
    collapsed = torch.ones(16, 6, dtype=torch.float64)  # no variance: the variance term is at its maximum
    assert vicreg_loss(collapsed, collapsed, 0.0, 1.0, 0.0)[0].item() == pytest.approx(1 - 0.01, abs=1e-9)


def test_simclr_matches_the_definition() -> None:
    z1, z2 = _pair(8, 5)
    for t in (0.1, 0.5):
        loss, same, zero = simclr_loss(z1, z2, t)
        torch.testing.assert_close(loss, simclr_reference(z1, z2, t))
        assert same.item() == loss.item() and zero.item() == 0
    aligned = simclr_loss(z1, z1.clone(), 0.1)[0]
    assert aligned < simclr_loss(z1, z2, 0.1)[0]  # identical views: the positives are closest


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    sys.path.insert(0, {root!r})
    from medssl_cli.methods.simclr import simclr_loss
    from medssl_cli.methods.vicreg import vicreg_loss

    def work(rank, out):
        dist.init_process_group("gloo", init_method="file://" + out + "/store", rank=rank, world_size=2)
        result = {{}}
        for name, fn in (("vicreg", lambda a, b: vicreg_loss(a, b, 25.0, 25.0, 1.0, 2)),
                         ("simclr", lambda a, b: simclr_loss(a, b, 0.2, 2))):
            g = torch.Generator().manual_seed(0)
            z1 = torch.randn(12, 5, generator=g, dtype=torch.float64)
            z2 = z1 + 0.5 * torch.randn(12, 5, generator=g, dtype=torch.float64)
            a = z1[rank * 6 : (rank + 1) * 6].clone().requires_grad_()
            b = z2[rank * 6 : (rank + 1) * 6].clone().requires_grad_()
            loss = fn(a, b)[0]
            loss.backward()
            result.update({{name + "/loss": loss.detach(), name + "/ga": a.grad, name + "/gb": b.grad}})
        torch.save(result, f"{{out}}/r{{rank}}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(sys.argv[1],), nprocs=2)
    """
)


@pytest.mark.slow  # starts processes
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name, fn in (("vicreg", lambda a, b: vicreg_loss(a, b, 25.0, 25.0, 1.0)),
                     ("simclr", lambda a, b: simclr_loss(a, b, 0.2))):  # fmt: skip
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(12, 5, generator=g, dtype=torch.float64).requires_grad_()
        z2 = (z1.detach() + 0.5 * torch.randn(12, 5, generator=g, dtype=torch.float64)).requires_grad_()
        loss = fn(z1, z2)[0]
        loss.backward()
        for rank in (0, 1):
            got = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
            torch.testing.assert_close(got[f"{name}/loss"], loss.detach())
            rows = slice(rank * 6, (rank + 1) * 6)
            # each rank's gradient is world_size x its share of the global one; DDP's averaging divides it out
            torch.testing.assert_close(got[f"{name}/ga"] / 2, z1.grad[rows])
            torch.testing.assert_close(got[f"{name}/gb"] / 2, z2.grad[rows])


def test_method_defaults_come_from_the_papers_and_yield_to_the_user(tmp_path: Path) -> None:
    assert resolve(None, {}).model.projector == [2048, 2048, 2048]  # Barlow Twins: the built-ins
    simclr = resolve(None, {"pretrain.method": "simclr"})
    assert simclr.model.projector == METHOD_DEFAULTS["simclr"]["model.projector"] == [2048, 128]
    assert simclr.pretrain.lr == 0.4 and simclr.pretrain.optimizer == "lars"
    assert resolve(None, {"pretrain.method": "vicreg", "pretrain.lr": 0.05}).pretrain.lr == 0.05  # CLI wins
    (tmp_path / "r.yaml").write_text("pretrain: {method: vicreg, weight_decay: 0.001}\n")
    r = resolve(tmp_path / "r.yaml", {})
    assert r.pretrain.weight_decay == 0.001 and r.pretrain.lr == 0.3  # file wins over the method's default
    z1, z2 = _pair()
    assert objective(r.pretrain)(z1, z2, 1)[0].item() == pytest.approx(vicreg_loss(z1, z2)[0].item())
    assert objective(Recipe().pretrain)(z1, z2, 1)[0].item() > 0


@pytest.mark.parametrize("method, name", [("vicreg", "VICReg"), ("simclr", "SimCLR")])
def test_a_run_of_each_method_is_recorded_and_reported_by_its_name(
    synth_root: Path, tmp_path: Path, method: str, name: str
) -> None:
    from safetensors import safe_open

    from medssl_cli.stages.evaluate import evaluate
    from medssl_cli.stages.finetune import finetune
    from medssl_cli.stages.pretrain import pretrain
    from medssl_cli.stages.report import report

    keys = {"pretrain.method": method, "data.datasets": ["synthetic_organs_axial"], "data.image_size": 32,
            "pretrain.epochs": 1, "pretrain.batch_size": 8, "pretrain.rankme_samples": 16,
            "compute.threads": 1}  # fmt: skip
    run = pretrain(resolve(None, keys), data_dir=synth_root, runs_root=tmp_path)
    assert run.manifest["method"]["method"] == method
    with safe_open(str(run.file("weights", "backbone.safetensors")), "pt") as fh:
        assert fh.metadata()["method"] == method
    grid = finetune({"finetune.inits": ["ssl", "random"], "finetune.c_grid": [1.0], "compute.threads": 1},
                    from_run=run.path, runs_root=tmp_path, data_dir=synth_root)  # fmt: skip
    evaluate({}, from_run=grid.path, runs_root=tmp_path, data_dir=synth_root)
    text = (report(runs_root=tmp_path, from_grid=grid.path, name="m") / "report.md").read_text()
    assert f"| {name} | linear |" in text and "| Barlow Twins |" not in text


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("method", ["vicreg", "simclr"])
def test_torchrun_two_processes_train_each_method(synth_root: Path, tmp_path: Path, method: str) -> None:
    """`torchrun --nproc-per-node 2 -m medssl_cli.cli pretrain --method M` finishes, with gloo ranks."""
    import os

    from medssl_cli.runs import Run

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "data: {datasets: [synthetic_organs_axial, synthetic_organs_coronal], image_size: 32}\n"
        "pretrain: {epochs: 2, batch_size: 16, warmup_epochs: 1, rankme_samples: 16}\n"
        "compute: {precision: fp32, threads: 1, device: cpu}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDSSL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "MEDSSL_DIST_TIMEOUT": "5"}  # fmt: skip
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "medssl_cli.cli", "pretrain", "--recipe", str(recipe), "--method", method,
           "--run-dir", str(run_dir), "--data-dir", str(synth_root)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    info = Run(run_dir).manifest
    assert info["status"] == "finished" and info["distributed"]["world_size"] == 2
    assert info["method"]["method"] == method
