"""Leakage guard: never report metrics on images (or subjects) that the backbone saw in pretraining.

Input: the pretrain run's ``data_seen.json`` ({dataset id: {split: rows}}) and the evaluated images
({dataset id: {split: rows}}). Evaluating split S of dataset D leaks when pretraining used

- any of the evaluated images themselves: the same dataset and image row, whatever split the
  pretraining listed it under (hand-edited or overlapping split files put a test image in train), or
- any image of split S of D or of a dataset whose subjects overlap D's: the ids named in D's
  ``info.yaml`` ``subject_overlaps`` (either direction), and the three organ planes of one source
  (``organs_*``, ``synthetic_organs_*``), which show the same (patient, organ) items. Official splits are
  drawn by subject, so the same split of an overlapping dataset holds the same subjects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medssl_cli.errors import UserError
from medssl_cli.io import read_json
from medssl_cli.runs import Run

PLANE_GROUPS = ("synthetic_organs_", "organs_")  # longest prefix first


def _group(ds: str) -> str | None:
    return next((p for p in PLANE_GROUPS if ds.startswith(p)), None)


def item_id(ds: str, row: int) -> str:
    """The subject-level item an image shows, where the dataset has one: the three organ planes hold
    the same (CT volume, organ) items in the same rows, so row r of every plane is item
    ``organs_/r``; "" for other datasets (MIMeta records no subject ids)."""
    group = _group(ds)
    return f"{group}/{row}" if group else ""


def _declared_overlaps(root: Path, ds: str) -> list[str]:
    try:
        info = yaml.safe_load((Path(root) / ds / "info.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    value = info.get("subject_overlaps") or []
    return [str(v) for v in value] if isinstance(value, list) else []


def related(root: Path, ds: str, candidates: list[str]) -> list[str]:
    """Datasets among ``candidates`` whose subjects overlap ``ds`` (``ds`` itself included)."""
    mine = set(_declared_overlaps(root, ds))
    out = []
    for other in candidates:
        if other == ds or other in mine or ds in _declared_overlaps(root, other):
            out.append(other)
        elif _group(ds) is not None and _group(ds) == _group(other):
            out.append(other)
    return out


def find_leakage(
    seen: dict[str, dict[str, list[int]]], evaluated: dict[str, dict[str, list[int]]], root: Path
) -> list[dict[str, Any]]:
    """One record per (evaluated dataset/split, pretraining dataset/split) that overlaps."""
    found = []
    for ds, splits in evaluated.items():
        for split, rows in splits.items():
            mine = set(rows)
            for other in related(root, ds, list(seen)):
                seen_rows = seen.get(other, {}).get(split) or []
                if other == ds:  # the images themselves, under any split name
                    for seen_split, srows in sorted(seen.get(ds, {}).items()):
                        same = len(mine & set(srows))
                        if seen_split != split and same:
                            found.append(_record(ds, split, rows, f"{ds}/{seen_split}", srows, same))
                    same = len(mine & set(seen_rows))
                else:
                    same = 0
                if seen_rows:
                    found.append(_record(ds, split, rows, f"{other}/{split}", seen_rows, same))
    return found


def _record(ds: str, split: str, rows: list[int], on: str, seen_rows: list[int], same: int) -> dict[str, Any]:
    return {
        "evaluated": f"{ds}/{split}",
        "evaluated_images": len(rows),
        "pretrained_on": on,
        "pretrained_images": len(seen_rows),
        "same_images": same,
    }


def check(
    pretrain: Run | None, evaluated: dict[str, dict[str, list[int]]], root: Path, allow: bool, what: str
) -> dict[str, Any]:
    """Raise a UserError on leakage unless ``allow``; returns the record for metrics.json."""
    if pretrain is None:
        return {"checked": False, "reason": "no pretrain run (ImageNet or random init)", "overlaps": []}
    path = pretrain.file("data_seen.json")
    try:
        seen = read_json(path)
    except (FileNotFoundError, ValueError):
        if allow:
            return {
                "checked": False,
                "reason": f"{path} missing or unreadable",
                "overlaps": [],
                "override": True,
            }
        raise UserError(
            f"Cannot check for leakage: {path} is missing or unreadable.",
            "Use a pretrain run made by medssl, or pass --allow-leakage (recorded in metrics.json).",
        ) from None
    overlaps = find_leakage(seen, evaluated, root)
    if overlaps and not allow:
        parts = ", ".join(
            f"{o['pretrained_on']} ({o['pretrained_images']} images"
            + (f", {o['same_images']} of them evaluated here" if o["same_images"] else "")
            + ")"
            for o in overlaps
        )
        raise UserError(
            f"Refusing to evaluate {what}: pretrain run {pretrain.path.name} saw the same images or subjects "
            f"in pretraining: {parts}.",
            "Pretrain on the train split only, evaluate another split, or pass --allow-leakage "
            "(recorded in metrics.json and the report).",
        )
    return {
        "checked": True,
        "pretrain_run": str(pretrain.path),
        "overlaps": overlaps,
        "override": bool(overlaps),
    }
