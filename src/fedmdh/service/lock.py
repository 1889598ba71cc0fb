"""One ``fedmdh serve`` per folder: an exclusive lock on ``FOLDER/service.lock`` held for the service's life.

A second service on the same folder would mark the first one's running task ``interrupted`` (it takes
every ``running`` task for the leftover of a stopped service) while the first keeps training it. The
lock (``fcntl.flock``, released by the kernel when the holder exits, however it exits) is taken
before the task store is opened; the file names the holder (PID, host, address), so the second
service refuses in one line that says who holds the folder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from fedmdh.errors import InputError

LOCK_NAME = "service.lock"
_MAX_READ = 4096


class FolderLock:
    """The held lock of a service folder; :meth:`describe` records the address, :meth:`release` drops it."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self._fd = folder, fd

    def describe(self, address: str | None = None) -> None:
        """Write who holds the folder into the lock file: PID, host, address (when known), since when."""
        lines = [f"pid {os.getpid()}", f"host {socket.gethostname()}",
                 f"since {datetime.now(timezone.utc).replace(microsecond=0).isoformat()}"]
        if address:
            lines.append(f"address {address}")
        data = ("\n".join(lines) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def _holder(fd: int) -> str:
    """Who holds the lock, from what its holder wrote into the file (bounded, printable)."""
    try:
        raw = os.pread(fd, _MAX_READ, 0).decode("utf-8", errors="replace")
    except OSError:
        raw = ""
    info: dict[str, str] = {}
    for line in raw.splitlines():
        key, _, value = line.partition(" ")
        if key in ("pid", "host", "address", "since") and key not in info:
            info[key] = "".join(c if c.isprintable() else "?" for c in value.strip())[:200]
    if "pid" not in info:
        return "a process that has not said who it is yet"
    where = f" on {info['host']}" if info.get("host") else ""
    at = f", at {info['address']}" if info.get("address") else ", still starting"
    return f"PID {info['pid']}{where}{at}"


def lock_folder(folder: str | Path) -> FolderLock:
    """Take ``folder``'s service lock and say so in the lock file; one line naming the holder when it is taken."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise InputError(f"{path}: cannot open the service's lock file ({exc.strerror}); choose another --folder.") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise InputError(f"{folder}: another fedmdh serve uses this folder ({holder}); stop it first, or give this "
                         "one another --folder.") from None
    except OSError as exc:
        os.close(fd)
        raise InputError(f"{path}: cannot lock the service's folder ({exc.strerror}); choose a folder on a local "
                         "disk with --folder.") from None
    lock = FolderLock(folder, fd)
    lock.describe()
    return lock
