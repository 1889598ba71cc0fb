"""Where fedmdh writes: output folders claimed under a lock, output files checked before any work.

A run or benchmark folder is *claimed* before anything is written to it (:func:`claim_output_dir`):
it must be absent or empty, unless ``overwrite`` is given, in which case what a previous fedmdh run
left there is removed first; and a lock (``fcntl.flock`` on ``DIR/.fedmdh.lock``, held until the
claim is released or the process dies) keeps a second run out of the folder while the first is
writing. Every refusal is an :class:`~fedmdh.errors.InputError` (one line).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmdh.errors import InputError

LOCK_NAME = ".fedmdh.lock"
#: Files any fedmdh run or benchmark writes first: their presence marks a folder as fedmdh's own.
_MARKERS = ("config.toml", "run.log", "metrics.jsonl", "results.csv", LOCK_NAME)


def _check_writable_location(path: Path, flag: str) -> None:
    """Refuse ``path`` when it, or a folder above it, is a file (one line naming which)."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: {flag} exists and is a file, not a folder; give a folder path.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{path}: {flag} lies under {parent}, which is a file; give a folder path.")
            break


def check_output_file(path: str | Path, flag: str = "OUT") -> Path:
    """Check that ``path`` can be written as a file: not a folder, not under a file (parents created)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: {flag} is a folder; give the path of the file to write.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{path}: {flag} lies under {parent}, which is a file; give another path.")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create its folder ({exc.strerror}); give another {flag}.") from None
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Check that ``path`` can be a folder to write into: not a file, not under a file."""
    path = Path(path)
    _check_writable_location(path, flag)
    return path


class OutputDir:
    """A claimed output folder (see :func:`claim_output_dir`); ``path`` is where to write."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the lock file stays: it marks the folder as written by fedmdh)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"OutputDir({str(self.path)!r})"


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)


def _busy(path: Path, flag: str) -> InputError:
    return InputError(f"{path}: another fedmdh process is writing to this {flag} folder; wait for it to finish "
                      f"or choose another {flag}.")


def _try_lock(lock_path: Path, create: bool) -> int | None:
    """An fd holding an exclusive lock on ``lock_path``; ``None`` when another process holds it."""
    fd = os.open(lock_path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def acquire_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--out") -> OutputDir:
    """Claim ``path`` for writing; the caller must :meth:`~OutputDir.release` it (or use :func:`claim_output_dir`).

    Refused (nothing written): ``path`` or a folder above it is a file; another fedmdh process holds
    the folder; the folder is not empty and ``overwrite`` is false; ``overwrite`` is given but the
    folder does not look like fedmdh's (none of config.toml, run.log, metrics.jsonl, results.csv,
    .fedmdh.lock), so deleting it could destroy someone's files.
    """
    path = Path(path)
    _check_writable_location(path, flag)
    lock_path = path / LOCK_NAME
    if path.is_dir():
        existing = _contents(path)
        if existing and lock_path.exists():  # a run may be writing: say so rather than "not empty"
            fd = _try_lock(lock_path, create=False)
            if fd is None:
                raise _busy(path, flag)
            os.close(fd)
        if existing and not overwrite:
            shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
            raise InputError(f"{path}: {flag} folder is not empty (holds {shown}); choose a new folder, or pass "
                             "--overwrite to replace what a previous run wrote there.")
        if existing and not any((path / m).exists() for m in _MARKERS):
            raise InputError(f"{path}: is not empty and was not written by fedmdh; --overwrite only replaces a "
                             "fedmdh run or benchmark folder, choose another folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(lock_path, create=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot write to this {flag} folder ({exc.strerror}); choose another.") from None
    if fd is None:
        raise _busy(path, flag)
    claim = OutputDir(path, fd)
    try:
        existing = _contents(path)  # again, under the lock: another run may have finished meanwhile
        if existing and not overwrite:
            raise InputError(f"{path}: {flag} folder is not empty (another run just wrote {existing[0]}); choose "
                             "a new folder, or pass --overwrite.")
        for name in existing:
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    except BaseException:
        claim.release()
        raise
    return claim


@contextmanager
def claim_output_dir(
    path: "str | Path | OutputDir", overwrite: bool = False, flag: str = "--out"
) -> Iterator[OutputDir]:
    """Hold ``path`` for the ``with`` block (see :func:`acquire_output_dir`).

    Given an :class:`OutputDir` already claimed (by a caller that checked the folder before showing
    progress), it is used as it is and left to that caller to release.
    """
    if isinstance(path, OutputDir):
        yield path
        return
    claim = acquire_output_dir(path, overwrite=overwrite, flag=flag)
    try:
        yield claim
    finally:
        claim.release()


def replace_dir_atomically(build: Callable[[Path], None], target: Path) -> None:
    """Write a folder with ``build(tmp_folder)`` beside ``target``, then rename it into place.

    ``target`` is never half-written: readers see the old folder or the new one. Between the two
    renames that swap an existing folder out and the new one in, the old copy is ``.<name>.old``
    beside it (microseconds; only a crash exactly there leaves it instead of ``target``).
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    build(tmp)
    if target.exists():
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
