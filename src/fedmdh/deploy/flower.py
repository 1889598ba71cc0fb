"""Flower 1.42's executables as a deployment uses them: SuperLink, SuperNode, registration, runs.

Every command runs with ``FLWR_HOME`` in a folder of the deployment (Flower keeps its
connections and apps there), telemetry and update checks off, and the Python environment's
``bin`` first on ``PATH`` (the SuperLink starts ``flower-superexec`` by name).

- :func:`superlink_argv`: TLS on, SuperNode authentication on, runtime dependency installation
  off (the app's code is the installed fedmdh), a ``--database`` file so a restarted SuperLink keeps
  its registrations;
- :func:`supernode_argv`: TLS with the consortium's CA, the node's authentication key, and the
  node config that tells fedmdh's ClientApp where the node service's state folder is;
- :func:`register_node`: ``flwr supernode register KEY.pub CONNECTION --name NAME``;
- :func:`submit`: ``flwr run APP CONNECTION --run-config task="..." --stream``, yielding the
  ServerApp's progress events.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fedmdh.errors import FedmdhError, InputError

CONNECTION = "fedmdh"
EVENT = "fedmdh-event "


class FlowerError(FedmdhError):
    """A Flower command failed: the message says which and shows its output's last lines."""


def bin_dir() -> Path:
    return Path(sys.executable).parent


def executable(name: str) -> str:
    cand = bin_dir() / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise InputError(f"{name} not found; install fedmdh's dependencies (flwr 1.42) in this environment.")
    return found


def flower_env(flwr_home: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process of a deployment (``base``: default this process's)."""
    env = dict(os.environ if base is None else base)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    return env


def write_connection(flwr_home: str | Path, address: str, root_certificates: str | Path) -> None:
    """``FLWR_HOME/config.toml`` with one TLS connection to the SuperLink, the default."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    ca = Path(root_certificates).resolve()
    if not ca.is_file():
        raise InputError(f"--root-certificates {root_certificates}: file not found (the consortium's ca.crt).")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n', encoding="utf-8")


def superlink_argv(certs: Any, port: int, database: str | Path, host: str = "127.0.0.1") -> list[str]:
    return [executable("flower-superlink"), "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile",
            str(certs.server_cert), "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port),
            "--database", str(database)]


def supernode_argv(superlink: str, root_certificates: str | Path, key: str | Path, state_dir: str | Path,
                   port: int) -> list[str]:
    config = f'fedmdh-state="{Path(state_dir).resolve()}"'
    return [executable("flower-supernode"), "--superlink", superlink, "--root-certificates",
            str(root_certificates), "--auth-supernode-private-key", str(key), "--node-config", config,
            "--port", str(port), "--max-wait-time", "3600"]


def _flwr(args: list[str], flwr_home: str | Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    proc = subprocess.run([executable("flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return proc


def register_node(flwr_home: str | Path, public_key: str | Path, name: str) -> int:
    """Register a SuperNode's public key with the SuperLink; returns its node id."""
    proc = _flwr(["supernode", "register", str(public_key), CONNECTION, "--name", name, "--format", "json"], flwr_home)
    try:
        out = json.loads(proc.stdout[proc.stdout.index("{"):])
    except (ValueError, json.JSONDecodeError):
        out = {}
    if proc.returncode != 0 or not out.get("success"):
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise FlowerError(f"registering {name}'s key {public_key} failed: {tail}")
    return int(out["node-id"])


def app_dir(into: str | Path) -> Path:
    """A copy of fedmdh's Flower App (its pyproject.toml) in ``into`` (flwr may rewrite the file)."""
    src = resources.files("fedmdh.runtime.flower") / "app" / "pyproject.toml"
    dest = Path(into) / "fedmdh-task"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_bytes(src.read_bytes())
    return dest


def submit(flwr_home: str | Path, task_json: Mapping[str, Any], on_line: Callable[[str], None] | None = None
           ) -> Iterator[dict[str, Any]]:
    """Start the task on the SuperLink and yield the ServerApp's events until the run ends."""
    encoded = base64.b64encode(json.dumps(dict(task_json), sort_keys=True).encode()).decode()
    with tempfile.TemporaryDirectory(prefix="fedmdh-app-") as tmp:
        yield from submit_app(flwr_home, app_dir(tmp), {"task": encoded}, on_line)


def submit_app(flwr_home: str | Path, app: str | Path, run_config: Mapping[str, str],
               on_line: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """``flwr run APP CONNECTION --run-config ... --stream``: yields the ``fedmdh-event`` lines of its log."""
    config = " ".join(f'{k}="{v}"' for k, v in run_config.items())
    argv = [executable("flwr"), "run", str(app), CONNECTION, "--run-config", config, "--stream"]
    proc = subprocess.Popen(argv, env=flower_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if on_line is not None:
                on_line(line)
            at = line.find(EVENT)
            if at >= 0:
                try:
                    yield json.loads(line[at + len(EVENT):])
                except json.JSONDecodeError:
                    pass
                continue
            tail = (tail + [line])[-8:]
        code = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=10)
    if code != 0:
        raise FlowerError(f"flwr run exited with status {code}: {' | '.join(t for t in tail if t.strip())}")
