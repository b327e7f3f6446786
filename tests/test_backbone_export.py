"""The README's "Use the backbone in your own code" lines, run as written: they give medssl's features."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from medssl_cli.data.pool import load_pool
from medssl_cli.readout import backbones

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use the backbone in your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(snippet: str, path: Path) -> dict:
    code = re.sub(r'^path = ".*"$', f"path = {str(path)!r}", snippet, count=1, flags=re.M)
    assert code != snippet  # the README names a weights path that the test replaces
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own lines
    return scope


@pytest.mark.parametrize("gray_mode", ["replicate", "native"])
def test_readme_torchvision_lines_give_medssl_features(
    synth_root: Path, make_fake_pretrain, tmp_path: Path, gray_mode: str
) -> None:
    run = make_fake_pretrain(tmp_path, name=gray_mode, recipe_extra={"model.gray_mode": gray_mode})
    if gray_mode == "native":  # the fake run writes a replicate backbone: rewrite it with a 1-channel conv1
        from medssl_cli.models import backbone_meta, build_backbone, load_weights, save_weights

        path = run.file("weights", "backbone.safetensors")
        _, meta = load_weights(path)
        torch.manual_seed(0)
        save_weights(path, build_backbone(1, "native"), {**meta, **backbone_meta(1, "native", 32)})
    path = run.file("weights", "backbone.safetensors")
    scope = _run(readme_snippet(), path)
    pool = load_pool(synth_root, ["synthetic_organs_axial"], ["test"], image_size=32)
    images = torch.as_tensor(pool.images[range(len(pool))])
    theirs = scope["features"](images)
    lb = backbones.from_pretrain_run(run, 1)
    with torch.no_grad():
        ours = lb.module(lb.prepare(images.float() / 255))
    assert theirs.shape == (len(pool), 512)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)


def test_readme_timm_line(synth_root: Path, make_fake_pretrain, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    run = make_fake_pretrain(tmp_path, name="timm")
    scope = _run(readme_snippet(), run.file("weights", "backbone.safetensors"))
    net = timm.create_model("resnet18", num_classes=0, pretrained=False)
    net.load_state_dict(scope["state"])
    net.eval()
    pool = load_pool(synth_root, ["synthetic_organs_axial"], ["test"], image_size=32)
    x = (torch.as_tensor(pool.images[range(len(pool))]).float() / 255 - scope["mean"]) / scope["std"]
    with torch.no_grad():
        assert torch.allclose(net(x.expand(-1, 3, -1, -1)), scope["net"](x.expand(-1, 3, -1, -1)), atol=1e-5)
