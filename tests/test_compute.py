"""runtime.compute: device, precision, memory format, autocast, seeds, RNG state, threads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medssl_cli.errors import UserError
from medssl_cli.runtime import compute


def test_resolve_device():
    assert compute.resolve_device("cpu") == torch.device("cpu")
    assert compute.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError):
        compute.resolve_device("tpu")
    with pytest.raises(UserError):
        compute.resolve_device("not a device")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            compute.resolve_device("cuda")
    with pytest.raises(UserError):
        compute.resolve_device("cuda:64")


def test_precision_and_channels_last_choices():
    cpu = torch.device("cpu")
    assert compute.use_bf16(cpu, "fp32") is False
    assert compute.use_bf16(cpu, "bf16") is True
    assert compute.use_bf16(cpu, "auto") is compute.cpu_has_native_bf16()
    with pytest.raises(UserError):
        compute.use_bf16(cpu, "fp16")
    assert compute.use_channels_last(cpu, "on") and not compute.use_channels_last(cpu, "off")
    assert compute.use_channels_last(cpu, "auto", image_size=224)
    assert not compute.use_channels_last(cpu, "auto", image_size=32)
    assert compute.use_channels_last(torch.device("cuda"), "auto", image_size=32)
    with pytest.raises(UserError):
        compute.use_channels_last(cpu, "maybe")


def test_autocast_context():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with compute.autocast(cpu, True):
        assert (a @ b).dtype == torch.bfloat16
    with compute.autocast(cpu, False):
        assert (a @ b).dtype == torch.float32


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_repeats():
    compute.seed_everything(123)
    first = _draws()
    compute.seed_everything(123)
    assert _draws() == first
    compute.seed_everything(124)
    assert _draws() != first


def test_rng_state_round_trip_through_json_and_safetensors(tmp_path: Path):
    compute.seed_everything(7)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    state = compute.rng_state()
    expected = _draws()
    # split for a checkpoint: tensors to safetensors, the rest to JSON
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert tensors["torch"].dtype == torch.uint8
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    (tmp_path / "rng.json").write_text(json.dumps(plain))
    _draws()  # move on
    restored = {
        **json.loads((tmp_path / "rng.json").read_text()),
        **load_file(str(tmp_path / "rng.safetensors")),
    }
    compute.set_rng_state(restored)
    assert _draws() == expected
    # a fully JSON state (torch state as a list of ints) works too
    compute.set_rng_state({**plain, "torch": state["torch"].tolist()})
    assert _draws() == expected


def test_describe_and_threads():
    text = compute.describe_device(torch.device("cpu"))
    assert text.startswith("cpu (") and "threads" in text and "bf16" in text
    before = torch.get_num_threads()
    try:
        assert compute.configure_threads(0) == before
        assert compute.configure_threads(1) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError):
        compute.configure_threads(-1)
    assert compute.cpu_count() >= 1
