"""`medssl demo` runs every stage through the same functions as the individual commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY = """
data:
  datasets: [synthetic_organs_axial, synthetic_organs_coronal, synthetic_organs_sagittal]
  image_size: 32
model:
  projector: [64, 64]
pretrain: {epochs: 2, batch_size: 32, lr: 0.001, warmup_epochs: 0, checkpoint_every: 1}
finetune: {inits: [ssl, random], modes: [linear], fractions: [0.1, 1.0], seeds: [0, 1]}
tsne: {max_samples: 60, perplexity: 10}
compute: {precision: fp32}
"""


@pytest.mark.slow
def test_demo_end_to_end(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medssl_cli.cli import main

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    with pytest.raises(SystemExit) as exc:
        main(
            ["demo", "--data-dir", str(data), "--runs-root", str(tmp_path / "runs"), "--recipe", str(recipe)]
            + ["--docs", str(tmp_path / "docs")]
        )
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    stages = {
        json.loads((d / "run.json").read_text())["stage"]
        for d in (tmp_path / "runs").iterdir()
        if (d / "run.json").is_file()
    }
    assert {"pretrain", "finetune", "tsne", "report"} <= stages
    (report_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith("report-")]
    md = (report_dir / "report.md").read_text()
    grid_dir = next(d for d in (tmp_path / "runs").iterdir() if d.name.startswith("finetune-"))
    assert json.loads((report_dir / "run.json").read_text())["scope"] == f"finetune grid {grid_dir}"
    assert "SYNTHETIC" in md.upper() and "ssl" in md and "random" in md
    assert (tmp_path / "docs" / "demo-table.md").read_text().count("| Barlow Twins | linear |") == 2
    assert (tmp_path / "docs" / "demo-fraction-accuracy.png").stat().st_size > 1000
    html = (report_dir / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert str(report_dir / "report.html") in out.err.replace("\n", "")


def test_demo_keeps_existing_data_and_checks_inputs_first(synth_root: Path, tmp_path: Path) -> None:
    from medssl_cli.errors import UserError
    from medssl_cli.stages.demo import demo, ensure_synthetic

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    shutil.rmtree(data / "synthetic_organs_sagittal")
    crc_before = (data / "synthetic_crc" / "images.hdf5").read_bytes()
    with pytest.raises(UserError, match="synthetic_organs_sagittal"):
        ensure_synthetic(data)
    assert (data / "synthetic_crc" / "images.hdf5").read_bytes() == crc_before  # left as it was
    empty = tmp_path / "empty"
    with pytest.raises(UserError, match="not found"):  # a bad recipe: found before any data is written
        demo(data_dir=empty, runs_root=tmp_path / "runs", recipe_file=tmp_path / "nope.yaml")
    (tmp_path / "afile").write_text("x")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    with pytest.raises(UserError, match="--docs"):
        demo(data_dir=empty, runs_root=tmp_path / "runs", recipe_file=recipe, docs=tmp_path / "afile")
    assert not empty.exists() and not (tmp_path / "runs").exists()
