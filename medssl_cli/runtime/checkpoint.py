"""Resumable training state: tensors in safetensors, scalars and RNG state in JSON.

A checkpoint is two files in ``<run>/checkpoint/``: ``step-<N>.safetensors`` (model parameters and
buffers, optimizer tensors) and ``step-<N>.json`` (position, counters, optimizer hyper-parameters,
RNG state, and the SHA-256 of the tensor file). Both are written atomically, the JSON last: it is the
commit marker, so a checkpoint whose JSON exists and whose hash matches is complete. Older
checkpoints are removed only after a newer one is committed, so a crash at any instant leaves at
least one readable checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medssl_cli.errors import UserError, short
from medssl_cli.io import read_json, write_json, write_safetensors
from medssl_cli.models import state_problems


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            name = f"optim/{pid}/{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _match_param_layout(opt: torch.optim.Optimizer) -> None:
    """Give each parameter-shaped state tensor its parameter's strides (channels_last convs).

    Checkpoints hold contiguous tensors and ``load_state_dict`` moves them to the parameter's device and
    dtype but not its memory format; fused CUDA Adam refuses state whose layout differs from the
    parameter's ("must have same dtype, device, and layout").
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                same_shape = isinstance(value, torch.Tensor) and value.shape == p.shape
                if same_shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def save(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Commit a checkpoint at ``step`` and drop older ones. Returns the JSON path."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra/{k}"] = v.detach().cpu().contiguous()
    stem = ckpt_dir / f"step-{step:09d}"
    tensor_path = stem.with_suffix(".safetensors")
    write_safetensors(tensor_path, tensors)
    meta = {"step": step, "optimizer": opt_meta, "sha256": _sha256(tensor_path), **extra}
    json_path = stem.with_suffix(".json")
    write_json(json_path, meta)
    # Commit markers (JSON) first, so a crash in between never leaves a marker without its tensors.
    for old in sorted(ckpt_dir.glob("step-*"), key=lambda p: p.suffix != ".json"):
        if old.stem != stem.name:
            old.unlink(missing_ok=True)
    return json_path


def latest(ckpt_dir: Path) -> Path | None:
    """The newest committed, intact checkpoint's JSON path; None when none was ever committed.

    A folder whose committed checkpoints are all damaged (hash mismatch, unreadable: disk corruption or
    a planted file) is a UserError rather than None: silently training from scratch would lose the work.
    Files that vanish while we look (a concurrent writer rotating checkpoints) are skipped.
    """
    damaged = []
    for json_path in sorted(ckpt_dir.glob("step-*.json"), reverse=True):
        tensor_path = json_path.with_suffix(".safetensors")
        try:
            meta = read_json(json_path)
            intact = isinstance(meta, dict) and meta.get("sha256") == _sha256(tensor_path)
        except (ValueError, OSError):
            intact = False
        if intact:
            return json_path
        if json_path.exists():  # else it was rotated away while we looked
            damaged.append(json_path.name)
    if damaged:
        raise UserError(
            f"Checkpoint {ckpt_dir / damaged[0]} is damaged (tensors missing or failing the hash check).",
            f"Restore it, or delete {ckpt_dir} to restart the run from scratch.",
        )
    return None


def load(
    json_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, total_steps: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore ``model`` and ``optimizer`` in place; returns (extra JSON fields, extra tensors).

    A checkpoint that passes the hash check can still be wrong for this run (copied from another run,
    edited, written by another version): its tensors must fit the network and optimizer exactly, and
    its step must lie in ``[0, total_steps]`` (a step beyond the end would mark the run finished
    without training). Each is a UserError naming the file.
    """
    try:
        meta = read_json(json_path)
    except (ValueError, OSError) as exc:
        meta, why = None, f"unreadable: {exc}"
    else:
        why = "not a JSON object holding the optimizer state"
    if not isinstance(meta, dict) or not isinstance(meta.get("optimizer"), dict):
        raise damaged(json_path, why)
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
        raise damaged(json_path, f"step {short(step)} outside 0..{total_steps}, this run's steps")
    try:
        tensors = load_file(str(json_path.with_suffix(".safetensors")))
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"Checkpoint {json_path.with_suffix('.safetensors')} is unreadable ({exc})."
        ) from None
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    problems = state_problems(model, state)
    if problems:
        raise damaged(json_path, f"its tensors do not fit this run's network: {problems}")
    try:
        model.load_state_dict(state)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta.pop("optimizer")))
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise damaged(json_path, f"its optimizer state does not fit: {type(exc).__name__}") from None
    _match_param_layout(optimizer)
    extra_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}
    return meta, extra_tensors


def damaged(json_path: Path, why: str) -> UserError:
    return UserError(
        f"Checkpoint {json_path} is damaged or belongs to another run ({why}).",
        f"Restore it, or delete {json_path.parent} to restart the run from scratch.",
    )


def field(json_path: Path, meta: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``meta[key]`` checked to be of ``kind`` (a damaged checkpoint is a UserError, not a KeyError)."""
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise damaged(json_path, f"field {key!r} is {short(value, 40)}")
    return value
