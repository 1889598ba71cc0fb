"""Starting and stopping the services of a deployment: every process by its PID, its children with it.

Each service starts in a session (process group) of its own, so that stopping it by its PID also
stops what it started (a SuperNode's SuperExec, a SuperLink's ServerApp). A supervisor
(:class:`Services`) remembers every process it started and stops them all, in reverse order, on
exit, on error and on Ctrl-C. When the supervising process itself is killed outright, its
watchdog (:mod:`fedmdh.deploy.watchdog`) stops them and whatever they started. A service that
listens is ready when *its* process listens on its port (:func:`listens`), not merely when
something answers there.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmdh.errors import FedmdhError, InputError

ANVIL_VERSION = "1.7.1"


class ServiceError(FedmdhError):
    """A service did not start or died: the message names it and points at its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bind_error(port: int, host: str) -> OSError | None:
    """Why ``host:port`` cannot be listened on now (``None``: it can); a closed connection's TIME_WAIT
    does not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc
    return None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` now (a bind test)."""
    return _bind_error(port, host) is None


def check_port_free(port: int, host: str = "127.0.0.1", flag: str = "--port") -> None:
    """Refuse (one line) a port that another process already listens on, or that cannot be bound."""
    if not 0 < port < 65536:
        raise InputError(f"{flag} {port}: give a port between 1 and 65535.")
    exc = _bind_error(port, host)
    if exc is None:
        return
    if exc.errno == errno.EADDRINUSE:
        raise InputError(f"{flag} {port}: {host}:{port} is taken (another process listens there); give a free "
                         f"{flag}, or stop what holds it.")
    raise InputError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); give another {flag}.")


def _listening_inodes(port: int) -> set[str] | None:
    """The socket inodes that listen on TCP ``port`` (any address), from ``/proc/net/tcp*``; ``None``
    when that cannot be read (not Linux)."""
    found: set[str] | None = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = found if found is not None else set()
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(f[9])
    return found


def listens(pid: int, port: int, host: str = "127.0.0.1") -> bool:
    """Whether process ``pid`` itself listens on ``port`` (not merely something else there); where
    ``/proc`` cannot tell, whether anything answers on ``host:port``."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return port_open(port, host)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


@dataclass
class Service:
    """One started process: its name, its ``Popen`` and the file its output goes to."""

    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL after ``timeout``; waits for the process."""
        if self.proc.poll() is not None:
            _killpg(self.pid, signal.SIGKILL)  # its children may outlive it
            return
        _killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        _killpg(self.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL to the process group at once (fault injection: a crash, not a shutdown)."""
        _killpg(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Services:
    """Starts processes and stops every one of them (reverse order) when the ``with`` block ends."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.started: list[Service] = []

    def __enter__(self) -> "Services":
        self._old = signal.getsignal(signal.SIGTERM)
        if _main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        if _main_thread():
            signal.signal(signal.SIGTERM, self._old)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None, die_with_parent: bool = False) -> Service:
        """Start ``argv`` in a process group of its own, output to ``LOG_DIR/NAME.log``.

        ``die_with_parent``: the kernel kills it when this process dies, even by SIGKILL (Linux).
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        fh = log.open("ab")
        try:
            proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                    preexec_fn=_die_with_parent if die_with_parent else None)
        except OSError as exc:
            raise ServiceError(f"cannot start {name} ({argv[0]}): {exc}") from None
        finally:
            fh.close()
        svc = Service(name, proc, log)
        self.started.append(svc)
        return svc

    def stop(self, svc: Service) -> None:
        svc.stop()
        if svc in self.started:
            self.started.remove(svc)

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):  # noqa: ANN001 - a signal handler
    raise KeyboardInterrupt(f"signal {signum}")


def wait_until(ready: Callable[[], bool], svc: Service | None, what: str, timeout: float = 60.0) -> None:
    """Poll ``ready()`` until true; fail naming ``what`` (and the service's last log lines) if it dies or times out."""
    t_end = time.monotonic() + timeout
    while not ready():
        if svc is not None and not svc.alive():
            raise ServiceError(f"{what}: {svc.name} exited with status {svc.proc.returncode} "
                               f"(log {svc.log}: {svc.tail()})")
        if time.monotonic() > t_end:
            tail = f" (log {svc.log}: {svc.tail()})" if svc is not None else ""
            raise ServiceError(f"{what}: not ready after {timeout:.0f} s{tail}")
        time.sleep(0.1)


def anvil_binary(root: str | Path | None = None) -> str:
    """The anvil binary: ``$FEDMDH_ANVIL``, ``anvil`` on PATH, or the project-local npm install."""
    env = os.environ.get("FEDMDH_ANVIL")
    if env and Path(env).is_file():
        return env
    on_path = shutil.which("anvil")
    if on_path:
        return on_path
    roots = [Path(root)] if root else []
    roots += [Path.cwd(), Path(__file__).resolve().parents[3]]
    for r in roots:
        hits = sorted(glob.glob(str(r / ".tools" / "node_modules" / "@foundry-rs" / "anvil-*" / "bin" / "anvil")))
        if hits:
            return hits[0]
    raise InputError(f"anvil (a local Ethereum node) not found: set FEDMDH_ANVIL, put anvil on PATH, or run "
                     f"`npm install --prefix .tools @foundry-rs/anvil@{ANVIL_VERSION}`.")


def start_anvil(services: Services, port: int | None = None, state_file: str | Path | None = None) -> tuple[Service, str]:
    """Anvil on 127.0.0.1 (``--state FILE`` keeps the chain across restarts); returns it and its URL."""
    if port:
        check_port_free(port)
    else:
        port = free_port()
    argv = [anvil_binary(), "--host", "127.0.0.1", "--port", str(port), "--silent"]
    if state_file is not None:
        argv += ["--state", str(state_file)]
    svc = services.start("anvil", argv)
    # the chain started here must be the one that answers (not another process on the port)
    wait_until(lambda: listens(svc.pid, port), svc, "the chain (anvil)", timeout=30)
    return svc, f"http://127.0.0.1:{port}"
