"""``fedmdh node start``: an institution's node service and its Flower SuperNode, on its own machine.

The service (:class:`~fedmdh.runtime.node.NodeService`) listens on a Unix socket in the node's
state folder (mode 0600, HMAC-authenticated with a fresh key in ``node.authkey``, 0600); the
SuperNode runs as a child process in its own process group and is stopped with the service (the
kernel kills it if the service dies). A SuperNode that loses its SuperLink after it was accepted is
started again, so a node reconnects to a restarted or replaced coordinator on the same address.
When everything listens, ``ready.json`` appears in the state folder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

from fedmdh.deploy.flower import flower_env, supernode_argv
from fedmdh.deploy.processes import ServiceError, Services, free_port
from fedmdh.files import atomic_write_bytes
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


#: what flower-supernode logs once the SuperLink has accepted it
ACCEPTED = "SuperNode ID:"
#: seconds before a SuperNode that lost its SuperLink is started again (doubling while it is refused)
RESTART_S = 2.0
MAX_RESTART_S = 30.0
#: what flower-supernode logs when the SuperLink refuses to activate a node it still holds online, and how
#: long a node started again waits for that session to lapse (Flower: two 30 s heartbeat intervals)
BUSY = "Failed to activate SuperNode"
BUSY_WAIT_S = 150.0
#: written in the state folder once the SuperLink accepted this node: Flower says BUSY for a key it never
#: registered too, so only a node accepted before (started again after it died) waits for its old session
ACCEPTED_BEFORE = "accepted.json"


def _start_supernode(services: Services, service: NodeService, superlink: str, root_certificates: str | Path,
                     key: str | Path, port: int | None):
    state = service.state_dir
    log_file = state / "logs" / "supernode.log"
    start = log_file.stat().st_size if log_file.is_file() else 0
    argv = supernode_argv(superlink, root_certificates, key, state, port or free_port())
    # the SuperNode goes with this process, whatever ends it
    node = services.start("supernode", argv, env=flower_env(state / "flwr"), die_with_parent=True)
    atomic_write_bytes(state / READY, json.dumps(
        {"pid": os.getpid(), "supernode_pid": node.pid, "institution": service.name,
         "address": service.address}).encode())
    return node, start


def _log_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_node(service: NodeService, superlink: str, root_certificates: str | Path, key: str | Path,
             port: int | None = None, stop: threading.Event | None = None) -> None:
    """Serve until ``stop`` is set, Ctrl-C / SIGTERM, or the SuperNode exits before the SuperLink ever
    accepted it (a refused key, a wrong address). A SuperNode that had been accepted and exits (the
    SuperLink went away, or a new one does not know its node id) is started again."""
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
            accepted_once = False
            marker = state / ACCEPTED_BEFORE
            accepted_before = marker.is_file()
            delay = RESTART_S
            busy_until = time.monotonic() + BUSY_WAIT_S
            while not stop.is_set():
                node, start = _start_supernode(services, service, superlink, root_certificates, key, port)
                while not stop.wait(0.5) and node.alive():
                    if not accepted_before and ACCEPTED in _log_since(node.log, start):
                        atomic_write_bytes(marker, json.dumps({"superlink": superlink}).encode())
                        accepted_before = True
                if stop.is_set():
                    break
                text = _log_since(node.log, start)
                accepted = ACCEPTED in text
                accepted_once = accepted_once or accepted
                if accepted and not accepted_before:
                    atomic_write_bytes(marker, json.dumps({"superlink": superlink}).encode())
                    accepted_before = True
                if node in services.started:
                    services.started.remove(node)
                if not accepted_once and accepted_before and BUSY in text and time.monotonic() < busy_until:
                    # the SuperLink still holds this node's previous session (a node started again right
                    # after it died: Flower marks it offline only after two missed heartbeats): try again
                    log.warning("the SuperLink still holds the previous session of %s; trying again in %.0f s",
                                service.name, RESTART_S)
                    stop.wait(RESTART_S)
                    continue
                if not accepted_once:
                    refused = node.proc.returncode == REFUSED or f"Exit Code: {REFUSED}" in text
                    hint = (": the SuperLink refused its key (register the node's public key with the "
                            "coordinator)" if refused else "")
                    raise ServiceError(f"the SuperNode of {service.name} exited with status {node.proc.returncode}"
                                       f"{hint} (log {node.log}: {node.tail(3)})")
                # it had been accepted: the coordinator went away (or was replaced by one with a new
                # database, which does not know its node id yet); the node keeps its state and reconnects
                delay = RESTART_S if accepted else min(2 * delay, MAX_RESTART_S)
                log.warning("the SuperNode of %s lost the SuperLink (status %s); starting it again in %.0f s",
                            service.name, node.proc.returncode, delay)
                stop.wait(delay)
    finally:
        stop.set()
        listener.close()
        sock.unlink(missing_ok=True)
        (state / READY).unlink(missing_ok=True)
