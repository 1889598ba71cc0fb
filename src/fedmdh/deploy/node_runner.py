"""``fedmdh node start``: an institution's node service and its Flower SuperNode, on its own machine.

The service (:class:`~fedmdh.runtime.node.NodeService`) listens on a Unix socket in the node's
state folder (mode 0600, HMAC-authenticated with a fresh key in ``node.authkey``, 0600); the
SuperNode runs as a child process in its own process group and is stopped with the service. When
everything listens, ``ready.json`` appears in the state folder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from multiprocessing.connection import Listener
from pathlib import Path

from fedmdh.deploy.flower import flower_env, supernode_argv
from fedmdh.deploy.processes import ServiceError, Services, free_port
from fedmdh.runtime.files import atomic_write_bytes
from fedmdh.runtime.flower.client_app import AUTHKEY, SOCKET
from fedmdh.runtime.flower.wire import pack, unpack
from fedmdh.runtime.node import NodeService

READY = "ready.json"
#: flower-supernode's exit code (in its log; its process status may be 1) when the SuperLink does not accept its key
REFUSED = 305
log = logging.getLogger("fedmdh.node")


def _serve(listener: Listener, service: NodeService, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn = listener.accept()
        except OSError:
            if stop.is_set():
                return
            continue
        except Exception as exc:  # noqa: BLE001 - a client that fails the challenge: refuse it, go on
            log.warning("refused a connection to the node service: %s", exc)
            continue
        with conn:
            try:
                meta, arrays = unpack(conn.recv_bytes())
                conn.send_bytes(pack(*service.handle(meta, arrays)))
            except (EOFError, OSError, ValueError) as exc:
                log.warning("a message was lost in transit (%s)", exc)


def run_node(service: NodeService, superlink: str, root_certificates: str | Path, key: str | Path,
             port: int | None = None, stop: threading.Event | None = None) -> None:
    """Serve until the SuperNode exits, ``stop`` is set, or Ctrl-C / SIGTERM."""
    state = service.state_dir
    for p, what in ((Path(root_certificates), "--root-certificates"), (Path(key), "--key")):
        if not p.is_file():
            raise ServiceError(f"{what} {p}: file not found.")
    sock = state / SOCKET
    if len(str(sock)) > 100:
        raise ServiceError(f"the state folder's path is too long for a Unix socket ({sock}); use a shorter --state.")
    sock.unlink(missing_ok=True)
    (state / READY).unlink(missing_ok=True)
    authkey = secrets.token_bytes(32)
    atomic_write_bytes(state / AUTHKEY, authkey, mode=0o600)
    old_umask = os.umask(0o177)
    try:
        listener = Listener(str(sock), family="AF_UNIX", authkey=authkey)
    finally:
        os.umask(old_umask)
    stop = stop or threading.Event()
    thread = threading.Thread(target=_serve, args=(listener, service, stop), name="fedmdh-node", daemon=True)
    thread.start()
    try:
        with Services(state / "logs") as services:
            argv = supernode_argv(superlink, root_certificates, key, state, port or free_port())
            node = services.start("supernode", argv, env=flower_env(state / "flwr"))
            atomic_write_bytes(state / READY, json.dumps(
                {"pid": os.getpid(), "supernode_pid": node.pid, "institution": service.name,
                 "address": service.address}).encode())
            while not stop.wait(0.5):
                if not node.alive():
                    log_text = node.log.read_text(encoding="utf-8", errors="replace")
                    refused = node.proc.returncode == REFUSED or f"Exit Code: {REFUSED}" in log_text
                    hint = (": the SuperLink refused its key (register the node's public key with the "
                            "coordinator)" if refused else "")
                    raise ServiceError(f"the SuperNode of {service.name} exited with status {node.proc.returncode}"
                                       f"{hint} (log {node.log}: {node.tail(3)})")
    finally:
        stop.set()
        listener.close()
        sock.unlink(missing_ok=True)
        (state / READY).unlink(missing_ok=True)
