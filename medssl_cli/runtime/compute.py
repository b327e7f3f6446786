"""Compute settings: device, precision, memory format, threads, seeds and RNG state.

The "auto" choices follow measurements of a Barlow Twins ResNet-18 training step on the project's
2-core AVX512_BF16 CPU (shared/reference/cpu-probe.md, 2b): bf16 autocast gives 1.3-1.9x over fp32
(more at larger images); channels_last adds ~10-20 % to bf16 at >= 64 px but cost ~25 % at 32 px
(2 threads, batch 128), so on CPU it is on from 64 px. Without native bf16 (no AVX512_BF16 / AMX)
"auto" stays in fp32: emulated bf16 is not expected to be faster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
from typing import Any

import numpy as np
import torch

from medssl_cli.errors import UserError

LOG = logging.getLogger("medssl")

CHANNELS_LAST_MIN_CPU_SIZE = 64  # below this, channels_last costs time on CPU (measured, bf16)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA if available, else CPU. An explicit device that is not there is a UserError."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"Unknown device {name!r}.", "Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"Device {name!r} asked for, but CUDA is not available here.", "Use --device cpu or auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"Device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist.",
                "Use cuda:0 or auto.",
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"Device {name!r} asked for, but MPS is not available here.", "Use cpu or auto.")
    elif device.type != "cpu":
        raise UserError(f"Unsupported device {name!r}.", "Use auto, cpu, cuda or cuda:N.")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512_BF16 or AMX); torch's private probes."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for probe in probes:
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private API may change or fail: fall back to fp32
            continue
    return False


def use_bf16(device: torch.device, precision: str) -> bool:
    """Whether to run the network under bf16 autocast: ``fp32`` no, ``bf16`` yes (if the device can),
    ``auto`` where bf16 is native (CUDA with bf16 support; a CPU with AVX512_BF16 or AMX)."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = cpu_has_native_bf16()
    else:
        supported = False
    if precision == "bf16":
        if device.type == "cuda" and not supported:
            raise UserError(f"compute.precision=bf16 asked for, but {describe_device(device)} has no bf16.")
        return device.type in ("cuda", "cpu")  # CPU without native bf16 still works (emulated, slow)
    if precision == "auto":
        return supported
    raise UserError(f"compute.precision must be auto, bf16 or fp32, got {precision!r}.")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def use_channels_last(device: torch.device, setting: str, image_size: int | None = None) -> bool:
    """``on``/``off`` as given; ``auto``: on for CUDA, and on CPU for images >= 64 px (or size unknown)."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    if setting != "auto":
        raise UserError(f"compute.channels_last must be auto, on or off, got {setting!r}.")
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return image_size is None or image_size >= CHANNELS_LAST_MIN_CPU_SIZE
    return False


def settings_for(c: Any, image_size: int) -> tuple[torch.device, bool, bool]:
    """(device, bf16, channels_last) that a ``compute`` recipe section asks for at ``image_size`` px,
    for one process (the distributed stages add ``distributed.rank_device``)."""
    device = resolve_device(c.device)
    return device, use_bf16(device, c.precision), use_channels_last(device, c.channels_last, image_size)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices). ``deterministic`` also fixes cuDNN's algorithm choice
    (cheap); torch.use_deterministic_algorithms is not set, as it makes some CUDA ops raise."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """All RNG states, for a checkpoint: values are JSON-able lists, or uint8 tensors for torch.

    Keys: ``python`` and ``numpy`` (lists, for JSON), ``torch`` (uint8 tensor) and ``cuda:<i>`` (uint8
    tensor per device, when CUDA is available): tensors go to safetensors, the rest to JSON.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda:{i}"] = s
    return state


def _as_byte_tensor(value: Any) -> torch.Tensor:
    return (
        value.to(torch.uint8).cpu()
        if isinstance(value, torch.Tensor)
        else torch.tensor(value, dtype=torch.uint8)
    )


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (also after a JSON round trip: lists instead of tensors).

    CUDA states are restored for the devices that exist here; missing keys are left alone.
    """
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(
            (kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        )
    if "torch" in state:
        torch.set_rng_state(_as_byte_tensor(state["torch"]))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda:{i}" in state:
                torch.cuda.set_rng_state(_as_byte_tensor(state[f"cuda:{i}"]), device=i)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: torch.device) -> str:
    """One line for logs and reports, e.g. ``cpu (AMD EPYC, 2 threads, native bf16)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    if device.type == "cpu":
        bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
        return f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads, {bf16})"
    return str(device)


def configure_threads(n: int) -> int:
    """Use ``n`` intra-op threads (0: keep torch's default, which is the usable cores). Returns the count."""
    if n < 0:
        raise UserError(f"compute.threads must be >= 0, got {n}.")
    cores = cpu_count()
    if n > cores:  # more threads than cores only contend (and a huge count exhausts the process)
        LOG.warning(f"compute.threads {n} is more than the {cores} usable cores here: using {cores}.")
        n = cores
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_count() -> int:
    """Cores this process may use (respects affinity / container limits where the OS reports them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpp_compiler_problem() -> str | None:
    """Why ``torch.compile`` cannot build CPU code here (no C++ compiler found), or None if it can."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # torch._inductor.exc.InvalidCxxCompiler, or an inductor without this helper
        return type(e).__name__
    return None


def check_compile(device: torch.device) -> None:
    """``torch.compile`` builds C++ for CPU code: refuse up front, in one line, if no compiler is found
    (otherwise the first training step fails with a long inductor traceback)."""
    problem = cpp_compiler_problem() if device.type == "cpu" else None
    if problem is not None:
        raise UserError(
            f"--compile on a CPU needs a C++ compiler, and torch found none ({problem}).",
            "Install g++ (or set CXX), or run without --compile.",
        )
