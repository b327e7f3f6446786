"""Which geometric view transforms a dataset allows: the one source of truth, keyed on MIMeta's domain.

Every MIMeta ``info.yaml`` records the dataset's imaging ``domain``. Whether a mirror image or a
rotated image is still the same kind of image depends on it:

- ``none`` (no flips, no rotations): orientation carries meaning. Abdominal CT, chest X-ray,
  mammography, breast ultrasound, OCT and retinal fundus show left and right organs, lungs, breasts and
  eyes, or a fixed up/down (OCT's retinal layers, ultrasound's probe at the top); a flipped left kidney
  looks like a right kidney, a different class.
- ``hflip`` (left-right flips only): clinical photographs of skin have an up but no side.
- ``dihedral`` (horizontal and vertical flips and 90-degree rotations: all 8 symmetries of the square):
  histopathology, microscopy and dermatoscopy images have no orientation at all.

An unknown domain gets ``none`` (a needless flip can cost accuracy, as it did on digits: 0.775 vs 0.878
at 5 labels/class) and one log line saying so. ``DATASET_GEOMETRY`` overrides the domain for a dataset
id; the recipe's ``views.geometry`` overrides both, and explicit ``flip_p``/``vflip_p``/``rot90_p``
values in a view override the geometry. Pooled datasets get the most restrictive of their policies.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from medssl_cli.recipe import Recipe, ViewRecipe, ViewsRecipe

Geometry = Literal["none", "hflip", "dihedral"]
ORDER: tuple[Geometry, ...] = ("none", "hflip", "dihedral")  # most restrictive first

DOMAIN_GEOMETRY: dict[str, Geometry] = {
    "abdominal ct": "none",
    "chest x-ray": "none",
    "mammography": "none",
    "breast ultrasound": "none",
    "oct": "none",
    "retinal fundus": "none",
    "clinical skin photography": "hflip",
    "histopathology": "dihedral",
    "microscopy": "dihedral",
    "dermatoscopy": "dihedral",
}
# Per-dataset overrides of the domain's policy (dataset id -> geometry); the organ planes are listed so
# a renamed domain can never turn their flips on.
DATASET_GEOMETRY: dict[str, Geometry] = {
    "organs_axial": "none",
    "organs_coronal": "none",
    "organs_sagittal": "none",
}
# (flip_p, vflip_p, rot90_p) of each geometry: with p = 0.5 each, hflip x vflip x rot90 draws each of
# the square's 8 symmetries with probability 1/8.
PROBABILITIES: dict[Geometry, tuple[float, float, float]] = {
    "none": (0.0, 0.0, 0.0),
    "hflip": (0.5, 0.0, 0.0),
    "dihedral": (0.5, 0.5, 0.5),
}


def dataset_geometry(dataset_id: str, domain: str) -> tuple[Geometry, str]:
    """(geometry, why) for one dataset: the registry's override, else its domain's, else ``none``."""
    bare = dataset_id.removeprefix("synthetic_")
    if bare in DATASET_GEOMETRY:
        return DATASET_GEOMETRY[bare], f"{dataset_id}: registry"
    key = str(domain).strip().lower().removeprefix("synthetic ")
    if key in DOMAIN_GEOMETRY:
        return DOMAIN_GEOMETRY[key], f"{dataset_id}: domain {domain}"
    return "none", f"{dataset_id}: unknown domain '{domain}', so no flips or rotations"


def pooled_geometry(domains: dict[str, str]) -> tuple[Geometry, list[str]]:
    """The most restrictive geometry of the pooled datasets (id -> domain), with one reason each."""
    chosen = [dataset_geometry(ds, dom) for ds, dom in domains.items()]
    geometry = min((g for g, _ in chosen), key=ORDER.index, default="none")
    return geometry, [why for _, why in chosen]


def _fill(view: ViewRecipe, geometry: Geometry) -> ViewRecipe:
    flip, vflip, rot = PROBABILITIES[geometry]
    return dataclasses.replace(
        view,
        flip_p=flip if view.flip_p is None else view.flip_p,
        vflip_p=vflip if view.vflip_p is None else view.vflip_p,
        rot90_p=rot if view.rot90_p is None else view.rot90_p,
    )


def resolve_views(views: ViewsRecipe, domains: dict[str, str]) -> tuple[ViewsRecipe, str]:
    """Views with every geometric probability set, and one line saying what was chosen and why.

    ``views.geometry`` ``auto`` takes the pooled datasets' policy; a named geometry is used as given.
    Values a view sets explicitly are kept either way.
    """
    if views.geometry == "auto":
        geometry, reasons = pooled_geometry(domains)
        why = "; ".join(reasons)
    else:
        geometry, why = views.geometry, "views.geometry in the recipe"
    out = dataclasses.replace(views, view1=_fill(views.view1, geometry), view2=_fill(views.view2, geometry))
    return out, f"View geometry '{geometry}' ({why}): {describe(out)}"


def describe(views: ViewsRecipe) -> str:
    """The resolved views in one line (printed at the start of pretraining)."""

    def one(v: ViewRecipe) -> str:
        return (
            f"crop {v.crop_scale[0]:g}-{v.crop_scale[1]:g}, flip {v.flip_p or 0:g}, "
            f"vflip {v.vflip_p or 0:g}, rot90 {v.rot90_p or 0:g}, jitter {v.jitter_p:g}, blur {v.blur_p:g}, "
            f"solarize {v.solarize_p:g}"
        )

    return f"view1 [{one(views.view1)}], view2 [{one(views.view2)}]"


def resolve_recipe_views(recipe: Recipe, data_dir: Path | str | None) -> tuple[Recipe, str | None]:
    """``recipe`` with its views resolved for its datasets under ``data_dir`` (and the line saying how);
    unchanged (and no line) when nothing is left to resolve."""
    v = recipe.views
    keys = ("flip_p", "vflip_p", "rot90_p")
    if all(getattr(view, k) is not None for view in (v.view1, v.view2) for k in keys):
        return recipe, None
    from medssl_cli.data.registry import dataset_domains, resolve_root

    domains = dataset_domains(resolve_root(data_dir), recipe.data.datasets)
    views, line = resolve_views(v, domains)
    return dataclasses.replace(recipe, views=views), line
