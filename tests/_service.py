"""A real ``fedmdh serve`` process for the service's tests: started on 127.0.0.1 with a free port, stopped by PID.

``fedmdh serve --port 0`` binds a free port itself and prints its address; the helper reads it from
the process's output and waits for ``/api/health``. Stopping sends a signal to that PID only, waits,
and checks that no process the service started (its embedded chain nodes) is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

_URL = re.compile(r"fedmdh service on (http://127\.0\.0\.1:\d+/)")


def descendants(pid: int) -> set[int]:
    """PIDs of every live descendant of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServiceProcess:
    """``fedmdh serve`` on a folder, as a child process of the tests."""

    def __init__(self, folder: Path, token: str, *extra: str, env: dict[str, str] | None = None,
                 prelude: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token_file = self.folder.parent / f"{self.folder.name}.token"
        self.token_file.write_text(token + "\n", encoding="utf-8")
        self.token = token
        self.extra = extra
        self.env = env or {}
        self.prelude = prelude  # Python run before the CLI (e.g. "import sys; sys.setrecursionlimit(100000); ")
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.url = ""
        self.seen_children: set[int] = set()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120.0, **kw)

    def start(self, timeout: float = 120.0) -> "ServiceProcess":
        cmd = [sys.executable, "-c", self.prelude + "from fedmdh.cli import main; main()", "serve", "--port", "0",
               "--folder", str(self.folder), "--token-file", str(self.token_file), *self.extra]
        self.lines = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        got = threading.Event()

        def drain() -> None:  # read every line, so the service never blocks on a full pipe
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = _URL.search(line)
                if m:
                    self.url = m.group(1)
                    got.set()
            got.set()

        def sample() -> None:  # every process the service starts (embedded chain nodes), checked at stop
            while self.proc is not None and self.proc.poll() is None:
                self.note_children()
                time.sleep(0.5)

        threading.Thread(target=drain, daemon=True).start()
        threading.Thread(target=sample, daemon=True).start()
        if not got.wait(timeout) or not self.url:
            self.stop(signal.SIGKILL)
            raise RuntimeError("fedmdh serve did not print its address:\n" + "\n".join(self.lines))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "api/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise RuntimeError("fedmdh serve did not answer /api/health:\n" + "\n".join(self.lines))

    def note_children(self) -> None:
        """Remember the processes the service has started so far (checked at stop)."""
        if self.proc is not None:
            self.seen_children |= descendants(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` to the service's PID, wait for it, and check that nothing it started lives on.

        Returns the exit status; 0 for a SIGTERM that shut the service down in order (it says so).
        """
        assert self.proc is not None
        self.note_children()
        pid = self.proc.pid
        if self.proc.poll() is None:
            os.kill(pid, sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"fedmdh serve (PID {pid}) did not stop within {timeout} s of signal {sig}")
        deadline = time.monotonic() + 15  # a chain node ends itself when its parent's pipe closes
        while time.monotonic() < deadline and any(alive(c) for c in self.seen_children):
            time.sleep(0.2)
        left = sorted(c for c in self.seen_children if alive(c))
        assert not left, f"fedmdh serve left processes running after it stopped: {left}"
        if sig == signal.SIGTERM:  # uvicorn shuts down, then ends itself by the signal it caught
            assert rc in (0, -signal.SIGTERM), rc
            time.sleep(0.2)
            assert any(line.endswith("fedmdh service stopped") for line in self.lines), "\n".join(self.lines)
            return 0
        return rc
