"""The benchmark scripts run end to end (tiny --quick configurations) and report what they promise.

No timing is asserted: only that every number is there, finite, positive, and of the right magnitude
where it does not depend on the machine (FLOP counts, image counts, fit counts).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from medssl_cli.runtime.compute import cpp_compiler_problem

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / f"{script}.py"),
        "--quick",
        "--devices",
        "cpu",
        "--threads",
        "1",
    ]
    proc = subprocess.run(
        [*cmd, "--json", str(out), *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "B/A" in proc.stdout  # the table goes to stdout when the JSON goes to a file
    return json.loads(out.read_text())


def _positive(*values: float) -> None:
    for v in values:
        assert isinstance(v, float) and math.isfinite(v) and v > 0, v


@pytest.mark.slow
def test_pretrain_throughput_quick(tmp_path: Path) -> None:
    compiles = cpp_compiler_problem() is None  # the view variants include compiled views
    data = _run("pretrain_throughput", tmp_path, *(["--view-variants"] if compiles else []))
    assert data["bench"] == "pretrain_throughput" and data["env"]["threads"] == 1
    (r,) = data["results"]
    assert (r["device"], r["image_size"], r["batch"]) == ("cpu", 32, 8)
    assert r["dtype"] in ("bf16", "fp32") and r["memory_format"] in ("nchw", "channels_last")
    assert r["images_on_device"] is True and r["pool_images"] == 32
    _positive(r["model_step"]["samples_per_s"], r["pipeline"]["samples_per_s"], r["views"]["samples_per_s"])
    _positive(r["b_over_a"], r["achieved_gflops"], r["matmul_peak_gflops"], r["efficiency"])
    assert r["b_over_a_target"] == 0.90 and isinstance(r["b_over_a_met"], bool)
    # ResNet-18 at 32 px, 2 views, fwd + bwd, 64-wide projector: ~0.44 GFLOP per sample
    assert 0.3e9 < r["flops_per_sample"] < 0.6e9
    if compiles:
        names = [v["name"] for v in r["view_variants"]]
        assert names == ["compiled", "matmul-blur", "compiled+matmul-blur"]
        for v in r["view_variants"]:
            _positive(v["b_over_a"], v["views_samples_per_s"], v["views_x_default"])
            assert (v["compile_s"] is None) == ("compiled" not in v["name"])
    (c,) = data["chunked"]
    assert (c["batch"], c["chunk"]) == (8, 4)
    _positive(c["chunked_over_plain"], c["plain"]["samples_per_s"], c["chunked"]["efficiency"])
    # the chunked step repeats the forward pass: ~4/3 of the plain step's FLOPs
    assert 1.2 < c["flops_per_sample_chunked"] / c["flops_per_sample"] < 1.5


@pytest.mark.slow
def test_features_throughput_quick(tmp_path: Path) -> None:
    data = _run("features_throughput", tmp_path, "--cache-dir", str(tmp_path / "data"))
    assert data["data"]["synthetic"] is True and data["data"]["classes"] == 11
    (r,) = data["results"]
    assert r["images"] == data["data"]["n_train"] + data["data"]["n_val"] > 0
    _positive(r["forward_only"]["images_per_s"], r["extract"]["images_per_s"], r["b_over_a"])
    assert 0.05e9 < r["flops_per_image"] < 0.1e9  # ResNet-18 forward at 32 px: 0.075 GFLOP
    g = r["grid"]
    assert g["fits"] == 4 and g["fractions"] == [0.5, 1.0] and g["seeds"] == [0, 1]
    assert g["c_grid"] == [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]  # the recipe's default
    assert g["features"] == [data["data"]["n_train"], 512]
    _positive(g["s"], g["extraction_s"], g["fraction_of_extraction"])
    assert g["target"] == 0.10 and isinstance(g["met"], bool)
