"""Batched Barlow Twins views: each op in isolation, shapes, 1-channel rules, determinism (32 px)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from medssl_cli.barlowtwins import views as augment
from medssl_cli.barlowtwins.blur import blur_matrices
from medssl_cli.barlowtwins.views import make_pair, make_view, normalize, to_float
from medssl_cli.errors import UserError
from medssl_cli.recipe import ViewRecipe, ViewsRecipe

# Every op off, full-image crop, no flip: each test switches on what it checks.
OFF = ViewRecipe(
    crop_scale=[1.0, 1.0],
    crop_ratio=[1.0, 1.0],
    flip_p=0.0,
    jitter_p=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    blur_sigma=[0.1, 2.0],
    solarize_p=0.0,
)


def off(**changes) -> ViewRecipe:
    return dataclasses.replace(OFF, **changes)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(b: int, c: int, size: int = 32, lo: int = 0, hi: int = 256, seed: int = 0) -> torch.Tensor:
    """Distinct low-frequency uint8 images (a 4x4 random field, upsampled) with values in [lo, hi)."""
    coarse = torch.rand(b, c, 4, 4, generator=gen(seed))
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (lo + img * (hi - 1 - lo)).round().to(torch.uint8)


def noise_images(b: int, c: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), generator=gen(seed), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Shapes, ranges, geometry


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("src,out", [(32, 32), (64, 24), (32, 48), (40, 32)])
def test_default_views_shape_dtype_range(channels, src, out):
    x = noise_images(6, channels, src)
    v1, v2 = make_pair(x, ViewsRecipe(), out, gen())
    for v in (v1, v2):
        assert v.shape == (6, channels, out, out)
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()
        assert v.min() >= 0 and v.max() <= 1


def test_full_crop_same_size_is_identity():
    x = noise_images(4, 3)
    y = make_view(x, OFF, 32, gen())
    torch.testing.assert_close(y, x.float() / 255, atol=1e-5, rtol=0)


def test_full_crop_equals_to_float_when_resizing():
    for src, out in [(64, 32), (128, 32), (32, 48), (50, 20)]:
        x = noise_images(3, 3, src)
        torch.testing.assert_close(make_view(x, OFF, out, gen()), to_float(x, out), atol=1e-5, rtol=0)


def test_upscaling_matches_bilinear_interpolate():
    x = noise_images(2, 1, 16)
    ref = F.interpolate(x.float() / 255, size=(40, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(to_float(x, 40), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(make_view(x, OFF, 40, gen()), ref, atol=1e-5, rtol=0)


def test_random_crops_match_torchvision_resized_crop():
    """Crop + resize + flip equal torchvision's resized_crop(antialias=True) + hflip of the same box."""
    x = noise_images(6, 3, 80)
    u = torch.rand(6, 50, generator=gen(2))
    top, left, h, w = augment.sample_crop_boxes(u, 80, 80, [0.08, 1.0], [0.75, 4 / 3])
    flip = torch.tensor([True, False, True, False, True, False])
    for out in (24, 112):  # down- and upscaling
        y = augment.resized_crop(x, top, left, h, w, flip, out)
        for i in range(6):
            box = [int(v[i]) for v in (top, left, h, w)]
            ref = TF.resized_crop(x[i].float() / 255, *box, [out, out], antialias=True)
            ref = TF.horizontal_flip(ref) if flip[i] else ref
            torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


def test_downscaling_is_antialiased():
    """A 1-px checkerboard averages to flat gray, not to an aliased pattern, when shrunk 4x."""
    idx = torch.arange(64)
    board = ((idx.view(-1, 1) + idx.view(1, -1)) % 2 * 255).to(torch.uint8).expand(2, 1, 64, 64)
    for y in (to_float(board, 16), make_view(board, OFF, 16, gen())):
        assert (y - 0.5).abs().max() < 0.01


def test_flip_gives_exact_mirror():
    x = noise_images(4, 3)
    y = make_view(x, off(flip_p=1.0), 32, gen())
    torch.testing.assert_close(y, torch.flip(x.float() / 255, dims=[-1]), atol=1e-5, rtol=0)


def test_crop_fallback_is_centre_crop():
    # ratio 2..3 never fits a full-area square: torchvision falls back to the widest centre crop (32 x 16)
    x = noise_images(2, 1, 32)
    y = make_view(x, off(crop_ratio=[2.0, 3.0]), 32, gen())
    ref = F.interpolate(x[:, :, 8:24, :].float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


def test_crop_boxes_follow_scale_and_ratio():
    u = torch.rand(4000, 50, generator=gen())
    top, left, h, w = augment.sample_crop_boxes(u, 100, 100, [0.2, 0.5], [0.75, 4 / 3])
    area = h * w / 1e4
    assert area.min() > 0.18 and area.max() < 0.52  # integer rounding lets it stray a little
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all() and (left + w <= 100).all()
    assert (top == top.round()).all() and (h == h.round()).all()
    assert top.float().std() > 5  # the position varies


def test_crop_boxes_match_torchvision_statistics():
    """Large scale range: some attempts do not fit; boxes stay inside and match torchvision's sampling."""
    from torchvision.transforms import v2

    n = 4000
    top, left, h, w = augment.sample_crop_boxes(
        torch.rand(n, 50, generator=gen()), 60, 100, [0.08, 1.0], [0.5, 2.0]
    )
    assert (top >= 0).all() and (top + h <= 60).all() and (left >= 0).all() and (left + w <= 100).all()
    torch.manual_seed(0)
    ref = torch.tensor(
        [v2.RandomResizedCrop.get_params(torch.empty(1, 60, 100), [0.08, 1.0], [0.5, 2.0]) for _ in range(n)]
    )
    ref = ref.float()
    ours = torch.stack([top, left, h, w], dim=1)
    assert (ours.mean(0) - ref.mean(0)).abs().max() < 2.0  # pixels; sampling noise is ~0.5
    assert (ours.std(0) - ref.std(0)).abs().max() < 2.0
    # top and left correlate only through the box size, as in torchvision
    corr = torch.corrcoef(torch.stack([top, left]))[0, 1]
    assert (corr - torch.corrcoef(ref[:, :2].T)[0, 1]).abs() < 0.08


def test_random_crops_are_zoomed_in_parts():
    """A smaller crop of a horizontal ramp spans a smaller range of values."""
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).expand(16, 1, 64, 64)
    full = make_view(ramp, OFF, 32, gen())
    part = make_view(ramp, off(crop_scale=[0.1, 0.3]), 32, gen())
    span = lambda v: v.amax(dim=(1, 2, 3)) - v.amin(dim=(1, 2, 3))  # noqa: E731
    assert (span(part) < 0.75 * span(full)).all()


# --------------------------------------------------------------------------------------------
# Photometric ops


def test_brightness_scales_each_sample():
    x = smooth_images(16, 3, lo=20, hi=120)  # at most 0.47: a factor <= 1.9 never clips
    src = x.float() / 255
    y = make_view(x, off(jitter_p=1.0, brightness=0.9), 32, gen())
    ratio = y / src
    per_sample = ratio.mean(dim=(1, 2, 3))
    assert (ratio - per_sample.view(-1, 1, 1, 1)).abs().max() < 1e-4  # one factor per image
    assert per_sample.min() >= 0.1 - 1e-4 and per_sample.max() <= 1.9 + 1e-4
    assert per_sample.std() > 0.1  # and it differs between images
    assert (y.mean(dim=(1, 2, 3)) - src.mean(dim=(1, 2, 3))).abs().max() > 0.05


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_scales_deviation_from_mean(channels):
    x = smooth_images(16, channels, lo=100, hi=156)  # near the middle: factors <= 1.5 never clip
    src = x.float() / 255
    y = make_view(x, off(jitter_p=1.0, contrast=0.5), 32, gen())
    std_ratio = y.std(dim=(2, 3)) / src.std(dim=(2, 3))
    assert std_ratio.min() >= 0.5 - 1e-3 and std_ratio.max() <= 1.5 + 1e-3
    assert std_ratio.std() > 0.1
    if channels == 1:  # the image mean is the pivot
        torch.testing.assert_close(y.mean(dim=(2, 3)), src.mean(dim=(2, 3)), atol=1e-4, rtol=0)


def test_jitter_probability_zero_and_partial():
    x = smooth_images(64, 3, lo=20, hi=120)
    strong = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.3)
    base = make_view(x, OFF, 32, gen())
    assert torch.equal(make_view(x, off(jitter_p=0.0, **strong), 32, gen()), base)  # exact no-op
    y = make_view(x, off(jitter_p=0.5, **strong), 32, gen())
    changed = (y - base).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert ((y - base).abs().amax(dim=(1, 2, 3))[~changed] < 1e-5).all()  # the rest stays put
    assert 10 < changed.sum() < 54


def test_saturation_and_hue_match_torchvision():
    x = noise_images(5, 3).float() / 255
    sat = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    hue = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.45])
    got_s = augment.adjust_saturation_(x.clone(), sat)
    got_h = augment.adjust_hue_(x.clone(), hue)
    for i in range(5):
        ref_s = TF.adjust_saturation(x[i], sat[i].item())
        ref_h = TF.adjust_hue(x[i], hue[i].item())
        torch.testing.assert_close(got_s[i], ref_s, atol=1e-4, rtol=0)
        torch.testing.assert_close(got_h[i], ref_h, atol=1e-4, rtol=0)


def test_hue_rotates_primaries():
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = augment.adjust_hue_(red, torch.tensor([1 / 3]))
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_grayscale_gives_equal_channels():
    x = noise_images(4, 3)
    y = make_view(x, off(grayscale_p=1.0), 32, gen())
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    torch.testing.assert_close(y, TF.rgb_to_grayscale(x.float() / 255, 3), atol=1e-5, rtol=0)


def test_solarize_inverts_above_threshold():
    x = noise_images(4, 3)
    src = x.float() / 255
    y = make_view(x, off(solarize_p=1.0), 32, gen())
    torch.testing.assert_close(y, torch.where(src >= 0.5, 1 - src, src), atol=1e-5, rtol=0)


def test_blur_matches_torchvision_per_sample():
    x = noise_images(3, 3).float() / 255
    sigma = torch.tensor([0.5, 1.0, 2.0])
    y = augment.gaussian_blur(x, augment.gaussian_kernels(sigma, 6))
    for i in range(3):
        ref = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[sigma[i].item()] * 2)
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("size", "radius"), [(32, 6), (9, 4), (5, 7)])  # (5, 7): kernel trimmed
def test_matmul_blur_equals_conv_blur(size: int, radius: int):
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    kernels = augment.gaussian_kernels(torch.tensor([0.3, 1.0, 2.0, 4.0]), radius)
    conv = augment.gaussian_blur(x, kernels, "conv")
    mm = augment.gaussian_blur(x, kernels, "matmul")
    assert (conv - x).abs().max() > 0.05  # it blurs
    torch.testing.assert_close(mm, conv, atol=1e-6, rtol=0)
    # The banded matrix rows are the kernel, reflected at the borders: each row sums to 1.
    g = blur_matrices(kernels[:, 1:-1] / kernels[:, 1:-1].sum(1, keepdim=True), 16)
    torch.testing.assert_close(g.sum(dim=2), torch.ones(4, 16), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="impl"):
        augment.gaussian_blur(x, kernels, "fft")


def test_make_view_with_the_matmul_blur():
    x = noise_images(8, 1)
    cfg = off(blur_p=1.0, blur_sigma=[7.0, 14.0], crop_scale=[0.3, 1.0])
    torch.testing.assert_close(
        make_view(x, cfg, 32, gen(), blur="matmul"), make_view(x, cfg, 32, gen()), atol=1e-6, rtol=0
    )


def test_blur_smooths_a_checkerboard():
    idx = torch.arange(32)
    board = ((idx.view(-1, 1) + idx.view(1, -1)) % 2 * 255).to(torch.uint8).expand(4, 3, 32, 32)
    # sigma is given at 224 px: 7..14 there is 1..2 px at 32 px
    y = make_view(board, off(blur_p=1.0, blur_sigma=[7.0, 14.0]), 32, gen())
    assert y.var(dim=(1, 2, 3)).max() < 0.1 * (board.float() / 255).var()
    kept = make_view(board, off(blur_p=0.0, blur_sigma=[7.0, 14.0]), 32, gen())
    torch.testing.assert_close(kept, board.float() / 255, atol=1e-5, rtol=0)


def test_blur_probability_leaves_the_rest_untouched():
    x = noise_images(48, 1)
    base = make_view(x, OFF, 32, gen())
    y = make_view(x, off(blur_p=0.5, blur_sigma=[7.0, 14.0]), 32, gen())
    change = (y - base).abs().amax(dim=(1, 2, 3))
    blurred = change > 1e-3
    assert 8 < blurred.sum() < 40
    assert (change[~blurred] < 1e-6).all()


# --------------------------------------------------------------------------------------------
# Channels, pairs, determinism


def test_one_channel_ignores_colour_ops():
    x = smooth_images(8, 1)
    mono = off(jitter_p=1.0, brightness=0.4, contrast=0.4, flip_p=0.5, crop_scale=[0.3, 1.0])
    colour = dataclasses.replace(mono, saturation=0.9, hue=0.5, grayscale_p=1.0)
    y = make_view(x, colour, 32, gen(3))
    assert y.shape == (8, 1, 32, 32)
    assert torch.equal(y, make_view(x, mono, 32, gen(3)))


def test_pair_views_differ_but_follow_their_source():
    x = smooth_images(12, 3, seed=1)
    mild = off(crop_scale=[0.7, 1.0], jitter_p=0.8, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
    mild = dataclasses.replace(mild, blur_p=0.5, grayscale_p=0.1)
    v1, v2 = make_pair(x, ViewsRecipe(view1=mild, view2=mild), 32, gen())
    assert (v1 - v2).abs().mean() > 0.01
    src = to_float(x, 32).flatten(1)
    for v in (v1, v2):
        a = F.normalize(v.flatten(1) - v.flatten(1).mean(1, keepdim=True), dim=1)
        s = F.normalize(src - src.mean(1, keepdim=True), dim=1)
        corr = a @ s.T  # view i vs source j
        own = corr.diagonal()
        others = corr.masked_fill(torch.eye(12, dtype=torch.bool), -1).amax(dim=1)
        assert (own > others).float().mean() >= 0.9


def test_seeded_generator_is_deterministic():
    x = noise_images(6, 3)
    a = make_pair(x, ViewsRecipe(), 32, gen(7))
    b = make_pair(x, ViewsRecipe(), 32, gen(7))
    c = make_pair(x, ViewsRecipe(), 32, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])


# --------------------------------------------------------------------------------------------
# Helpers and errors


def test_to_float_keeps_size_and_scales():
    x = noise_images(2, 1, 32)
    assert torch.equal(to_float(x, 32), x.float() / 255)
    assert to_float(x, 16).shape == (2, 1, 16, 16)


def test_normalize_per_channel_and_broadcast():
    x = torch.rand(2, 3, 4, 4)
    y = normalize(x, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    torch.testing.assert_close(y[:, 1], (x[:, 1] - 0.2) / 0.25)
    torch.testing.assert_close(normalize(x, (0.5,), (0.5,)), x * 2 - 1)
    with pytest.raises(ValueError):
        normalize(x, (0.1, 0.2), (1.0, 1.0))


def test_bad_inputs_and_settings():
    x = noise_images(2, 3)
    with pytest.raises(ValueError):
        make_view(x.float(), OFF, 32)
    with pytest.raises(ValueError):
        make_view(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), OFF, 32)
    with pytest.raises(UserError, match="view2.crop_scale"):
        make_pair(x, ViewsRecipe(view2=off(crop_scale=[0.5, 0.2])), 32)
    with pytest.raises(UserError, match="flip_p"):
        make_view(x, off(flip_p=1.5), 32)


def test_autocast_and_empty_batch():
    x = noise_images(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = make_view(x, OFF, 32, gen())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() / 255, atol=1e-5, rtol=0)
    empty = make_pair(torch.zeros(0, 1, 32, 32, dtype=torch.uint8), ViewsRecipe(), 16, gen())
    assert empty[0].shape == (0, 1, 16, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_semantics_and_is_deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # exact comparisons below
    x = noise_images(8, 3).cuda()
    g1 = torch.Generator(device="cuda").manual_seed(0)
    g2 = torch.Generator(device="cuda").manual_seed(0)
    a = make_pair(x, ViewsRecipe(), 32, g1)
    b = make_pair(x, ViewsRecipe(), 32, g2)
    assert a[0].device == x.device and a[0].shape == (8, 3, 32, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.isfinite(a[0]).all() and a[0].min() >= 0 and a[0].max() <= 1
    torch.testing.assert_close(make_view(x, OFF, 32, g1).cpu(), x.cpu().float() / 255, atol=1e-5, rtol=0)
    y = make_view(x, off(flip_p=1.0, grayscale_p=1.0, solarize_p=1.0), 32, g1).cpu()
    ref = TF.rgb_to_grayscale(torch.flip(x.cpu().float() / 255, dims=[-1]), 3)
    torch.testing.assert_close(y, torch.where(ref >= 0.5, 1 - ref, ref), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        make_view(x, OFF, 32, torch.Generator().manual_seed(0))


def test_flip_warning_only_for_sided_classes() -> None:
    from medssl_cli.barlowtwins.views import flip_warning

    organs = ["heart", "left lung", "right lung", "liver", "left kidney", "right kidney", "left femoral head"]
    line = flip_warning(0.5, organs, "views.view1.flip_p")
    assert line is not None and "left lung, right lung, left kidney, right kidney, ..." in line
    assert "views.view1.flip_p to 0" in line and "\n" not in line
    assert flip_warning(0.0, organs, "k") is None  # no flips
    assert flip_warning(0.5, ["ADI", "BACK", "TUM", "bright"], "k") is None  # no sides named
