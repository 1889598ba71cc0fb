"""Where fedmdh writes: output folders claimed under a lock, output files checked before any work.

A run or benchmark folder is *claimed* before anything is written to it (:func:`claim_output_dir`):
it must be absent or empty, unless ``overwrite`` is given, in which case what a previous fedmdh run
wrote there is removed first, and nothing else; and a lock (``fcntl.flock`` on ``DIR/.fedmdh.lock``,
held until the claim is released or the process dies) keeps a second run out of the folder while
the first is writing. Every refusal is an :class:`~fedmdh.errors.InputError` (one line).

What a run wrote is listed in ``DIR/.fedmdh-manifest.json`` (written atomically): when the folder is
claimed, the names the job may write (``declared``, e.g. :data:`RUN_NAMES`); when the claim is
released, everything the folder then holds (the job had it empty and locked). ``--overwrite``
removes exactly those entries (and their ``.NAME.*`` temporary siblings) and refuses, naming it, an
entry the manifest does not list (a file the user put there), or an input of the new run (an
institution CSV, the test set, the config) that lies in the folder. A folder written by a fedmdh
that kept no manifest (no ``.fedmdh-manifest.json``) is taken over only when it holds a marker file (config.toml, run.log, metrics.jsonl, results.csv or .fedmdh.lock) and nothing but the
names a run or a benchmark writes (:data:`KNOWN_NAMES`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmdh import jsonsafe
from fedmdh.errors import InputError
from fedmdh.files import atomic_write_json

LOCK_NAME = ".fedmdh.lock"
#: The list of what the job that claimed the folder wrote there (see the module text).
MANIFEST_NAME = ".fedmdh-manifest.json"
MANIFEST_FORMAT = "fedmdh-output/1"
#: Files any fedmdh run or benchmark writes first: their presence marks a folder as fedmdh's own.
_MARKERS = ("config.toml", "run.log", "metrics.jsonl", "results.csv", LOCK_NAME)
#: What ``fedmdh run`` writes at the top of its folder.
RUN_NAMES = ("config.toml", "federation.json", "run.log", "metrics.jsonl", "final_metrics.json", "models", "ledger")
#: What ``fedmdh benchmark`` writes at the top of its folder.
BENCHMARK_NAMES = ("config.toml", "federation.json", "run.log", "results.csv", "summary.md", "curves.png", "history",
                   "ledger")
#: What ``fedmdh deploy local`` writes besides a run's files.
DEPLOY_NAMES = ("deploy", "nodes", "deploy_task.json")
#: Every name a run, a benchmark or a local deployment writes: all that --overwrite removes from a folder
#: without a manifest, or whose job was killed before it could list what it wrote.
KNOWN_NAMES = tuple(dict.fromkeys((*RUN_NAMES, *BENCHMARK_NAMES, *DEPLOY_NAMES)))


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
        self._claimed = False  # set once the folder is emptied and its manifest started

    def release(self) -> None:
        """Record what the folder holds in its manifest (all of it was written under this claim) and drop
        the lock (the lock file stays: it marks the folder as written by fedmdh)."""
        if self._fd >= 0:
            if self._claimed:  # (refused while claiming: what the folder holds is not this job's)
                try:
                    listed = _read_manifest(self.path)
                    _write_manifest(self.path, _contents(self.path), listed[0] if listed else (), complete=True)
                except OSError:  # pragma: no cover - the folder went away or became read-only meanwhile
                    pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"OutputDir({str(self.path)!r})"


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name not in (LOCK_NAME, MANIFEST_NAME))


def _read_manifest(path: Path) -> tuple[list[str], bool] | None:
    """The names ``path``'s manifest lists and whether the job that wrote it finished listing (released
    the folder); ``None`` without a (readable, well-formed) manifest."""
    file = path / MANIFEST_NAME
    try:
        data = jsonsafe.read_file(file, max_bytes=4 * 1024 * 1024)
    except (OSError, ValueError):
        return None
    entries = data.get("entries") if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return None
    return [e for e in entries if e and "/" not in e and e not in (".", "..")], data.get("complete") is True


def _write_manifest(path: Path, entries: Iterable[str], declared: Iterable[str] = (), complete: bool = False) -> None:
    names = sorted({*entries, *declared} - {LOCK_NAME, MANIFEST_NAME})
    atomic_write_json(path / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "entries": names, "complete": complete})


def _owned(name: str, owned: set[str]) -> bool:
    """``name`` is listed, or a temporary sibling (``.NAME.tmp``, ``.NAME.<id>``) of a listed entry or of
    the manifest."""
    return name in owned or any(name.startswith(f".{o}.") for o in (*owned, MANIFEST_NAME))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _check_overwrite(path: Path, existing: list[str], inputs: Iterable[str | Path], flag: str) -> list[str]:
    """What ``--overwrite`` may remove from ``path`` (the names an earlier job wrote); refuses, naming
    it, an entry fedmdh did not write or an input of this job that lies in the folder."""
    root = path.resolve()
    for given in inputs:
        p = Path(given)
        try:
            resolved = p.resolve()
        except (OSError, RuntimeError):
            continue
        if resolved == root or resolved.is_relative_to(root):
            raise InputError(f"{p}: is an input of this run and lies in the {flag} folder {path}, which --overwrite "
                             f"would empty; move it out of {path} or choose another {flag}.")
    listed = _read_manifest(path)
    if listed is None:  # a folder of an older fedmdh (no manifest): only its known names, under a marker
        if not any((path / m).exists() for m in _MARKERS):
            raise InputError(f"{path}: is not empty and was not written by fedmdh; --overwrite only replaces a "
                             "fedmdh run or benchmark folder, choose another folder.")
        owned = set(KNOWN_NAMES)
    else:  # a job killed before it released the folder listed only what it declared: add the known names
        owned = set(listed[0]) | (set() if listed[1] else set(KNOWN_NAMES))
    foreign = [n for n in existing if not _owned(n, owned)]
    if foreign:
        more = f" (nor {_shown(foreign[1:])})" if len(foreign) > 1 else ""
        raise InputError(f"{path / foreign[0]}: was not written by an earlier fedmdh run{more}; --overwrite only "
                         f"removes what a run wrote: move {'it' if len(foreign) == 1 else 'them'} out of {path} or "
                         f"choose another {flag}.")
    return [n for n in existing if _owned(n, owned)]


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


def acquire_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--out",
                       inputs: Iterable[str | Path] = (), declared: Iterable[str] = ()) -> OutputDir:
    """Claim ``path`` for writing; the caller must :meth:`~OutputDir.release` it (or use :func:`claim_output_dir`).

    Refused (nothing written): ``path`` or a folder above it is a file; another fedmdh process holds
    the folder; the folder is not empty and ``overwrite`` is false; ``overwrite`` is given but the
    folder holds an entry an earlier fedmdh job did not write (not in its manifest; without a
    manifest: no marker file, or a name no run or benchmark writes), or one of ``inputs`` (the files
    this job reads) lies in it. ``declared``: the names this job may write, recorded in the manifest
    at once (so that a job killed midway is still taken over by ``--overwrite``).
    """
    path = Path(path)
    _check_writable_location(path, flag)
    lock_path = path / LOCK_NAME
    inputs = tuple(inputs)
    if path.is_dir():
        existing = _contents(path)
        if existing and lock_path.exists():  # a run may be writing: say so rather than "not empty"
            fd = _try_lock(lock_path, create=False)
            if fd is None:
                raise _busy(path, flag)
            os.close(fd)
        if existing and not overwrite:
            raise InputError(f"{path}: {flag} folder is not empty (holds {_shown(existing)}); choose a new folder, "
                             "or pass --overwrite to replace what a previous run wrote there.")
        if existing:
            _check_overwrite(path, existing, inputs, flag)
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
        for name in _check_overwrite(path, existing, inputs, flag) if existing else ():
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        _write_manifest(path, (), declared)
        claim._claimed = True
    except BaseException:
        claim.release()
        raise
    return claim


@contextmanager
def claim_output_dir(
    path: "str | Path | OutputDir", overwrite: bool = False, flag: str = "--out",
    inputs: Iterable[str | Path] = (), declared: Iterable[str] = (),
) -> Iterator[OutputDir]:
    """Hold ``path`` for the ``with`` block (see :func:`acquire_output_dir`).

    Given an :class:`OutputDir` already claimed (by a caller that checked the folder before showing
    progress), it is used as it is and left to that caller to release.
    """
    if isinstance(path, OutputDir):
        yield path
        return
    claim = acquire_output_dir(path, overwrite=overwrite, flag=flag, inputs=inputs, declared=declared)
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
