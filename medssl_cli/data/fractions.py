"""Label fractions: stratified, at least one image per class, nested, deterministic.

For a seed, every class's members are put in one fixed random order; a fraction f takes the first
``max(1, round(f * n_c))`` of each class c. Larger fractions therefore contain smaller ones (nested),
and the same seed always gives the same images. The per-class floor of one image matters at small
fractions (0.5% of the 871 organ training images is 4 images, fewer than the 11 classes): it is
reported, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medssl_cli.errors import UserError


@dataclass
class Subset:
    indices: np.ndarray  # positions into the labels array, sorted
    per_class: dict[int, int]
    requested: int  # round(f * N): what the fraction alone asks for
    floor_raised: bool  # True when the per-class floor added images


def parse_fraction(text: str | float) -> float:
    """'0.005', '0.5%', 1 -> a fraction in (0, 1]; anything else is a UserError."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UserError(f"Fraction '{text}' is not a number.", "Use e.g. 0.005 or 0.5%.") from None
    if not 0.0 < value <= 1.0 or value != value:
        raise UserError(f"Fraction {text} is outside (0, 1].", "Use a value like 0.005 (0.5%) up to 1.")
    return value


def stratified_subset(labels: np.ndarray, fraction: float, seed: int, num_classes: int) -> Subset:
    labels = np.asarray(labels)
    present = set(np.unique(labels).tolist())
    missing = [c for c in range(num_classes) if c not in present]
    if missing:
        raise UserError(
            f"Class(es) {missing} have no training image, so no subset can hold one image per class.",
            "Check the dataset's train split.",
        )
    chosen, per_class = [], {}
    for c in range(num_classes):
        members = np.nonzero(labels == c)[0]
        order = np.random.default_rng([seed, c]).permutation(len(members))
        k = max(1, int(np.floor(fraction * len(members) + 0.5)))
        per_class[c] = k
        chosen.append(members[order[:k]])
    indices = np.sort(np.concatenate(chosen))
    requested = int(np.floor(fraction * len(labels) + 0.5))
    floor_raised = any(int(np.floor(fraction * (labels == c).sum() + 0.5)) == 0 for c in range(num_classes))
    return Subset(indices=indices, per_class=per_class, requested=requested, floor_raised=floor_raised)


# --------------------------------------------------------------------------------------------
# Validation budget: how many val images a cell may use to choose C or stop early

MIN_VAL_PER_CLASS = 2  # below this a val set cannot rank settings: cross-validate on the labels instead


def val_order(labels: np.ndarray, seed: int, num_classes: int) -> np.ndarray:
    """A fixed, seeded order of the val images for drawing budgets: one image of every class first (in
    class order), then the classes interleaved in proportion to their sizes (the j-th image of class c
    is placed at (j + 0.5) / n_c). Every prefix is stratified, and a smaller budget is a prefix of a
    larger one (nested across fractions, like the train subsets)."""
    labels = np.asarray(labels)
    keys, members_all = [], []
    for c in range(num_classes):
        members = np.nonzero(labels == c)[0]
        if not len(members):
            continue
        order = np.random.default_rng([seed, 7919, c]).permutation(len(members))  # not the train stream
        j = np.arange(len(members), dtype=np.float64)
        key = np.where(j == 0, -1.0, (j + 0.5) / len(members))
        keys.append(np.stack([key, np.full(len(members), c, dtype=np.float64)], 1))
        members_all.append(members[order])
    if not keys:
        return np.zeros(0, dtype=np.int64)
    k = np.concatenate(keys)
    m = np.concatenate(members_all)
    return m[np.lexsort((k[:, 1], k[:, 0]))]


@dataclass
class ValBudget:
    indices: np.ndarray | None  # positions into the val split, sorted; None: the whole split
    budget: str  # "matched", "full" or the number asked for
    n: int  # val images used
    per_class: dict[int, int]
    optimistic: bool  # True for "full": more val labels than a low-label user has
    enough: bool  # at least MIN_VAL_PER_CLASS per class: usable to choose C / stop early


def parse_val_budget(value: str | int) -> str | int:
    """``matched``, ``full`` or a positive number of val images (UserError otherwise)."""
    raw = str(value).strip().lower()
    if raw in ("matched", "full"):
        return raw
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1 or isinstance(value, bool):
        raise UserError(
            f"Validation budget {value!r} is not 'matched', 'full' or a number of images >= 1.",
            "Use --val-budget matched (default: as many val images as labelled train images), full "
            "(optimistic), or e.g. 200.",
        )
    return n


def val_budget(
    val_labels: np.ndarray, budget: str | int, n_labelled: int, seed: int, num_classes: int
) -> ValBudget:
    """The val images a cell may use: ``matched`` = as many as the labelled train subset (drawn per
    seed, stratified, at least one per class), ``full`` = all of them, or a number of images."""
    budget = parse_val_budget(budget)
    labels = np.asarray(val_labels)
    total = len(labels)
    if budget == "full":
        counts = np.bincount(labels, minlength=num_classes)
        per_class = {c: int(counts[c]) for c in range(num_classes)}
        enough = min(per_class.values(), default=0) >= MIN_VAL_PER_CLASS
        return ValBudget(None, "full", total, per_class, True, enough)
    present = len(np.unique(labels))
    want = n_labelled if budget == "matched" else int(budget)
    if want < present:
        raise UserError(
            f"A validation budget of {want} images cannot hold one image of each of the {present} classes.",
            f"Use --val-budget {present} or more, or matched.",
        )
    idx = np.sort(val_order(labels, seed, num_classes)[: min(want, total)])
    counts = np.bincount(labels[idx], minlength=num_classes)
    per_class = {c: int(counts[c]) for c in range(num_classes)}
    enough = min(per_class.values(), default=0) >= MIN_VAL_PER_CLASS
    return ValBudget(idx, str(budget), len(idx), per_class, False, enough)
