"""Backbone, projector, head, and weight files (safetensors only; ImageNet weights from the cache)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from medssl_cli import models
from medssl_cli.errors import UserError
from medssl_cli.models import (
    LinearHead,
    Projector,
    backbone_meta,
    build_backbone,
    build_pretrain_net,
    count_params,
    imagenet_cache_path,
    load_backbone,
    load_imagenet_backbone,
    load_weights,
    save_weights,
)


def test_parameter_counts_match_the_study():
    backbone, projector = build_backbone(3), Projector([2048, 2048, 2048])
    assert count_params(backbone) == 11_176_512  # torchvision resnet18 minus fc (512*1000+1000)
    assert count_params(projector) == 9_445_376  # 512*2048 + 2*2048*2048 + 2 BN layers (2*2048 each)
    assert count_params(backbone) + count_params(projector) == 20_621_888  # "20.6M"
    assert count_params(LinearHead(512, 11)) == 5_643
    frozen = build_backbone(3).requires_grad_(False)
    assert count_params(frozen) == 0


def test_projector_layout():
    proj = Projector([64, 32, 16], in_dim=8)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert [m.out_features for m in proj if isinstance(m, nn.Linear)] == [64, 32, 16]
    assert proj(torch.randn(4, 8)).shape == (4, 16)
    assert [type(m) for m in Projector([16], in_dim=8)] == [nn.Linear]
    with pytest.raises(UserError):
        Projector([])


@pytest.mark.parametrize(
    ("channels", "gray_mode", "conv1_in"),
    [(3, "replicate", 3), (1, "replicate", 3), (1, "native", 1), (3, "native", 3)],
)
def test_backbone_channels(channels, gray_mode, conv1_in):
    net = build_backbone(channels, gray_mode)
    assert net.conv1.in_channels == conv1_in
    assert net(torch.randn(2, channels, 32, 32)).shape == (2, 512)
    meta = backbone_meta(channels, gray_mode, 32)
    assert meta["conv1_channels"] == str(conv1_in)
    assert meta["in_channels"] == str(channels)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert set(meta) == {"arch", "in_channels", "conv1_channels", "gray_mode", "image_size", "feature_dim"}
    with pytest.raises(ValueError):
        net(torch.randn(2, 4 - channels if channels == 3 else 3, 32, 32))


def test_replicate_is_rgb_of_repeated_gray_and_keeps_channels_last():
    gray = build_backbone(1, "replicate").eval()
    rgb = build_backbone(3).eval()
    rgb.load_state_dict(gray.state_dict())  # same keys and shapes: ImageNet weights fit as they are
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)))
        cl = gray.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            cl(x.contiguous(memory_format=torch.channels_last)), rgb(x.repeat(1, 3, 1, 1))
        )


def test_bad_channels_and_gray_mode():
    with pytest.raises(UserError):
        build_backbone(2)
    with pytest.raises(UserError):
        build_backbone(1, "average")  # type: ignore[arg-type]


def test_pretrain_net():
    net = build_pretrain_net(1, "native", [32, 16])
    assert net(torch.randn(4, 1, 32, 32)).shape == (4, 16)
    assert count_params(net) == count_params(net.backbone) + count_params(net.projector)


# --------------------------------------------------------------------------------------------
# safetensors weight files


def test_save_load_roundtrip(tmp_path: Path):
    net = build_backbone(1, "native").eval()
    net.bn1.running_mean.uniform_()  # buffers travel too
    meta = backbone_meta(1, "native", 32)
    path = tmp_path / "w" / "backbone.safetensors"
    save_weights(path, net.to(memory_format=torch.channels_last), meta)
    assert [p.name for p in path.parent.iterdir()] == ["backbone.safetensors"]  # no temp file left
    state, got = load_weights(path, expect=meta)
    assert got == meta
    assert set(state) == set(net.state_dict())
    loaded, _ = load_backbone(path, 1, "native")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net(x))
    # a plain state dict is accepted as well
    save_weights(tmp_path / "head.safetensors", LinearHead(512, 3).state_dict(), {"kind": "head"})
    state, got = load_weights(tmp_path / "head.safetensors")
    assert state["weight"].shape == (3, 512) and got == {"kind": "head"}


def test_save_rejects_non_string_metadata(tmp_path: Path):
    with pytest.raises(TypeError):
        save_weights(tmp_path / "x.safetensors", LinearHead(4, 2), {"image_size": 32})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_metadata_mismatch_names_both_values(tmp_path: Path):
    path = tmp_path / "backbone.safetensors"
    save_weights(path, build_backbone(1, "native"), backbone_meta(1, "native", 32))
    with pytest.raises(UserError) as err:
        load_weights(path, expect=backbone_meta(3, "replicate", 32))
    assert "in_channels='1'" in str(err.value) and "in_channels='3'" in str(err.value)
    with pytest.raises(UserError) as err:
        load_backbone(path, 1, "replicate")  # same data, other conv1
    assert "conv1_channels='1'" in str(err.value) and "conv1_channels='3'" in str(err.value)
    # keys outside arch / in_channels / conv1_channels do not have to agree
    load_weights(path, expect=backbone_meta(1, "native", 224))


class _Payload:
    """Unpickling this calls open(marker, "w"), i.e. creates the marker file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_pickle_without_executing_it(tmp_path: Path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"conv1.weight": _Payload(marker)})
    for name, writer in [
        ("plain.safetensors", lambda p: p.write_bytes(blob)),
        ("torchsave.safetensors", lambda p: torch.save({"x": _Payload(marker)}, p)),
    ]:
        path = tmp_path / name
        writer(path)
        with pytest.raises(UserError) as err:
            load_weights(path)
        assert "is not a safetensors file" in str(err.value)
        assert "\n" not in str(err.value)
        assert not marker.exists()
    pickle.loads(blob)  # the payload is live: loading it the unsafe way does create the marker
    assert marker.exists()


def test_refuses_truncated_empty_and_garbage(tmp_path: Path):
    good = tmp_path / "good.safetensors"
    save_weights(good, LinearHead(64, 4), {"arch": "head"})
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) - 7],
        "header_only": data[:16],
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(UserError, match="not a safetensors file"):
            load_weights(path)
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")
    load_weights(good)  # the intact file loads


# --------------------------------------------------------------------------------------------
# ImageNet weights (never downloaded)


def test_imagenet_missing_names_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    expected = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_cache_path() == expected
    with pytest.raises(UserError) as err:
        load_imagenet_backbone(3)
    assert str(expected) in str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)
    assert "TORCH_HOME" in str(err.value)
    assert not expected.exists()  # nothing was downloaded


@pytest.fixture
def fake_imagenet(tmp_path: Path) -> Path:
    """A torchvision-format ResNet-18 checkpoint (random weights, with fc) as torch hub caches it."""
    path = tmp_path / "resnet18-fake.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_imagenet_modes(fake_imagenet: Path):
    source = torch.load(fake_imagenet, weights_only=True)
    rgb, info = load_imagenet_backbone(3, path=fake_imagenet, check_hash=False)
    torch.testing.assert_close(rgb.conv1.weight, source["conv1.weight"])
    assert info["dropped"] == "fc.weight, fc.bias"
    assert all(isinstance(v, str) for v in info.values())
    rep, info_rep = load_imagenet_backbone(1, "replicate", path=fake_imagenet, check_hash=False)
    nat, info_nat = load_imagenet_backbone(1, "native", path=fake_imagenet, check_hash=False)
    torch.testing.assert_close(rep.conv1.weight, source["conv1.weight"])
    torch.testing.assert_close(nat.conv1.weight, source["conv1.weight"].sum(1, keepdim=True))
    assert "summed" in info_nat["conv1"] and "repeated" in info_rep["conv1"]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # summing conv1 over RGB == feeding the gray image repeated to RGB
        torch.testing.assert_close(nat.eval()(x), rep.eval()(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rep(x), rgb.eval()(x.repeat(1, 3, 1, 1)))


def test_imagenet_hash_and_unreadable(tmp_path: Path, fake_imagenet: Path):
    named = tmp_path / "resnet18-f37072fd.pth"  # the real name: the sha256 prefix is checked
    named.write_bytes(fake_imagenet.read_bytes())
    with pytest.raises(UserError, match="damaged"):
        load_imagenet_backbone(3, path=named)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint, just text")
    with pytest.raises(UserError, match="cannot be read"):
        load_imagenet_backbone(3, path=junk, check_hash=False)


def test_imagenet_default_path_uses_cache(
    tmp_path: Path, fake_imagenet: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(models, "_check_sha256", lambda path: "skipped in test")
    target = imagenet_cache_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(fake_imagenet.read_bytes())
    net, info = load_imagenet_backbone(1, "native")
    assert info["file"] == str(target) and net.conv1.in_channels == 1
