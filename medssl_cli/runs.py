"""The run-directory convention shared by every stage.

```
<runs root>/<stage>-<name>-<YYYYmmdd-HHMMSS>[-k]/
  recipe.yaml      the fully resolved recipe (defaults < parent < recipe file < CLI)
  run.json         stage, status (running|finished|failed|interrupted), parent run, command line,
                   versions, data provenance (dataset ids, splits, images fingerprint), times, device
  weights/         *.safetensors, tensors only; metadata holds arch, channels, image size, recipe hash
  checkpoint/      resumable state (tensors in safetensors, scalars and RNG in JSON)
  history.jsonl    one line per epoch
  metrics.json     the stage's final metrics
  plots/*.png
  log.txt          everything the run logged
```
A stage reads its parent run (``--from RUN``, default the newest *finished* run of the parent stage
under the runs root) and never writes into it. Every file goes through ``medssl_cli.io`` (atomic).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from medssl_cli import __version__
from medssl_cli.errors import UserError, short
from medssl_cli.io import read_json, read_yaml_mapping, write_json, write_yaml
from medssl_cli.recipe import Recipe, from_dict

STATUSES = ("running", "finished", "failed", "interrupted")
LOG = logging.getLogger("medssl")


def default_runs_root() -> Path:
    return Path(os.environ.get("MEDSSL_RUNS", "runs"))


def versions() -> dict[str, str]:
    """Package versions without importing them (keeps the CLI fast)."""
    out = {"medssl": __version__, "python": sys.version.split()[0]}
    for dist, key in (("torch", "torch"), ("torchvision", "torchvision"), ("mimeta-pytorch", "mimeta")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    return out


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def feature_cache_dir(runs_root: Path) -> Path:
    """Where frozen-backbone features of the runs under ``runs_root`` are cached (``readout.features``);
    hidden, so ``medssl report`` never takes it for a run."""
    return Path(runs_root) / ".cache" / "features"


MAX_NAME = 64  # characters of --name in a directory name (file systems stop at 255 bytes per name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "run"


def check_name(name: str | None) -> str:
    """``--name`` as it goes into a run directory's name; over ``MAX_NAME`` characters is a UserError."""
    slug = _slug(name or "run")
    if len(slug) > MAX_NAME:
        raise UserError(
            f"--name is {len(slug)} characters long ({short(slug, 40)}); at most {MAX_NAME}.",
            "Choose a shorter --name (the run directory adds the stage and a time stamp).",
        )
    return slug


@dataclass
class Run:
    """A run directory and its manifest."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / "run.json"

    @property
    def manifest(self) -> dict[str, Any]:
        try:
            data = read_json(self.manifest_path)
        except FileNotFoundError:
            raise UserError(
                f"{self.path} is not a medssl run (no run.json).",
                "Pass a run directory (the folder holding run.json).",
            ) from None
        except ValueError:
            raise UserError(f"{self.manifest_path} is unreadable (not JSON).") from None
        except OSError as exc:
            raise UserError(f"{self.manifest_path} is unreadable ({exc.strerror or exc}).") from None
        if not isinstance(data, dict):
            raise UserError(
                f"{self.manifest_path} is damaged (a JSON {type(data).__name__}, not an object).",
                "The run directory is damaged; use another run or re-run the stage.",
            )
        return data

    @property
    def stage(self) -> str:
        return self.manifest.get("stage", "?")

    @property
    def status(self) -> str:
        return self.manifest.get("status", "?")

    @property
    def name(self) -> str:
        return self.path.name

    def recipe(self) -> Recipe:
        """The run's stored ``recipe.yaml``; a missing or broken one is a UserError naming the file."""
        path = self.path / "recipe.yaml"
        hint = "The run directory is damaged; use another run or re-run the stage."
        data = read_yaml_mapping(path, "The run's recipe", hint)
        try:
            return from_dict(data)
        except UserError as exc:
            raise UserError(f"In {path}: {exc.message}", exc.hint) from None

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into run.json (atomic rewrite). Only rank 0 calls this."""
        data = self.manifest if self.manifest_path.exists() else {}
        data.update(fields)
        write_json(self.manifest_path, data)
        return data

    def set_status(self, status: str, **fields: Any) -> None:
        assert status in STATUSES, status
        extra = {"ended": _now()} if status != "running" else {}
        self.update(status=status, **extra, **fields)

    def reopen(self) -> None:
        """A resumed run is running again: its earlier outcome (status, stop signal and step, requeue,
        error, end time) moves into the list ``stops``, so a finished run shows no stale stop fields."""
        data = self.manifest
        keys = ("status", "stop_signal", "stop_step", "stop_note", "requeue", "error", "ended")
        prior = {k: data.pop(k) for k in keys if k in data}
        data["stops"] = [*data.get("stops", []), prior]
        data["status"] = "running"
        write_json(self.manifest_path, data)

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)


def create_run(
    runs_root: Path | str,
    stage: str,
    recipe: Recipe,
    *,
    name: str | None = None,
    parent: Run | None = None,
    extra: dict[str, Any] | None = None,
    path: Path | None = None,
) -> Run:
    """Create a new run directory with ``recipe.yaml`` and a ``running`` run.json.

    The directory is claimed with ``mkdir`` (atomic): two processes starting in the same second get
    distinct directories (``-2``, ``-3``... suffixes). ``path`` fixes the directory (grid cells).
    """
    root = Path(runs_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}-{threading.get_ident()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"Runs root {root} is not writable ({exc.strerror}).", "Pass a writable --runs-root."
        ) from None
    if path is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{stage}-{check_name(name)}-{stamp}"
        for k in range(1, 1000):
            candidate = root / (base if k == 1 else f"{base}-{k}")
            try:
                candidate.mkdir()
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise UserError(
                    f"Cannot create run directory {candidate} ({exc.strerror or exc}).",
                    "Pass a writable --runs-root with a shorter path, or a shorter --name.",
                ) from None
        else:  # pragma: no cover - a thousand runs in one second
            raise UserError(f"Could not create a run directory under {root}.")
    else:
        candidate = Path(path)
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            raise UserError(
                f"Run directory {candidate} already exists.",
                "Continue it with --resume, or choose a new directory.",
            ) from None
    run = Run(candidate)
    try:
        write_yaml(run.file("recipe.yaml"), recipe.to_dict())
        run.update(
            stage=stage,
            name=name or "run",
            status="running",
            parent=str(parent.path.resolve()) if parent else None,
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            versions=versions(),
            recipe_hash=recipe.hash(),
            host=socket.gethostname(),
            started=_now(),
            **(extra or {}),
        )
    except BaseException:
        # e.g. a full disk: a directory without run.json would only be clutter that no stage can use
        shutil.rmtree(candidate, ignore_errors=True)
        raise
    return run


def list_runs(runs_root: Path | str, stage: str | None = None) -> list[Run]:
    """All runs directly under ``runs_root`` (optionally of one stage), oldest first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if not (d / "run.json").is_file():
            continue
        try:
            info = read_json(d / "run.json")
        except (ValueError, OSError):
            continue
        if not isinstance(info, dict):  # damaged: not a run any stage can use
            continue
        if stage is None or info.get("stage") == stage:
            out.append((info.get("started", ""), d.name, Run(d)))
    return [r for _, _, r in sorted(out, key=lambda t: (t[0], t[1]))]


def find_latest(runs_root: Path | str, stage: str) -> Run:
    """The newest finished run of ``stage`` under ``runs_root``."""
    finished = [r for r in list_runs(runs_root, stage) if r.status == "finished"]
    if not finished:
        raise UserError(
            f"No finished {stage} run under {runs_root}.",
            f"Run `medssl {stage}` first, or pass --from RUN_DIR (and --runs-root if it lives elsewhere).",
        )
    return finished[-1]


def resolve_run(from_arg: str | Path | None, runs_root: Path | str, stage: str) -> Run:
    """The run named by ``--from`` (a path, or a name under the runs root), checked to be usable."""
    if from_arg is None:
        return find_latest(runs_root, stage)
    p = Path(from_arg)
    if not p.exists() and (Path(runs_root) / p).exists():
        p = Path(runs_root) / p
    if not p.is_dir():
        raise UserError(f"--from {from_arg}: no such run directory.", f"List runs with `ls {runs_root}`.")
    run = Run(p)
    info = run.manifest
    if info.get("stage") != stage:
        raise UserError(
            f"--from {from_arg} is a {info.get('stage')} run, but a {stage} run is needed here.",
            f"Pass a {stage} run directory.",
        )
    status = info.get("status")
    if status == "running":
        raise UserError(
            f"--from {from_arg} is still running (or crashed without marking itself).",
            "Wait for it to finish, or resume it with --resume.",
        )
    if status != "finished":
        raise UserError(
            f"--from {from_arg} did not finish (status: {status}).",
            "Resume it with --resume, or pick a finished run.",
        )
    return run


class RunLock:
    """An exclusive lock on a run directory, so two processes never write the same run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fh: Any = None

    def __enter__(self) -> RunLock:
        self.fh = open(self.path, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"Run {self.path.parent} is in use by another process.",
                    "Wait for it to finish; only one process may resume a run.",
                ) from None
            raise
        _remove_stale_temporaries(self.path.parent)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporaries of ``io.atomic_path`` (``.<name>.<random>.tmp``) that a killed process left.

    Only called with the run lock held: no other process is writing into this run, so every such file
    is an orphan (SIGKILL, OOM or power loss between its creation and its rename).
    """
    # ".tmpXXXXXX": safetensors' own temporary file, left by versions that let it write the file itself.
    for tmp in [*run_dir.rglob(".*.tmp"), *run_dir.rglob(".tmp??????")]:
        if tmp.is_file():
            LOG.info(f"Removing {tmp.relative_to(run_dir)}, left half-written by an earlier process")
            tmp.unlink(missing_ok=True)


def attach_log(run: Run, rank: int = 0) -> logging.Handler:
    """Send the 'medssl' logger to the run's log file (rank > 0: log.rank<k>.txt). Returns the handler."""
    name = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
    try:
        handler = logging.FileHandler(run.file(name), encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"Run directory {run.path} is not writable ({run.file(name)}: {exc.strerror or exc}).",
            "Make it writable (or copy the run to a writable place) and retry.",
        ) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    return handler


def detach_log(handler: logging.Handler) -> None:
    LOG.removeHandler(handler)
    handler.close()


def locate(recorded: str | Path, near: Path) -> Path:
    """A run another run recorded by its absolute path (``parent``, ``grid``), after the runs root was
    moved or copied (cluster -> laptop): the recorded path if it exists, else the run of the same name
    beside ``near`` (the recording run's runs root), else the recorded path (its absence is reported
    by the caller)."""
    path = Path(recorded)
    if not (path / "run.json").is_file() and (near / path.name / "run.json").is_file():
        return near / path.name
    return path
