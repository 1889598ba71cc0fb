"""A command's watchdog: when the command dies, even by SIGKILL, every process it started goes with it.

:func:`supervised` tags the command's own environment with a fresh token (``FEDMDH_SUPERVISOR``, a
``:``-separated list, so that a supervised command started by another, such as the nodes of
``fedmdh deploy local``, carries both tokens). Every process started afterwards inherits the tag,
whoever starts it and whatever session or parent it ends up with: Flower's launchers start the
SuperExec, ServerApp and ClientApp processes in sessions of their own, and a process whose parent
dies is handed to init, so neither a process group nor the parent-death signal (which reaches
only a direct child) finds them all; their environment does.

The watchdog is a small process of its own (``python -m fedmdh.deploy.watchdog TOKEN PID``) in a
session of its own (a Ctrl-C at the terminal does not stop it first). It holds the read end of a
pipe whose write end only the command holds: when the pipe closes, because the command exited
or was killed, it stops every process whose environment carries the token, SIGTERM first (a chain
node writes its state file), SIGKILL after a grace period, until a scan finds none. Linux only
(``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "FEDMDH_SUPERVISOR"
#: seconds between SIGTERM and SIGKILL of the processes left behind
GRACE_S = 2.0
#: seconds the watchdog keeps scanning for processes left behind (some may be starting as it scans)
SWEEP_S = 30.0


def _tags(pid: int) -> list[str]:
    """The supervisor tokens in ``pid``'s environment (empty when unreadable: another user's, a zombie)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return []
    prefix = f"{ENV}=".encode()
    for item in env.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace").split(":")
    return []


def tagged(token: str, exclude: frozenset[int] = frozenset()) -> list[int]:
    """The live processes whose environment carries ``token`` (never this one, nor ``exclude``)."""
    me = os.getpid()
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        pid = int(d.name)
        if pid != me and pid not in exclude and token in _tags(pid):
            out.append(pid)
    return out


def _signal(pid: int, token: str, sig: int) -> None:
    """Send ``sig`` to ``pid`` if it still carries ``token`` (through a pidfd: a reused PID is never hit)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        if token in _tags(pid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        return
    try:
        if token in _tags(pid):
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep(token: str, exclude: frozenset[int] = frozenset(), grace: float = GRACE_S,
          limit: float = SWEEP_S) -> int:
    """Stop every process that carries ``token``: SIGTERM, SIGKILL after ``grace`` seconds, again until
    two scans in a row find none or ``limit`` seconds passed. Returns how many it signalled."""
    t_end = time.monotonic() + limit
    seen: set[int] = set()
    quiet = 0
    while quiet < 2 and time.monotonic() < t_end:
        pids = tagged(token, exclude)
        if not pids:
            quiet += 1
            time.sleep(0.1)
            continue
        quiet = 0
        fresh = [p for p in pids if p not in seen]
        for p in fresh:
            _signal(p, token, signal.SIGTERM)
        seen.update(fresh)
        t_kill = time.monotonic() + (grace if fresh else 0.0)
        while time.monotonic() < t_kill and tagged(token, exclude):
            time.sleep(0.1)
        for p in tagged(token, exclude):
            _signal(p, token, signal.SIGKILL)
        time.sleep(0.1)
    return len(seen)


def _watch(token: str, parent: int) -> None:
    """Wait until the pipe on stdin closes (or the parent is gone), then sweep ``token``."""
    while True:
        try:
            ready, _, _ = select.select([0], [], [], 1.0)
            if ready and not os.read(0, 4096):
                break
        except OSError:
            break
        if os.getppid() != parent:
            break
    sweep(token, exclude=frozenset({parent}))


@contextmanager
def supervised() -> Iterator[str]:
    """Hold a watchdog for the ``with`` block: what this process starts in it (and what that starts)
    is stopped when this process dies; at the end of the block, anything left is stopped too.
    Yields the token."""
    if not Path("/proc/self/environ").exists():  # no /proc: nothing to watch with
        yield ""
        return
    token = secrets.token_hex(8)
    watchdog = subprocess.Popen([sys.executable, "-m", "fedmdh.deploy.watchdog", token, str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    old = os.environ.get(ENV)
    os.environ[ENV] = f"{old}:{token}" if old else token
    try:
        yield token
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # the watchdog sweeps what is left, then exits
        try:
            watchdog.wait(timeout=SWEEP_S + 10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


if __name__ == "__main__":  # pragma: no cover - runs as the watchdog process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch(sys.argv[1], int(sys.argv[2]))
