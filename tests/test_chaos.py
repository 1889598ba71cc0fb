"""Chaos on a real local deployment (anvil, a TLS SuperLink with SuperNode authentication, one
``fedmdh node start`` process per institution of the perovskite split): nodes killed with SIGKILL
(their whole process group) at random moments of one task, never more than one down at once, each
started again a few seconds later, and one killed near the end that stays down until the task is
over. The task must finish every time with its quorum, ``ledger verify`` must say OK, and the last
killed node, started again, must catch up (its model in the archive, or added to it late).

The randomness is seeded: the seed is printed (``FEDMDH_CHAOS_SEED=N`` reruns one schedule; without
it a fresh seed is drawn). Nothing is left running (the deployment fixture checks).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from fedmdh.config import ExperimentConfig
from fedmdh.runtime.coordinator import DeployTask, experiment_settings

from test_deploy import NAMES, local_deployment

ROUNDS = 8
TIMEOUT_S = 5.0  # the round timeout: a round waits this long for a killed node
KILLS = 2  # nodes killed mid-task and started again a few seconds later


@pytest.fixture(scope="module")
def deployment(perovskite, tmp_path_factory):
    yield from local_deployment(perovskite, tmp_path_factory.mktemp("chaos"))


class Chaos(threading.Thread):
    """Kills (SIGKILL, the node's process group) a random node at a random moment after the task's
    round 2 began, KILLS times, each started again after 2-5 s (the next kill waits until it is back
    and two more rounds began); then, once round ROUNDS began, kills one more that stays down
    (``last``). One node down at a time."""

    def __init__(self, dep, rng: random.Random, out: Path) -> None:
        super().__init__(daemon=True, name="chaos")
        self.dep, self.rng, self.out = dep, rng, out
        self.round = 0
        self.done = threading.Event()
        self.log: list[str] = []
        self.last: str | None = None
        self.killed: list[str] = []
        self.errors: list[str] = []

    def on_event(self, event: dict) -> None:
        if event.get("event") == "round_start":
            self.round = max(self.round, int(event["round"]))
        if event.get("event") in ("finished", "failed"):
            self.done.set()

    def _wait_round(self, rnd: int) -> bool:
        while self.round < rnd:
            if self.done.wait(0.1):
                return False
        return True

    def _kill(self) -> str:
        name = self.rng.choice(NAMES)
        self.dep.stop_node(name, kill=True)
        self.killed.append(name)
        self.log.append(f"{time.strftime('%H:%M:%S')} killed {name} (-9) in round {self.round}")
        return name

    def _start(self, name: str) -> None:
        """Start its node again and wait until the SuperLink has taken it back (Flower lets a node it still
        holds online back only once two heartbeats went missing), so that one node is down at a time."""
        log = self.dep.node_state(name) / "logs" / "supernode.log"
        offset = log.stat().st_size if log.is_file() else 0
        self.dep.start_node(name)
        self.log.append(f"{time.strftime('%H:%M:%S')} started {name} again")
        t_end = time.monotonic() + 240
        while time.monotonic() < t_end and not self.done.is_set():
            with log.open("rb") as fh:
                fh.seek(offset)
                if b"SuperNode ID:" in fh.read():
                    self.log.append(f"{time.strftime('%H:%M:%S')} {name} is back at the SuperLink")
                    break
            time.sleep(0.5)
        # two more rounds: one brings it the last finalized aggregate to catch up from, one it takes part in
        self._wait_round(self.round + 2)

    def run(self) -> None:
        try:
            for k in range(KILLS):
                if not self._wait_round(self.round + 1 if k else 2):
                    return
                time.sleep(self.rng.uniform(0.0, 6.0))
                name = self._kill()
                time.sleep(self.rng.uniform(2.0, 5.0))
                self._start(name)
            if not self._wait_round(ROUNDS):
                return
            time.sleep(self.rng.uniform(0.0, 4.0))
            if not self.done.is_set():
                self.last = self._kill()
        except Exception as exc:  # noqa: BLE001 - the test reports it
            self.errors.append(f"{type(exc).__name__}: {exc}")


def test_nodes_killed_at_random_moments_the_task_finishes_with_a_quorum_verifies_and_the_killed_catch_up(
        deployment, perovskite, tmp_path):
    from fedmdh.deploy.local import run_task
    from fedmdh.audit import show, verify
    from fedmdh.ledger.blobs import DirBlobStore
    from fedmdh.ledger.chain import Chain

    # Prepare
    seed = int(os.environ.get("FEDMDH_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"chaos seed {seed} (FEDMDH_CHAOS_SEED={seed} reruns this schedule)")
    for name in NAMES:
        if name not in deployment.nodes:
            deployment.start_node(name)
    cfg = ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=("fedavg",),
                           seeds=1, rounds=ROUNDS)
    out = tmp_path / "run"
    task = DeployTask("chaos6", experiment_settings(cfg), 3, deployment.chain_url, str(out),
                      keystore=str(deployment.folder / "deploy" / "keystore"), wait_s=120.0, round_timeout=TIMEOUT_S)
    chaos = Chaos(deployment, random.Random(seed), out)
    chaos.start()
    # Execute
    try:
        last = run_task(deployment, task.to_json(), on_event=chaos.on_event)
    except Exception:
        for name in NAMES:  # what each node did, for the report
            log = deployment.folder / "deploy" / "logs" / f"node-{name}.log"
            print(f"--- {name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        raise
    finally:
        chaos.done.set()
        chaos.join(timeout=180)
        print("\n".join(chaos.log))
    assert not chaos.errors, chaos.errors
    # Assert: finished, every round with a quorum, verified
    assert last["event"] == "finished"
    rounds = show(out)["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(len(r["commitments"]) >= 2 and r["finalized"] for r in rounds), rounds
    report = verify(out)
    assert report.ok and report.complete, str(report)
    # every killed node is started again and catches up: its model is archived, or added late
    for name in NAMES:
        if name not in deployment.nodes:
            deployment.start_node(name)
    doc = json.loads((out / "ledger" / "task.json").read_text())
    c = Chain.rpc(deployment.chain_url).contract(doc["contract"]).functions
    manifest = json.loads(DirBlobStore(out / "ledger" / "blobs").get(bytes(c.archived_hash().call()).hex()))
    missing = manifest.get("missing", [])
    print(f"missing from the archive: {missing or 'none'}")
    if missing:
        assert set(missing) <= set(chaos.killed), (missing, chaos.killed)  # only a killed node may miss the end
        run_task(deployment, {**task.to_json(), "resume": True})
        for name in missing:
            assert bytes(c.late_model(doc["participants"][name]).call()) != bytes(32), name
        report = verify(out)
        assert report.ok and report.complete, str(report)
        assert any(f"added its model after it: {', '.join(missing)}" in n for n in report.notes), report.notes
    archived = {Path(rel).parts[1] for rel in manifest["files"]}
    assert archived | set(missing) == set(NAMES)
    for name in NAMES:  # every institution holds a model, checked against the chain by verify
        assert (deployment.node_state(name) / "tasks" / "chaos6" / "models" / name / "model.json").is_file()
