"""``fedmdh deploy local``: the whole deployment on one machine, as real processes on 127.0.0.1.

It starts, each as a process of its own:

1. a chain (anvil, keeping its state in ``DIR/deploy/chain-state.json``);
2. a SuperLink with TLS (a fresh consortium CA and server certificate for 127.0.0.1), SuperNode
   authentication and runtime dependency installation off;
3. one ``fedmdh node start`` per institution (its node service and its SuperNode), each with its
   own key pair (registered with the SuperLink), its own ledger key and its own state folder
   ``DIR/nodes/<institution>/``;

then submits the task as ``fedmdh deploy run`` does, writes the run record into ``DIR``, and stops
every process it started, by PID, also on Ctrl-C or error. Fault injection for rehearsals
(``faults``) uses the same supervisor.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmdh.deploy.certs import make_certs
from fedmdh.deploy.flower import flower_env, register_node, submit, superlink_argv, write_connection
from fedmdh.deploy.node_runner import READY
from fedmdh.deploy.processes import Service, ServiceError, Services, free_port, port_open, start_anvil, wait_until
from fedmdh.errors import InputError

#: the key derivation of the trial's throwaway keystores (fast; a real node uses scrypt)
TRIAL_KDF = {"FEDMDH_KEY_KDF": "pbkdf2", "FEDMDH_KEY_KDF_ITERATIONS": "20000"}


@dataclass
class Deployment:
    """The running processes of a one-machine deployment and where they keep things."""

    folder: Path
    services: Services
    chain_url: str
    superlink: str
    flwr_home: Path
    certs: Any
    env: dict[str, str]
    nodes: dict[str, Service] = field(default_factory=dict)
    node_args: dict[str, list[str]] = field(default_factory=dict)
    link: Service | None = None
    chain: Service | None = None

    def node_state(self, name: str) -> Path:
        return self.folder / "nodes" / name

    def start_node(self, name: str) -> Service:
        state = self.node_state(name)
        (state / READY).unlink(missing_ok=True)
        svc = self.services.start(f"node-{name}", self.node_args[name], env=self.env)
        self.nodes[name] = svc
        wait_until(lambda: (state / READY).exists(), svc, f"the node of {name}", timeout=120)
        return svc

    def stop_node(self, name: str, kill: bool = False) -> None:
        svc = self.nodes.pop(name)
        (svc.kill if kill else svc.stop)()
        if svc in self.services.started:
            self.services.started.remove(svc)


def _node_argv(name: str, data: Path, test: Path | None, target: str, exclude: Sequence[str], superlink: str,
               certs: Any, state: Path, chain_url: str) -> list[str]:
    argv = [sys.executable, "-m", "fedmdh.cli", "node", "start", "--name", name, "--data", str(data), "--target",
            target, "--superlink", superlink, "--root-certificates", str(certs.ca), "--key",
            str(certs.node_key(name)), "--state", str(state), "--chain-rpc", chain_url]
    if test is not None:
        argv += ["--test", str(test)]
    for col in exclude:
        argv += ["--exclude", col]
    return argv


def start_local(folder: str | Path, institutions: Mapping[str, Path], target: str, test: Path | None,
                services: Services, exclude: Sequence[str] = (), say: Callable[[str], None] = lambda s: None
                ) -> Deployment:
    """Start chain, SuperLink and one node per institution (names -> CSV files) under ``folder``."""
    folder = Path(folder)
    deploy = folder / "deploy"
    env = dict(os.environ)
    env.setdefault("FEDMDH_KEY_PASSPHRASE", secrets.token_hex(16))  # throwaway keys of a trial
    for k, v in TRIAL_KDF.items():
        env.setdefault(k, v)
    certs = make_certs(deploy / "certs", hosts=("127.0.0.1", "localhost"), nodes=list(institutions))
    chain, chain_url = start_anvil(services, state_file=deploy / "chain-state.json")
    say(f"chain (anvil) at {chain_url}, pid {chain.pid}")
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    flwr_home = deploy / "flwr"
    write_connection(flwr_home, superlink, certs.ca)
    link_env = flower_env(flwr_home, env)
    link = services.start("superlink", superlink_argv(certs, port, deploy / "superlink.db"), env=link_env)
    wait_until(lambda: port_open(port), link, "the SuperLink", timeout=60)
    say(f"SuperLink at {superlink} (TLS, SuperNode authentication), pid {link.pid}")
    dep = Deployment(folder, services, chain_url, superlink, flwr_home, certs, env, link=link, chain=chain)
    for name in institutions:
        node_id = register_node(flwr_home, certs.node_pub(name), name)
        say(f"registered {name}'s key (node id {node_id})")
    for name, path in institutions.items():
        dep.node_args[name] = _node_argv(name, Path(path), test, target, exclude, superlink, certs,
                                         dep.node_state(name), chain_url)
    for name in institutions:
        svc = dep.start_node(name)
        say(f"node {name} running, pid {svc.pid}")
    return dep


def run_task(dep: Deployment, task_json: Mapping[str, Any], on_event: Callable[[dict[str, Any]], None] | None = None,
             on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Submit a task to the deployment's SuperLink and follow it to its end; returns the final event.

    Raises :class:`~fedmdh.errors.InputError` with the coordinator's message when the task fails.
    """
    last: dict[str, Any] = {}
    tail: list[str] = []

    def keep(line: str) -> None:
        if line.strip() and "fedmdh-event" not in line:
            tail[:] = (tail + [line.strip()])[-6:]
        if on_line is not None:
            on_line(line)

    for event in submit(dep.flwr_home, task_json, on_line=keep):
        last = event
        if on_event is not None:
            on_event(event)
        if event.get("event") == "failed":
            raise InputError(f"the task failed: {event.get('message')}")
    if last.get("event") != "finished":
        raise ServiceError("the task ended without finishing (the ServerApp's last lines: "
                           f"{' | '.join(tail)}); see the SuperLink's log {dep.services.log_dir / 'superlink.log'}")
    return last


def wait_for_file(path: Path, timeout: float = 60.0) -> dict[str, Any]:
    t_end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > t_end:
            raise ServiceError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.1)
    return json.loads(path.read_text(encoding="utf-8"))
