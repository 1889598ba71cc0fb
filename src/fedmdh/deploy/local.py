"""``fedmdh deploy local``: the whole deployment on one machine, as real processes on 127.0.0.1.

It starts, each as a process of its own:

1. a chain (anvil, keeping its state in ``DIR/deploy/chain-state.json``);
2. a SuperLink with TLS (a fresh consortium CA and server certificate for 127.0.0.1), SuperNode
   authentication and runtime dependency installation off;
3. one ``fedmdh node start`` per institution (its node service and its SuperNode), each with its
   own key pair (registered with the SuperLink), its own ledger key and its own state folder
   ``DIR/nodes/<institution>/``;

then submits the task as ``fedmdh deploy run`` does, writes the run record into ``DIR``, and stops
every process it started, by PID, also on Ctrl-C or error (and, when the command itself is killed,
its watchdog does: :mod:`fedmdh.deploy.watchdog`). Fault injection for rehearsals
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
from fedmdh.deploy.processes import Service, ServiceError, Services, free_port, listens, start_anvil, wait_until
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
    link_port: int = 0
    chain_port: int = 0
    link_db: Path | None = None
    links_started: int = 0

    def start_link(self) -> Service:
        """A SuperLink on the deployment's port with a database of its own (a new one at every start),
        with every institution's node key registered."""
        self.links_started += 1
        self.link_db = self.folder / "deploy" / f"superlink-{self.links_started}.db"
        env = flower_env(self.flwr_home, self.env)
        svc = self.services.start(f"superlink-{self.links_started}", superlink_argv(
            self.certs, self.link_port, self.link_db), env=env)
        wait_until(lambda: listens(svc.pid, self.link_port), svc, "the SuperLink", timeout=60)
        for name in self.node_args:
            register_node(self.flwr_home, self.certs.node_pub(name), name)
        self.link = svc
        return svc

    def kill_coordinator(self) -> None:
        """Kill -9 the SuperLink and every ServerApp process it started (a coordinator machine lost)."""
        if self.link is not None:
            self.link.kill()
            if self.link in self.services.started:
                self.services.started.remove(self.link)
            self.link = None
        for pid in _processes_with_env("FLWR_HOME", str(self.flwr_home)):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def restart_chain(self) -> Service:
        """Stop the chain node (it writes its state file) and start it again on the same port from it."""
        assert self.chain is not None
        self.services.stop(self.chain)
        self.chain, _ = start_anvil(self.services, port=self.chain_port,
                                    state_file=self.folder / "deploy" / "chain-state.json")
        return self.chain

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
    dep = Deployment(folder, services, chain_url, superlink, flwr_home, certs, env, chain=chain, link_port=port,
                     chain_port=int(chain_url.rsplit(":", 1)[1]))
    for name, path in institutions.items():
        dep.node_args[name] = _node_argv(name, Path(path), test, target, exclude, superlink, certs,
                                         dep.node_state(name), chain_url)
    link = dep.start_link()
    say(f"SuperLink at {superlink} (TLS, SuperNode authentication, every node's key registered), pid {link.pid}")
    for name in institutions:
        svc = dep.start_node(name)
        say(f"node {name} running, pid {svc.pid}")
    return dep


@dataclass(frozen=True)
class Fault:
    """A rehearsed failure: ``kind`` (``coordinator``, ``node``, ``chain``), the institution of a node
    fault, the round before whose messages it strikes, and for a node the round before which it
    comes back (``None``: it stays down)."""

    kind: str
    at: int
    name: str | None = None
    until: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Fault":
        """``coordinator@R``, ``chain@R``, ``node:NAME@R1-R2`` or ``node:NAME@R1`` (stays down)."""
        import re

        m = re.fullmatch(r"(coordinator|chain)@(\d+)|node:([A-Za-z0-9][A-Za-z0-9_.-]*)@(\d+)(?:-(\d+))?", text.strip())
        if not m:
            raise InputError(f"--fault {text!r}: give coordinator@R, chain@R, node:NAME@R1-R2 or node:NAME@R1 "
                             "(R: the round before whose messages the fault strikes).")
        if m.group(1):
            return cls(m.group(1), int(m.group(2)))
        until = int(m.group(5)) if m.group(5) else None
        if until is not None and until <= int(m.group(4)):
            raise InputError(f"--fault {text!r}: a node comes back after it went down (R2 > R1).")
        return cls("node", int(m.group(4)), m.group(3), until)

    def rounds(self) -> list[int]:
        return [self.at] + ([self.until] if self.until is not None else [])


#: seconds the coordinator pauses before a round where a rehearsed fault strikes
FAULT_PAUSE_S = 3.0


def with_faults(task_json: Mapping[str, Any], faults: Sequence[Fault]) -> dict[str, Any]:
    """The task with a pause before every round where a fault strikes (or a node comes back)."""
    pauses = {str(r): FAULT_PAUSE_S for f in faults for r in f.rounds()}
    return {**dict(task_json), "pause_before": {**dict(task_json.get("pause_before") or {}), **pauses}}


def _processes_with_env(key: str, value: str) -> list[int]:
    want = f"{key}={value}".encode()
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if want in (d / "environ").read_bytes().split(b"\0") and int(d.name) != os.getpid():
                out.append(int(d.name))
        except OSError:
            continue
    return out


def run_task(dep: Deployment, task_json: Mapping[str, Any], on_event: Callable[[dict[str, Any]], None] | None = None,
             on_line: Callable[[str], None] | None = None, faults: Sequence[Fault] = (),
             say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Submit a task to the deployment's SuperLink and follow it to its end; returns the final event.

    ``faults`` are rehearsed as the task runs (the coordinator pauses before their rounds): a node
    is killed (-9) and started again later, the coordinator (the SuperLink and its ServerApp) is
    killed and replaced by a new SuperLink with a new database and a new ServerApp that resumes the
    task, or the chain node is stopped and started again from its state file.

    Raises :class:`~fedmdh.errors.InputError` with the coordinator's message when the task fails.
    """
    task_json = with_faults(task_json, faults) if faults else dict(task_json)
    pending = sorted(faults, key=lambda f: f.at)
    while True:
        killed = {"coordinator": False}

        def strike(event: dict[str, Any]) -> None:
            if on_event is not None:
                on_event(event)
            if event.get("event") != "pause":
                return
            rnd = int(event["round"])
            for f in list(pending):
                if f.kind == "node" and f.at == rnd and f.name in dep.nodes:
                    dep.stop_node(f.name, kill=True)
                    say(f"fault: killed the node of {f.name} (-9) before round {rnd}")
                    if f.until is None:
                        pending.remove(f)
                elif f.kind == "node" and f.until == rnd and f.name not in dep.nodes:
                    dep.start_node(f.name)
                    say(f"fault: the node of {f.name} is back before round {rnd}")
                    pending.remove(f)
                elif f.kind == "chain" and f.at == rnd:
                    dep.restart_chain()
                    say(f"fault: the chain node restarted from its state file before round {rnd}")
                    pending.remove(f)
            if any(f.kind == "coordinator" and f.at == rnd for f in pending):
                pending[:] = [f for f in pending if not (f.kind == "coordinator" and f.at == rnd)]
                killed["coordinator"] = True
                dep.kill_coordinator()
                say(f"fault: killed the coordinator (SuperLink and ServerApp, -9) before round {rnd}")

        try:
            return _follow(dep, task_json, strike, on_line)
        except Exception:
            if not killed["coordinator"]:
                raise
        dep.start_link()
        say(f"a new coordinator: SuperLink pid {dep.link.pid} with a new database {dep.link_db.name}; resuming")
        task_json = {**task_json, "resume": True}


def _follow(dep: Deployment, task_json: Mapping[str, Any], on_event: Callable[[dict[str, Any]], None],
            on_line: Callable[[str], None] | None) -> dict[str, Any]:
    last: dict[str, Any] = {}
    tail: list[str] = []

    def keep(line: str) -> None:
        if line.strip() and "fedmdh-event" not in line:
            tail[:] = (tail + [line.strip()])[-6:]
        if on_line is not None:
            on_line(line)

    for event in submit(dep.flwr_home, task_json, on_line=keep):
        last = event
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
