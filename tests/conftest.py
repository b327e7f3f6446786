"""Shared fixtures: tiny MIMeta-format data written by medssl's own writer, read through `mimeta`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os  # noqa: E402

import pytest  # noqa: E402

os.environ.setdefault("MEDSSL_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic MIMeta root (32 px): 3 organ planes x 66 items, crc 108 images. Read-only."""
    from medssl_cli.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("mimeta")
    make_synthetic(root, organs=66, crc=108, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def real_ids_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data under the real MIMeta ids (organs_axial, ..., crc), 32 px."""
    from medssl_cli.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("mimeta_real_ids")
    make_synthetic(root, organs=66, crc=108, size=32, seed=1, ids="real")
    return root


@pytest.fixture(scope="session")
def make_fake_pretrain(synth_root: Path):
    """Factory for a finished pretrain run as stages/pretrain leaves it, without training: a seeded
    random backbone in weights/backbone.safetensors (with the metadata the pretrain stage writes),
    recipe.yaml, run.json (status finished) and data_seen.json (+ ``extra_seen`` to simulate leakage)."""

    def make(
        runs_root: Path,
        datasets: tuple[str, ...] = ("synthetic_organs_axial",),
        *,
        image_size: int = 32,
        seed: int = 123,
        extra_seen: dict | None = None,
        name: str = "fake",
        recipe_extra: dict | None = None,
    ):
        import json

        import torch

        from medssl_cli import __version__
        from medssl_cli.data.pool import load_pool
        from medssl_cli.io import write_json
        from medssl_cli.models import backbone_meta, build_backbone, save_weights
        from medssl_cli.recipe import Recipe, override
        from medssl_cli.runs import create_run

        keys = {"data.datasets": list(datasets), "data.image_size": image_size, **(recipe_extra or {})}
        recipe = override(Recipe(), keys)
        pool = load_pool(synth_root, list(datasets), ["train"], image_size=image_size, supervised=False)
        run = create_run(runs_root, "pretrain", recipe, name=name, extra={"data": pool.provenance()})
        seen = pool.seen()
        for ds, splits in (extra_seen or {}).items():
            seen.setdefault(ds, {}).update(splits)
        write_json(run.file("data_seen.json"), seen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(pool.channels, "replicate")
        meta = backbone_meta(pool.channels, "replicate", image_size)
        norm = json.dumps([0.5] * pool.channels)
        meta.update(norm_mean=norm, norm_std=norm, datasets=json.dumps(pool.dataset_ids))
        meta.update(recipe_hash=recipe.hash(), medssl_version=__version__, init="ssl")
        save_weights(run.file("weights", "backbone.safetensors"), backbone, meta)
        run.set_status("finished")
        return run

    return make


@pytest.fixture(scope="module")
def one_torch_thread():  # noqa: ANN201 - generator fixture
    """One torch thread for a module: on a busy 2-core machine two threads contend and run 10-30x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A free TCP port on loopback (for torch.distributed rendezvous in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def two_gloo_ranks():  # noqa: ANN201 - returns a runner
    """Run ``worker(rank, port, out_dir)`` in 2 spawned processes; returns each rank's
    ``out_dir/rank<r>.safetensors``. Fails the test if the workers hang."""
    import time

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    def run(worker, out_dir: Path, timeout_s: float = 300) -> list:  # noqa: ANN001
        ctx = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=2, join=False,
                                 start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("distributed workers hung")
        return [load_file(str(Path(out_dir) / f"rank{r}.safetensors")) for r in range(2)]

    return run


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test: one logical console line must not be wrapped into several (the one-line checks)."""
    monkeypatch.setenv("COLUMNS", "400")
