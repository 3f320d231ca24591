"""Atomic file output: write to a temp file in the destination folder, then rename (no partial files).

Every temporary is named ``.<name>.<pid>.<random>.tmp`` beside the output ``<name>`` it becomes, so that a later
run can tell a leftover of a killed writer (its pid no longer runs) from the work of a running one
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ramp.errors import RampError


class OutputPathError(RampError, OSError):
    """The destination cannot be written (missing folder, read-only, ...)."""


_STARTED = time.time()  # about when this process started: older pid-less temporaries are a killed run's
# .<name>.<pid>.<random>.tmp (mkstemp/mkdtemp's random part has no dots; "-old" marks a replaced folder)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[^.]+)\.tmp$")
_LEGACY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[^.]+)\.tmp$")  # before the pid was in the name


def temp_prefix(name: str) -> str:
    """Prefix of this process's temporaries for the output ``name``: ``.<name>.<pid>.``."""
    return f".{name}.{os.getpid()}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def is_stale_temporary(path: Path, name: str | None = None) -> bool:
    """Whether ``path`` is a temporary (of output ``name``, any when None) left by a writer that no longer runs:
    its pid is gone, or, for a name without a pid (older versions), it is older than this process."""
    m = _TEMP_NAME.match(path.name)
    if m is not None and (name is None or m["name"] == name):
        return not _running(int(m["pid"]))
    m = _LEGACY_NAME.match(path.name)
    if m is not None and name is not None and m["name"] == name:
        try:
            return path.lstat().st_mtime < _STARTED
        except FileNotFoundError:
            return False
    return False


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` (of output ``name``, any when None) whose writer no longer runs;
    never one of a running process. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{glob.escape(name)}.*.tmp" if name is not None else ".*.tmp"
    removed = []
    for p in sorted(folder.glob(pattern)):
        if not is_stale_temporary(p, name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputPathError(f"output folder {path.parent} does not exist (for {path})")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; it replaces ``path`` only if the block succeeds.

    Leftovers of a writer that was killed (``.<name>.<pid>.*.tmp`` beside it, pid gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = _umask()
        for p in (tmp, *tmp.rglob("*")):  # mkdtemp/mkstemp create 0700/0600; outputs get the usual modes
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        if path.exists():
            old = tmp.with_name(tmp.name.removesuffix(".tmp") + "-old.tmp")  # one per writer
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def scratch_dir(folder: str | Path, name: str) -> Iterator[Path]:
    """A scratch folder ``.<name>.<pid>.*.tmp`` in ``folder`` for the block, removed after it (after a kill, by the
    next :func:`remove_stale_temporaries` of ``folder``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite the header of the safetensors file ``path`` in place with its ``__metadata__`` keys sorted.

    The safetensors writer orders metadata keys by a hash seeded per process, so the same tensors and metadata
    give other bytes on every run; sorted, the file is byte-deterministic. The header keeps its length.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        text = raw.decode("utf-8").rstrip(" ")
        header = json.loads(text)
        if _compact_json(header) != text:
            raise RampError(f"{path}: the safetensors header is not in the expected compact JSON; cannot sort it")
        header["__metadata__"] = dict(sorted((header.get("__metadata__") or {}).items()))
        if not header["__metadata__"]:
            return
        f.seek(8)
        f.write(_compact_json(header).encode("utf-8"))


def _compact_json(data: Any) -> str:
    """JSON as the safetensors writer (serde_json) writes it: no spaces, UTF-8 unescaped."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
