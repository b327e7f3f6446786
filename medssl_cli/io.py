"""Atomic file writes: every file medssl produces goes through here.

A file is written to a temporary sibling, flushed and fsynced, then renamed over the target, so a
reader (or a resumed run) sees either the old file or the complete new one, never half a file. A
crash or a full disk leaves the target untouched and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from medssl_cli.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # mkstemp makes 0600 files; results should be readable like any other file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, target)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if disk_full(exc):
            raise UserError(
                f"Disk full while writing {target}.", "Free space (or choose another --runs-root) and resume."
            ) from exc
        raise


def disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when a library (safetensors, h5py, matplotlib) wraps it in its own exception type."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


def writable_dir(path: str | os.PathLike[str], option: str) -> Path:
    """The folder ``path`` (given as ``option``, e.g. '--out'), created if needed, with a probe that files
    can be written there; a file in the way or a read-only place is a UserError naming the option."""
    p, hint = Path(path), f"Pass another {option}."
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{option} {p} is a file, not a folder.", hint) from None
    except NotADirectoryError:
        raise UserError(f"{option} {p}: a part of this path is a file, not a folder.", hint) from None
    except OSError as exc:
        denied = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        what = "is not writable" if denied else "cannot be created"
        raise UserError(f"{option} {p} {what} ({exc.strerror or exc}).", hint) from None
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise UserError(f"{option} {p} is not writable ({exc.strerror or exc}).", hint) from None
    return p


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomic write through a library that wants a file name (safetensors, matplotlib, h5py)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file through ``atomic_path``: serialised in memory and written by us, so no library
    temporary file (safetensors' own ``.tmpXXXXXX``) can be left behind by a kill, and a full disk is the
    one-line UserError of every other write."""
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata=metadata))


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one line and rewrite atomically (history files are small: one line per epoch)."""
    p = Path(path)
    old = p.read_bytes() if p.exists() else b""
    line = json.dumps(obj, default=_json_default) + "\n"
    write_bytes(p, old + line.encode("utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


MAX_YAML_VALUES = 100_000  # a recipe or info.yaml holds hundreds; more is an alias bomb or not ours


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, mark: Any) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.problem_mark = key, mark


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping key given twice (PyYAML keeps the last one, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise DuplicateKeyError(key, key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def expanded_size(data: Any, limit: int = MAX_YAML_VALUES) -> int:
    """Number of values ``data`` holds with YAML aliases expanded (capped just above ``limit``); linear in
    the distinct objects, so a billion-laughs file is measured without being expanded."""
    memo: dict[int, int] = {}

    def size(x: Any, depth: int) -> int:
        if depth > 100:
            return limit + 1
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, dict):
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in x.items())
        elif isinstance(x, (list, tuple)):
            n = 1 + sum(size(v, depth + 1) for v in x)
        else:
            n = 1
        memo[id(x)] = n = min(n, limit + 1)
        return n

    return size(data, 0)


def load_yaml(text: str, path: str | os.PathLike[str]) -> Any:
    """``yaml.safe_load`` refusing duplicate keys and alias bombs (both UserErrors naming ``path``)."""
    data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    if expanded_size(data) > MAX_YAML_VALUES:
        raise UserError(
            f"{path} expands to more than {MAX_YAML_VALUES:,} values (nested YAML aliases).",
            "Write the values out; medssl refuses alias bombs.",
        )
    return data


def yaml_error_text(path: str | os.PathLike[str], exc: yaml.YAMLError) -> str:
    """One line for a YAML file ``safe_load`` refused: a tag it will not construct (``!!python/...``
    can run code, so it is refused, not merely unparsable) or a syntax error, with its position."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, DuplicateKeyError):
        return f"{path} gives the key {str(exc.key)[:60]!r} twice (second{where})."
    problem = str(getattr(exc, "problem", "") or "")
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.split("'")[1] if problem.count("'") >= 2 else "?"
        tag = tag.replace("tag:yaml.org,2002:", "!!")
        return f"{path} uses the YAML tag {tag}{where}, which medssl refuses (such tags can run code)."
    return f"{path} is not valid YAML{where}."


def read_yaml_mapping(path: str | os.PathLike[str], kind: str, hint: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (empty: {}). Every way it can fail is one UserError reading
    "``kind`` ``path`` ..." (kind: e.g. "Recipe file"), with ``hint``."""
    p = Path(path)
    try:
        data = load_yaml(p.read_text(encoding="utf-8"), p)
    except FileNotFoundError:
        raise UserError(f"{kind} {p} is missing.", hint) from None
    except yaml.YAMLError as exc:
        raise UserError(f"{kind} {yaml_error_text(p, exc)}", hint) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{kind} {p} is not UTF-8 text (byte {exc.start}).", hint) from None
    except OSError as exc:
        raise UserError(f"{kind} {p} is unreadable ({exc.strerror or exc}).", hint) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{kind} {p} is not a mapping of sections (data:, pretrain:, ...).", hint)
    return data


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
