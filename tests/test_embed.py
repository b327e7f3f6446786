"""`medssl embed`: features of whole splits in a file numpy opens in one line, through the probes' path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_error_line

from medssl_cli.cli import main
from medssl_cli.data.pool import load_pool
from medssl_cli.readout import backbones
from medssl_cli.readout.features import extract
from medssl_cli.runtime import compute
from medssl_cli.stages.embed import embed


def test_embed_writes_features_labels_rows_and_provenance(
    synth_root: Path, make_fake_pretrain, tmp_path
) -> None:
    pre = make_fake_pretrain(tmp_path)
    run = embed({}, splits=["train", "test"], runs_root=tmp_path, data_dir=synth_root, name="x")
    d = np.load(run.file("features.npz"), allow_pickle=False)  # one line, no pickle
    train = load_pool(synth_root, ["synthetic_organs_axial"], ["train"], image_size=32)
    test = load_pool(synth_root, ["synthetic_organs_axial"], ["test"], image_size=32)
    n = len(train) + len(test)
    assert d["features"].shape == (n, 512) and d["features"].dtype == np.float32
    assert list(d["split"]) == ["train"] * len(train) + ["test"] * len(test)
    assert np.array_equal(d["label"], np.concatenate([train.labels, test.labels]))
    assert np.array_equal(d["row"][len(train) :], test.source_idx) and d["item"][0].startswith(
        "synthetic_organs_/"
    )
    prov = json.loads(str(d["provenance"]))
    assert prov["init"] == "ssl" and prov["pretrain_run"] == str(pre.path) and prov["image_size"] == 32
    lb = backbones.from_pretrain_run(pre, 1)  # the probes' extraction (same precision): the same numbers
    cpu = torch.device("cpu")
    ours = extract(lb.module, test.images, (lb.mean, lb.std), device=cpu, bf16=compute.use_bf16(cpu, "auto"))
    assert np.array_equal(d["features"][len(train) :], ours.numpy())
    with torch.no_grad():  # and the plain fp32 forward pass, to bf16 precision
        x = torch.as_tensor(test.images[range(len(test))]).float() / 255
        assert np.allclose(
            d["features"][len(train) :], lb.module(lb.prepare(x)).numpy(), atol=0.02, rtol=0.02
        )
    assert run.manifest["status"] == "finished" and run.path.name.startswith("embed-x-")


def test_embed_random_init_and_bad_options(synth_root: Path, tmp_path: Path, capsys) -> None:
    run = embed({"data.datasets": ["synthetic_crc"]}, init="random", splits=["val"], runs_root=tmp_path,
                data_dir=synth_root)  # fmt: skip
    d = np.load(run.file("features.npz"))
    assert list(d["class_names"]) and set(d["split"]) == {"val"} and set(d["item"]) == {""}
    root = ["--runs-root", str(tmp_path), "--data-dir", str(synth_root)]
    capsys.readouterr()  # the run above logged to the console: only the CLI calls below are checked
    one_error_line(["embed", "--init", "random", *root], capsys, "needs --datasets")
    crc = ["--init", "random", "--datasets", "synthetic_crc"]
    one_error_line(["embed", *crc, "--splits", "train,train", *root], capsys, "named twice")
    one_error_line(["embed", "--init", "sideways", *root], capsys, "Unknown init")
    with pytest.raises(SystemExit) as exc:
        main(["embed", "--init", "random", "--datasets", "synthetic_crc", "--splits", "test", *root])
    assert exc.value.code in (0, None)
