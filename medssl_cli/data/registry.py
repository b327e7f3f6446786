"""Where the data is and what it holds: data root, dataset names and aliases, tasks.

Discovery, ``info.yaml``, task labels and the official splits come from the real ``mimeta`` package
(imported lazily: it takes seconds). Before handing a folder to ``mimeta`` we validate it ourselves
with ``yaml.safe_load`` so a broken dataset gives one clear line instead of a KeyError deep inside.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medssl_cli.errors import UserError, did_you_mean, short
from medssl_cli.io import load_yaml, yaml_error_text

ZENODO = "https://zenodo.org/records/7884735"
ALIASES: dict[str, list[str]] = {
    "axial": ["organs_axial"],
    "coronal": ["organs_coronal"],
    "sagittal": ["organs_sagittal"],
    "organs": ["organs_axial", "organs_coronal", "organs_sagittal"],
    "crc": ["crc"],
}
SUPERVISED_TARGETS = ("MULTICLASS_CLASSIFICATION", "BINARY_CLASSIFICATION", "ORDINAL_REGRESSION")
REQUIRED_INFO = ("id", "name", "domain", "input_size", "tasks")
_RESTORE = "Restore the file from the MIMeta download."


def default_data_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "medssl" / "mimeta"


def resolve_root(data_dir: str | Path | None = None) -> Path:
    """``--data-dir``, else ``$MEDSSL_DATA``, else the default root; must hold at least one dataset."""
    root = Path(data_dir or os.environ.get("MEDSSL_DATA") or default_data_root()).expanduser()
    hint = (
        f"Download MIMeta from Zenodo ({ZENODO}) and extract it there, pass --data-dir / set MEDSSL_DATA, "
        f"or make synthetic data: `medssl data synth --out {root}`."
    )
    if not root.is_dir():
        raise UserError(f"Data root {root} does not exist.", hint)
    if not any((d / "info.yaml").is_file() for d in root.iterdir() if d.is_dir()):
        raise UserError(f"Data root {root} holds no MIMeta dataset (no */info.yaml).", hint)
    return root


def validate_info(path: Path) -> dict[str, Any]:
    """Parse and check one ``info.yaml``; every problem is a UserError naming the file."""
    try:
        info = load_yaml(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}).", _RESTORE) from None
    except yaml.YAMLError as exc:
        raise UserError(yaml_error_text(path, exc), "Restore the file from the MIMeta download.") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} must hold a mapping.", "Restore the file from the MIMeta download.")
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise UserError(
            f"{path} lacks the field(s) {', '.join(missing)}.", "Restore it from the MIMeta download."
        )
    if not isinstance(info["id"], str) or not info["id"].strip():
        raise UserError(f"{path}: id must be a non-empty string, got {short(info['id'])}.", _RESTORE)
    size = info["input_size"]
    ints = isinstance(size, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    if not (ints and len(size) == 3 and size[0] in (1, 3) and size[1] > 0 and size[2] > 0):
        raise UserError(
            f"{path}: input_size must be [C, H, W] with C = 1 or 3 and H, W > 0, got {short(size)}.", _RESTORE
        )
    counts = info.get("splits_num_samples")
    if counts is not None and not isinstance(counts, dict):
        raise UserError(f"{path}: splits_num_samples must be a mapping of split -> count.", _RESTORE)
    if not isinstance(info["tasks"], list) or not info["tasks"]:
        raise UserError(f"{path}: tasks must be a non-empty list.")
    for t in info["tasks"]:
        if not isinstance(t, dict) or not {"task_name", "task_target", "labels"} <= set(t):
            raise UserError(f"{path}: every task needs task_name, task_target and labels.")
        labels = t["labels"]
        if not isinstance(labels, dict) or not labels or not all(isinstance(k, int) for k in labels):
            raise UserError(
                f"{path}: task '{short(t['task_name'])}' labels must be a non-empty mapping of class "
                f"index -> name, got {short(labels)}.",
                _RESTORE,
            )
    return info


def dataset_folders(root: Path) -> dict[str, Path]:
    """Dataset id (``info.yaml``'s ``id``; the folder name if it has none) -> its folder, as ``mimeta``
    maps them: a folder need not be named after its id. Two folders with one id are refused."""
    out: dict[str, Path] = {}
    for d in sorted(root.iterdir()):
        if d.is_dir() and (d / "info.yaml").is_file():
            ds = str(validate_info(d / "info.yaml").get("id") or d.name)
            if ds in out:
                raise UserError(
                    f"Two folders under {root} hold dataset '{ds}': {out[ds].name} and {d.name}.",
                    "Keep one of them.",
                )
            out[ds] = d
    return out


def scan(root: Path, folders: dict[str, Path] | None = None) -> dict[str, dict[str, Any]]:
    """Validated info dicts of every dataset under ``root``, keyed by id, as ``mimeta`` discovers them
    (``folders``: ``dataset_folders(root)`` if the caller has it, which validated every info.yaml)."""
    if folders is None:
        dataset_folders(root)
    from mimeta import MIMeta

    MIMeta._infos = None  # the package caches one root per process; datasets may have been added
    ids = MIMeta.get_available_datasets(str(root))
    return {i: MIMeta.get_info_dict(str(root), i) for i in sorted(ids)}


def resolve_names(names: list[str], infos: dict[str, dict[str, Any]]) -> list[str]:
    """Expand aliases (axial, coronal, sagittal, organs, crc) and check ids; keeps order, no repeats."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name in infos:
            ids = [name]
        elif name in ALIASES:
            ids = ALIASES[name]
            missing = [i for i in ids if i not in infos]
            if missing:
                syn = [f"synthetic_{i}" for i in missing if f"synthetic_{i}" in infos]
                hint = (
                    f"Synthetic stand-ins are here: {', '.join(syn)}."
                    if syn
                    else did_you_mean(name, list(infos) + list(ALIASES))
                )
                raise UserError(f"Dataset '{name}' ({', '.join(missing)}) is not under the data root.", hint)
        else:
            raise UserError(f"Unknown dataset '{name}'.", did_you_mean(name, list(infos) + list(ALIASES)))
        out.extend(i for i in ids if i not in out)
    if not out:
        raise UserError("No dataset given.", "Pass --datasets, e.g. --datasets axial,coronal,sagittal.")
    return out


@dataclass
class TaskInfo:
    dataset_id: str
    task_name: str
    task_target: str
    class_names: list[str]
    channels: int
    synthetic: bool
    split_sizes: dict[str, int] = field(default_factory=dict)


def pick_task(dataset_id: str, info: dict[str, Any], task: str | None, supervised: bool = True) -> TaskInfo:
    """The named task, else the dataset's first multiclass task (any first task when not supervised)."""
    tasks = info["tasks"]
    if task is not None:
        chosen = next((t for t in tasks if t["task_name"] == task), None)
        if chosen is None:
            names = [t["task_name"] for t in tasks]
            raise UserError(f"Dataset {dataset_id} has no task '{task}'.", did_you_mean(task, names))
    else:
        chosen = next((t for t in tasks if t["task_target"] == "MULTICLASS_CLASSIFICATION"), None)
        if chosen is None and not supervised:
            chosen = tasks[0]
        if chosen is None:
            kinds = sorted({t["task_target"] for t in tasks})
            raise UserError(
                f"Dataset {dataset_id} has no multiclass task (only {', '.join(kinds)}).",
                "Pick a multiclass dataset, or name a binary/ordinal task with --task.",
            )
    if supervised and chosen["task_target"] not in SUPERVISED_TARGETS:
        raise UserError(
            f"Task '{chosen['task_name']}' of {dataset_id} is {chosen['task_target']}; medssl trains "
            "single-label classifiers.",
            "Pick a multiclass, binary or ordinal task with --task.",
        )
    labels = chosen["labels"]
    names = [str(labels[k]) for k in sorted(labels)]
    return TaskInfo(
        dataset_id=dataset_id,
        task_name=chosen["task_name"],
        task_target=chosen["task_target"],
        class_names=names,
        channels=int(info["input_size"][0]),
        synthetic=bool(info.get("synthetic", False)) or dataset_id.startswith("synthetic_"),
        split_sizes=dict(info.get("splits_num_samples") or {}),
    )


def dataset_domains(root: Path, names: list[str]) -> dict[str, str]:
    """Dataset id -> its ``info.yaml`` domain for ``names`` (ids or aliases), without importing mimeta."""
    folders = dataset_folders(root)
    infos = {ds: validate_info(folder / "info.yaml") for ds, folder in folders.items()}
    return {ds: str(infos[ds]["domain"]) for ds in resolve_names(names, infos)}


def data_root(data_dir: Path | str | None, recorded: str | None) -> Path:
    """--data-dir, else $MEDSSL_DATA, else the root the parent run recorded (if it exists), else default."""
    if data_dir is None and not os.environ.get("MEDSSL_DATA") and recorded and Path(recorded).is_dir():
        return resolve_root(recorded)
    return resolve_root(data_dir)
