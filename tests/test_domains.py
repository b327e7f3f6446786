"""Defaults that learn: LARS by default, views set by each dataset's domain, the headline command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from medssl_cli.barlowtwins.views import make_view
from medssl_cli.data.domains import (
    DOMAIN_GEOMETRY,
    dataset_geometry,
    pooled_geometry,
    resolve_recipe_views,
    resolve_views,
)
from medssl_cli.models import build_backbone
from medssl_cli.recipe import Recipe, ViewRecipe, ViewsRecipe, load_recipe, override
from medssl_cli.stages.pretrain import optimizer_warning

REPO = Path(__file__).resolve().parents[1]
OFF = ViewRecipe(
    crop_scale=[1.0, 1.0],
    crop_ratio=[1.0, 1.0],
    flip_p=0.0,
    vflip_p=0.0,
    rot90_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)


def test_built_in_pretraining_defaults_are_the_official_lars() -> None:
    p = Recipe().pretrain
    assert (p.optimizer, p.lr, p.lr_biases, p.weight_decay) == ("lars", 0.2, 0.0048, 1.5e-6)
    assert optimizer_warning(Recipe()) is None


def test_adam_with_a_large_lr_warns_in_one_line() -> None:
    study = load_recipe(REPO / "recipes" / "organs-bt-study.yaml")
    line = optimizer_warning(study)
    assert line is not None and "\n" not in line and "0.03" in line and "lars" in line
    assert optimizer_warning(override(study, {"pretrain.lr": 1e-3})) is None
    assert optimizer_warning(override(Recipe(), {"pretrain.lr": 0.5})) is None  # LARS: per 256 images


def test_every_shipped_recipe_but_the_study_one_uses_lars() -> None:
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        if path.name == "organs-bt-study.yaml":
            assert (r.pretrain.optimizer, r.pretrain.lr) == ("adam", 0.03)
            assert "does not learn" in path.read_text().splitlines()[0]
        else:
            assert r.pretrain.optimizer == "lars" and optimizer_warning(r) is None, path.name


def test_random_backbone_keeps_torchvision_default_init() -> None:
    # zero-init residuals would make a random backbone near-useless as a baseline (0.18 at 5/class)
    net = build_backbone(1)
    assert all(torch.all(b.bn2.weight == 1) for layer in (net.layer1, net.layer4) for b in layer)


@pytest.mark.parametrize(
    ("domain", "geometry"),
    [
        ("Abdominal CT", "none"),
        ("Chest X-ray", "none"),
        ("Mammography", "none"),
        ("OCT", "none"),
        ("Breast ultrasound", "none"),
        ("Retinal fundus", "none"),
        ("Histopathology", "dihedral"),
        ("Microscopy", "dihedral"),
        ("Dermatoscopy", "dihedral"),
        ("Clinical skin photography", "hflip"),
        ("Synthetic histopathology", "dihedral"),
    ],
)
def test_domain_geometry(domain: str, geometry: str) -> None:
    assert dataset_geometry("some_id", domain)[0] == geometry


def test_unknown_domain_gets_no_flips_and_says_so() -> None:
    geometry, why = dataset_geometry("real_digits", "real images shipped by a Python package")
    assert geometry == "none" and "unknown domain" in why
    # the registry overrides a domain (the organ planes never flip, whatever their info.yaml says)
    assert dataset_geometry("organs_axial", "Histopathology")[0] == "none"


def test_pooled_datasets_get_the_most_restrictive_geometry() -> None:
    g, reasons = pooled_geometry({"crc": "Histopathology", "derm": "Dermatoscopy"})
    assert g == "dihedral" and len(reasons) == 2
    assert pooled_geometry({"crc": "Histopathology", "x": "Chest X-ray"})[0] == "none"
    assert pooled_geometry({"crc": "Histopathology", "p": "Clinical skin photography"})[0] == "hflip"


def test_explicit_view_values_and_named_geometry_win() -> None:
    views, line = resolve_views(ViewsRecipe(), {"crc": "Histopathology"})
    assert (views.view1.flip_p, views.view1.vflip_p, views.view1.rot90_p) == (0.5, 0.5, 0.5)
    assert "dihedral" in line and "crc: domain Histopathology" in line
    mine = override(Recipe(), {"views.view2.rot90_p": 0.0, "views.geometry": "hflip"}).views
    views, _ = resolve_views(mine, {"crc": "Histopathology"})
    assert (views.view1.flip_p, views.view1.vflip_p, views.view2.rot90_p) == (0.5, 0.0, 0.0)
    assert set(DOMAIN_GEOMETRY.values()) == {"none", "hflip", "dihedral"}


def test_headline_organ_command_runs_the_organ_recipe(real_ids_root: Path) -> None:
    """`medssl pretrain --datasets axial,coronal,sagittal --epochs 1000` == recipes/organs-bt.yaml."""
    from medssl_cli.commands.common import build_recipe

    cli = build_recipe(None, {"data.datasets": ["axial", "coronal", "sagittal"], "pretrain.epochs": 1000})
    shipped = load_recipe(REPO / "recipes" / "organs-bt.yaml")
    a, line = resolve_recipe_views(cli, real_ids_root)
    b, _ = resolve_recipe_views(shipped, real_ids_root)
    assert a.to_dict() == b.to_dict() and a.hash() == b.hash()
    assert a.views.view1.flip_p == 0.0 and a.views.view2.rot90_p == 0.0 and "'none'" in (line or "")
    crc, _ = resolve_recipe_views(override(Recipe(), {"data.datasets": ["crc"]}), real_ids_root)
    assert crc.views.view1.vflip_p == 0.5  # histopathology: orientation-free


def test_vflip_and_rot90_are_exact_symmetries() -> None:
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    base = make_view(x, OFF, 12, torch.Generator().manual_seed(0))
    v = make_view(x, dataclasses.replace(OFF, vflip_p=1.0), 12, torch.Generator().manual_seed(0))
    r = make_view(x, dataclasses.replace(OFF, rot90_p=1.0), 12, torch.Generator().manual_seed(0))
    assert torch.equal(v, base.flip(-2))
    assert torch.equal(r, torch.rot90(base, 1, dims=(-2, -1)))


def test_dihedral_views_draw_all_eight_symmetries_evenly() -> None:
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(4000, 1, 1, 1) * 10
    cfg = dataclasses.replace(OFF, flip_p=0.5, vflip_p=0.5, rot90_p=0.5)
    y = make_view(x, cfg, 4, torch.Generator().manual_seed(1))
    base = x[:1].float() / 255
    group = [torch.rot90(f, k, dims=(-2, -1)) for f in (base, base.flip(-1)) for k in range(4)]
    counts = [int(sum(torch.allclose(yi, g[0], atol=1e-6) for yi in y)) for g in group]
    assert sum(counts) == len(y)  # every view is one of the 8
    assert min(counts) > 0.1 * len(y) and max(counts) < 0.15 * len(y)  # 1/8 = 0.125 each


def test_unresolved_views_never_flip() -> None:
    x = torch.randint(0, 256, (8, 1, 10, 10), dtype=torch.uint8)
    unresolved = dataclasses.replace(OFF, flip_p=None, vflip_p=None, rot90_p=None)
    a = make_view(x, unresolved, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, make_view(x, OFF, 10, torch.Generator().manual_seed(3)))


def test_pretrain_logs_the_resolved_views(synth_root: Path, tmp_path: Path) -> None:
    from medssl_cli.stages.pretrain import pretrain

    r = override(
        Recipe(),
        {
            "data.datasets": ["synthetic_crc"],
            "data.image_size": 16,
            "pretrain.epochs": 1,
            "pretrain.batch_size": 32,
            "model.projector": [32, 32],
            "compute.precision": "fp32",
        },
    )
    run = pretrain(r, data_dir=synth_root, runs_root=tmp_path)
    log = run.file("log.txt").read_text()
    assert "View geometry 'dihedral'" in log and "vflip 0.5" in log
    assert run.recipe().views.view1.rot90_p == 0.5
