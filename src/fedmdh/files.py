"""Writes that a crash cannot leave half done: a file or a folder appears whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path`` (created with ``mode``), fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=float).encode("utf-8"))


def replace_dir(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Build a folder with ``build(tmp)`` and make it appear at ``target`` in one rename.

    ``target`` is a symbolic link to the current version (``.<name>.<id>`` beside it); the link is
    swapped atomically, then the previous version is removed. A reader sees the old folder or the
    new one, never a half-written one, even if the process is killed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    version = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    build(version)
    old = target.resolve() if target.is_symlink() else None
    if target.exists() and not target.is_symlink():
        shutil.rmtree(target)  # a plain folder from an older layout
    link = target.with_name(f".{target.name}.{uuid.uuid4().hex}.link")
    os.symlink(version.name, link)
    os.replace(link, target)
    if old is not None and old != version and old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return target
