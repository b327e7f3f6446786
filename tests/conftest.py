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
