"""Recipes: every setting of every stage, in one typed tree.

Precedence, one rule for every stage (``resolve``): built-in defaults < the sections a later stage
inherits from its parent run's recipe.yaml (finetune: data, model, views; tsne: data, model; evaluate:
all of its grid's or pretrain run's) < ``--recipe FILE`` < CLI options. A recipe file may set any
subset of sections and keys. Unknown keys and wrong value
types are ``UserError``s that name the key. The fully resolved recipe is saved as ``recipe.yaml`` in
every run directory, and its hash goes into weights metadata and reports.

The defaults are what learns on real images: the official Barlow Twins optimiser (LARS, lr 0.2 per 256
images, 0.0048 for biases/BN, weight decay 1.5e-6) on the study's organ planes
(``recipes/organs-bt.yaml`` spells them out), with the protocol fixed: official splits, train split
only for pretraining, selection on val. The study's Adam at lr 0.03 destroyed features on real images
(``recipes/organs-bt-study.yaml`` keeps it, with the measurements).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medssl_cli.errors import UserError, did_you_mean, short
from medssl_cli.io import read_yaml_mapping


@dataclass
class DataRecipe:
    datasets: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    task: str | None = None  # None: the dataset's first multiclass task
    splits: list[str] = field(default_factory=lambda: ["train"])  # pretraining splits (never test)
    image_size: int = 224
    channels: Literal["auto", "1", "3"] = "auto"  # auto: the datasets' own (must agree when pooled)
    ram_budget_gb: float = 8.0  # above this, images are memory-mapped and streamed, not loaded


@dataclass
class ModelRecipe:
    arch: Literal["resnet18"] = "resnet18"
    # 1-channel data: "replicate" copies gray to 3 channels (keeps ImageNet's conv1), "native" builds
    # a 1-channel conv1. Recorded in the weights' metadata so every later stage does the same.
    gray_mode: Literal["replicate", "native"] = "replicate"
    projector: list[int] = field(default_factory=lambda: [2048, 2048, 2048])


@dataclass
class ViewRecipe:
    """One Barlow Twins view (Zbontar et al. 2021, appendix: asymmetric blur and solarisation)."""

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    # Geometry: None = from the datasets' domain (data/domains.py: no flips where orientation carries
    # meaning, as in CT and X-ray; flips and 90-degree rotations for histopathology). Resolved values
    # are saved in the run's recipe.yaml.
    flip_p: float | None = None  # left-right
    vflip_p: float | None = None  # top-bottom
    rot90_p: float | None = None  # one 90-degree rotation (with both flips: all 8 symmetries)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2  # ignored for 1-channel data
    hue: float = 0.1  # ignored for 1-channel data
    grayscale_p: float = 0.2  # ignored for 1-channel data
    blur_p: float = 1.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # in pixels at 224 px, scaled
    solarize_p: float = 0.0


@dataclass
class ViewsRecipe:
    # auto: each dataset's MIMeta domain decides the flips and rotations (data/domains.py); or one of
    # none / hflip / dihedral for all datasets. Explicit flip_p/vflip_p/rot90_p in a view win.
    geometry: Literal["auto", "none", "hflip", "dihedral"] = "auto"
    view1: ViewRecipe = field(default_factory=lambda: ViewRecipe(blur_p=1.0, solarize_p=0.0))
    view2: ViewRecipe = field(default_factory=lambda: ViewRecipe(blur_p=0.1, solarize_p=0.2))


@dataclass
class PretrainRecipe:
    epochs: int = 1000
    batch_size: int = 256
    # LARS with the official settings: on real images (digits, 32 px, 50 epochs) it beat a random
    # backbone by ~9 points at 5 labels/class, where Adam 1e-3 ended 16 points below random and the
    # study's Adam 0.03 destroyed the features within a few steps (bench/results/, issue 20).
    optimizer: Literal["adam", "lars"] = "lars"
    lr: float = 0.2  # LARS: per 256 images, scaled by batch/256 (weights). Adam: as given
    lr_biases: float = 0.0048  # LARS only: biases and BN, per 256 images
    weight_decay: float = 1.5e-6  # official Barlow Twins (never on biases/BN)
    lars_eta: float = 0.001  # LARS trust coefficient (official Barlow Twins; solo-learn's CIFAR recipe: 0.02)
    warmup_epochs: float = 10.0  # linear warmup, capped at a tenth of the run
    # Objective: barlow_twins (Zbontar et al. 2021), vicreg (Bardes et al. 2022), simclr (Chen et al.
    # 2020); medssl_cli/methods. Picking vicreg/simclr also applies METHOD_DEFAULTS below (recipe
    # file and CLI options still win).
    method: Literal["barlow_twins", "vicreg", "simclr"] = "barlow_twins"
    lambd: float = 0.0051  # Barlow Twins: weight of the off-diagonal term
    vicreg_sim: float = 25.0  # VICReg: invariance weight (lambda in the paper)
    vicreg_std: float = 25.0  # VICReg: variance weight (mu)
    vicreg_cov: float = 1.0  # VICReg: covariance weight (nu)
    simclr_temperature: float = 0.2  # SimCLR: NT-Xent temperature (paper: 0.1-0.5 by batch size)
    checkpoint_every: int = 10  # epochs
    knn_every: int = 0  # epochs; 0 = off. kNN accuracy on val (monitor only)
    # Label-free collapse monitor (rankme.py): RankMe and feature std of the backbone on a fixed sample
    # of pretraining images, every rankme_every epochs (0 = off); a one-line warning when it collapses.
    rankme_every: int = 1
    rankme_samples: int = 1024
    # Where per-epoch scalars go besides history.jsonl: tensorboard = <run>/tensorboard/ event files
    # (needs the tensorboard extra: pip install -e ".[tensorboard]")
    log: Literal["jsonl", "tensorboard"] = "jsonl"
    chunk_size: int = 0  # >0: backbone passes in chunks, one full-batch loss (see chunked.py)


@dataclass
class FinetuneRecipe:
    inits: list[Literal["ssl", "imagenet", "random"]] = field(default_factory=lambda: ["ssl"])
    # linear: frozen backbone + linear head; full: end to end; knn: weighted kNN on frozen features
    modes: list[Literal["linear", "full", "knn"]] = field(default_factory=lambda: ["linear"])
    fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    head: Literal["lbfgs", "sgd"] = "lbfgs"  # linear mode: L-BFGS logistic regression or trained head
    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0])
    epochs: int = 100  # full mode and sgd head
    batch_size: int = 64
    lr_head: float = 0.01
    lr_backbone: float = 0.001
    weight_decay: float = 1e-4
    patience: int = 10  # early stopping on val, epochs
    # Val images a cell may use to choose C / stop early: "matched" = as many as its labelled train
    # images (stratified, >= 1 per class, nested, per seed); "full" = the whole val split (optimistic:
    # a low-label user has no such val set); or a number. With fewer than 2 per class, C is chosen by
    # stratified k-fold cross-validation on the labelled images themselves (k <= 5), or fixed at 1 when
    # a class has a single labelled image; full fine-tuning then stops early on what val there is.
    val_budget: int | Literal["matched", "full"] = "matched"


@dataclass
class EvaluateRecipe:
    split: Literal["test", "val"] = "test"
    knn_k: int = 20
    allow_leakage: bool = False  # evaluate on images the backbone saw in pretraining (recorded)
    ci: Literal["wilson", "bootstrap"] = "wilson"


@dataclass
class TsneRecipe:
    split: Literal["test", "val", "train"] = "test"
    max_samples: int = 2000
    perplexity: float = 30.0
    seed: int = 0


@dataclass
class ComputeRecipe:
    seed: int = 0
    device: str = "auto"  # auto: CUDA if present, else CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where supported
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False  # torch.compile the training step's network (pretrain)
    overlap_views: bool = True  # CUDA: make the next step's views on a side stream during this step
    threads: int = 0  # 0: torch's default
    device_budget_gb: float = 4.0  # keep uint8 training images on the device below this


@dataclass
class Recipe:
    data: DataRecipe = field(default_factory=DataRecipe)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    views: ViewsRecipe = field(default_factory=ViewsRecipe)
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    evaluate: EvaluateRecipe = field(default_factory=EvaluateRecipe)
    tsne: TsneRecipe = field(default_factory=TsneRecipe)
    compute: ComputeRecipe = field(default_factory=ComputeRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short content hash of the resolved recipe (stable across key order)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Merging and validation


# Resource keys that no stage check covers: finite and at least this (NaN compares false everywhere).
MINIMUM: dict[str, float] = {
    "data.ram_budget_gb": 0.0,
    "compute.device_budget_gb": 0.0,
    "compute.threads": 0,
}


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Coerce ``value`` to annotation ``tp`` or raise a UserError naming ``key``."""
    out = _coerce(key, tp, value)
    if key in MINIMUM and isinstance(out, (int, float)) and not (math.isfinite(out) and out >= MINIMUM[key]):
        raise UserError(
            f"Recipe key '{key}' must be a finite number >= {MINIMUM[key]:g}, got {short(value)}."
        )
    return out


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, arg, value)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        allowed = list(args)
        if value in allowed:
            return value
        if str(value) in [str(a) for a in allowed]:
            return next(a for a in allowed if str(a) == str(value))
        raise UserError(f"Recipe key '{key}' must be one of {allowed}, got {short(value)}.")
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise UserError(f"Recipe key '{key}' must be a list, got {type(value).__name__} {short(value)}.")
        (inner,) = args
        return [_check_value(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"Recipe key '{key}' must be true or false, got {short(value)}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"Recipe key '{key}' must be an integer, got {short(value)}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"Recipe key '{key}' must be a number, got {short(value)}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"Recipe key '{key}' must be a string, got {short(value)}.")
    if dataclasses.is_dataclass(tp):
        return _merge(tp(), value, key)
    raise TypeError(f"unsupported recipe type {tp} at {key}")


def _merge(obj: Any, updates: Any, prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``updates`` (a nested mapping) applied and checked."""
    if isinstance(updates, dict) is False:
        raise UserError(f"Recipe section '{prefix or 'top level'}' must be a mapping, got {short(updates)}.")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in updates.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"Unknown recipe key '{full}'.", did_you_mean(str(key), names))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, full)
        else:
            changes[key] = _check_value(full, hints[key], value)
    return dataclasses.replace(obj, **changes)


def merge(recipe: Recipe, updates: dict[str, Any], prefix: str = "") -> Recipe:
    """Apply a nested mapping of updates (e.g. a recipe file's contents) to ``recipe``."""
    return _merge(recipe, updates or {}, prefix)


def override(recipe: Recipe, dotted: dict[str, Any]) -> Recipe:
    """Apply CLI options given as ``{"pretrain.epochs": 5}``; ``None`` values mean 'not given'."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return merge(recipe, nested)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(
            f"Recipe file {p} is a directory.", "Pass a YAML file, e.g. --recipe recipes/demo.yaml."
        )
    if not p.is_file():
        raise UserError(f"Recipe file not found: {p}.", "Pass a YAML file, e.g. --recipe recipes/demo.yaml.")
    return read_yaml_mapping(p, "Recipe file", "Fix the file (a YAML mapping of recipe sections) and retry.")


def load_recipe(path: str | Path | None = None, base: Recipe | None = None) -> Recipe:
    """Defaults (or ``base``) updated by the recipe file at ``path``, validated."""
    recipe = base if base is not None else Recipe()
    if path is not None:
        recipe = merge(recipe, read_recipe_file(path))
    return recipe


def from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a saved (resolved) recipe, e.g. a parent run's ``recipe.yaml``."""
    return merge(Recipe(), data)


def diff(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes (sorted): the one recipe comparison, used
    for --run-dir / --resume (same settings?) and for a shared --grid-dir."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))

METHOD_NAMES = {"barlow_twins": "Barlow Twins", "vicreg": "VICReg", "simclr": "SimCLR"}

# What picking a method changes (dotted keys), from the papers, scaled for the default ResNet-18
# (512-d features; the papers used ResNet-50 with 2048-d) and a batch of 256, as solo-learn's
# ResNet-18 recipes do. Barlow Twins: the built-in defaults (official main.py with a 2048-wide
# projector instead of 8192).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # VICReg: 3-layer expander (paper: 8192-wide for ResNet-50; 2048 here), LARS, lr 0.3 per 256 and
    # weight decay 1e-4 (solo-learn, ResNet-18), lambda = mu = 25, nu = 1 (paper).
    "vicreg": {"model.projector": [2048, 2048, 2048], "pretrain.lr": 0.3, "pretrain.weight_decay": 1e-4},
    # SimCLR: 2-layer projector (paper: 2048 hidden, 128 out), LARS, lr 0.4 per 256 and weight decay
    # 1e-5 (solo-learn, ResNet-18), temperature 0.2 (paper: 0.1-0.5 depending on batch size).
    "simclr": {"model.projector": [2048, 128], "pretrain.lr": 0.4, "pretrain.weight_decay": 1e-5},
}  # every section of a recipe


def resolve(
    recipe_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    parent: Recipe | None = None,
    inherit: tuple[str, ...] = (),
) -> Recipe:
    """The recipe a stage runs: defaults < the chosen method's defaults (``METHOD_DEFAULTS``) <
    ``inherit`` sections of ``parent`` < ``recipe_file`` < CLI ``overrides`` (dotted keys; None = not
    given). The one precedence rule (module docstring)."""
    file = read_recipe_file(recipe_file) if recipe_file is not None else {}

    def build(method_defaults: dict[str, Any]) -> Recipe:
        recipe = override(Recipe(), method_defaults)
        if parent is not None and inherit:
            recipe = merge(recipe, {key: dataclasses.asdict(getattr(parent, key)) for key in inherit})
        return override(merge(recipe, file), overrides or {})

    recipe = build({})
    # a method's own defaults sit just above the built-ins (the file and CLI options still win)
    chosen = METHOD_DEFAULTS.get(recipe.pretrain.method)
    return build(chosen) if chosen and "pretrain" not in inherit else recipe
