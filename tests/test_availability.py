"""Availability of a deployed task when a node is lost at any moment: a round closes with its quorum
whenever the quorum committed, a task finishes with the quorum when a node is gone for good (the
archive names the missing institution on chain), and the missing institution adds its model when it
is back. A coordinator and three node services of the perovskite split on a real chain (anvil), the
messages through the wire's encoding (:class:`~fedmdh.runtime.coordinator.DirectTransport`).
The same with Flower's processes and SIGKILL at random moments: tests/test_chaos.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmdh.config import ExperimentConfig
from fedmdh.runtime.coordinator import (
    Coordinator,
    DeployTask,
    DirectTransport,
    experiment_settings,
)

NAMES = ["train_part0", "train_part1", "train_part2"]
LOST = "train_part1"
ROUNDS = 3
TIMEOUT_S = 3  # the round timeout (the contract's)
#: how long the transport takes to notice the lost node in round 2 (Flower: two missed heartbeats, ~60 s),
#: well past round 3's opening + timeout + 10 s
NOTICED_AFTER_S = 20.0
JANITOR_LAG_S = 2.0  # a janitor slow to sweep (a loaded machine)



#: throwaway keys for the in-process nodes (a known passphrase, a cheap key derivation)
TRIAL_KEYS = {"FEDMDH_KEY_PASSPHRASE": "trial", "FEDMDH_KEY_KDF": "pbkdf2", "FEDMDH_KEY_KDF_ITERATIONS": "2000"}


@contextlib.contextmanager
def _trial_keys() -> Iterator[pytest.MonkeyPatch]:
    """The trial keys' environment for the block (restored after, with anything else patched through it)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in TRIAL_KEYS.items():
            mp.setenv(k, v)
        yield mp


def _require() -> None:
    from fedmdh.deploy.processes import anvil_binary
    from fedmdh.errors import InputError

    try:
        anvil_binary()
    except InputError as exc:
        print(f"skipped: {exc}")
        pytest.skip(str(exc))


class LosingTransport(DirectTransport):
    """A node lost at round 2 for good: its round-2 message is answered (with an error) only
    ``NOTICED_AFTER_S`` later, as Flower answers one to a node that stopped sending heartbeats."""

    def exchange(self, requests, timeout, optional=frozenset()):
        if requests and any(m[0].get("cmd") == "round" and m[0].get("round") == 2 for m in requests.values()) \
                and LOST not in self.down:
            self.down.add(LOST)
            replies = super().exchange(requests, timeout, optional)
            time.sleep(NOTICED_AFTER_S)
            replies[LOST] = ({"error": f"node {LOST}: Node Unavailable (no heartbeat)"}, {})
            return replies
        return super().exchange(requests, timeout, optional)


class Run:
    def __init__(self, root: Path, url: str, nodes: dict, transport, task: DeployTask, final: dict | None,
                 stopped: str | None) -> None:
        self.root, self.url, self.nodes, self.transport, self.task = root, url, nodes, transport, task
        self.final, self.stopped = final, stopped

    @property
    def out(self) -> Path:
        return Path(self.task.out_dir)


@pytest.fixture(scope="module")
def lost(perovskite, tmp_path_factory):
    """A fedavg task of ROUNDS rounds whose node LOST is gone from round 2 on, with a slow janitor."""
    _require()
    from fedmdh.deploy.processes import Services, start_anvil
    from fedmdh.runtime import coordinator as co
    from fedmdh.runtime.node import NodeService

    root = tmp_path_factory.mktemp("availability")
    sweep = co.Janitor.sweep

    def slow_sweep(self):
        time.sleep(JANITOR_LAG_S)
        return sweep(self)

    cfg = ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=("fedavg",),
                           seeds=1, rounds=ROUNDS)
    with _trial_keys() as mp:
        mp.setattr(co.Janitor, "sweep", slow_sweep)
        with Services(root / "logs") as services:
            _, url = start_anvil(services)
            nodes = {n: NodeService(n, p, "e_form", root / n, test=perovskite["test"])
                     for n, p in zip(NAMES, perovskite["institutions"])}
            transport = LosingTransport(nodes)
            task = DeployTask("lost3", experiment_settings(cfg), 3, url, str(root / "out"),
                              keystore=str(root / "keystore"), wait_s=120, round_timeout=TIMEOUT_S)
            final, stopped = None, None
            try:
                final = Coordinator(task, transport).run()
            except co.TaskError as exc:
                stopped = str(exc)
            yield Run(root, url, nodes, transport, task, final, stopped)


def _contract(run: Run):
    from fedmdh.ledger.chain import Chain

    doc = json.loads((run.out / "ledger" / "task.json").read_text())
    return Chain.rpc(run.url).contract(doc["contract"]).functions, doc


def test_a_round_with_its_quorum_closes_though_the_step_before_waited_long_for_the_lost_node(lost):
    # Assert: round 3 (its commitments opened while round 2 still waited for the lost node) closed with
    # the two others instead of stopping with "2 of 3 committed ... the quorum is 2"
    assert lost.stopped is None or "the quorum is 2" not in lost.stopped, lost.stopped
    assert lost.stopped is None, lost.stopped
    from fedmdh.audit import show

    commits = {r["round"]: sorted(r["commitments"]) for r in show(lost.out)["rounds"]}
    others = [n for n in NAMES if n != LOST]
    assert commits == {1: NAMES, 2: others, 3: others}


def test_a_node_gone_for_good_the_task_finishes_with_the_quorum_and_the_archive_names_it_on_chain(lost):
    from fedmdh.audit import verify

    # Assert: finished, the lost institution named missing in the final metrics, the manifest and on chain
    assert lost.final is not None, lost.stopped
    assert lost.final["missing"] == [LOST] and sorted(lost.final["per_institution"]) == [n for n in NAMES if n != LOST]
    c, doc = _contract(lost)
    assert c.archive_missing(doc["participants"][LOST]).call()
    assert not any(c.archive_missing(doc["participants"][n]).call() for n in NAMES if n != LOST)
    from fedmdh.ledger.blobs import DirBlobStore

    manifest = json.loads(DirBlobStore(lost.out / "ledger" / "blobs").get(bytes(c.archived_hash().call()).hex()))
    assert manifest["missing"] == [LOST] and not any(f"/{LOST}/" in rel for rel in manifest["files"])
    report = verify(lost.out)
    assert report.ok and report.complete, str(report)
    assert any(f"the archive names missing (they did not attest it): {LOST}" in n for n in report.notes)


def test_the_missing_institution_back_adds_its_model_late_and_verify_checks_it(lost, perovskite):
    from fedmdh.audit import verify
    from fedmdh.runtime.node import NodeService

    # Prepare: the lost node starts again (a new service over its state folder)
    assert lost.final is not None, lost.stopped
    c, doc = _contract(lost)
    lost.transport.services[LOST] = NodeService(LOST, perovskite["institutions"][NAMES.index(LOST)], "e_form",
                                                lost.root / LOST, test=perovskite["test"])
    lost.transport.down.discard(LOST)
    # Execute: a coordinator resumes the ended task: the missing institution catches up and adds its model
    final = Coordinator(dataclasses.replace(lost.task, resume=True), lost.transport).run()
    # Assert: on chain, in the run record (transaction and manifest blob), and verify checks its files
    assert final["late"] == [LOST] and final["missing"] == []
    late = bytes(c.late_model(doc["participants"][LOST]).call()).hex()
    records = [json.loads(x) for x in (lost.out / "ledger" / "transactions.jsonl").read_text().splitlines()]
    assert [r["actor"] for r in records if r.get("fn") == "attest_late" and r.get("status") == 1] == [LOST]
    blob = lost.out / "ledger" / "blobs" / late[:2] / late
    body = json.loads((blob if blob.is_file() else next((lost.out / "ledger" / "blobs").rglob(late))).read_text())
    assert body["institution"] == LOST and body["files"] and all(r.startswith(f"models/{LOST}/") for r in body["files"])
    model_dir = lost.root / LOST / "tasks" / lost.task.task_id / "models" / LOST
    assert sorted(f"models/{LOST}/{p.name}" for p in model_dir.iterdir()) == sorted(body["files"])
    report = verify(lost.out)
    assert report.ok and report.complete, str(report)
    assert any(f"added its model after it: {LOST}" in n for n in report.notes), report.notes
    # a second resume has nothing left to add
    from fedmdh.runtime.coordinator import TaskError

    with pytest.raises(TaskError, match="every institution's model is archived"):
        Coordinator(dataclasses.replace(lost.task, resume=True), lost.transport).run()


def test_verify_fails_when_a_late_model_manifest_is_altered(lost, tmp_path):
    import shutil

    from fedmdh.audit import verify

    # Prepare: a copy of the run whose late model manifest blob is altered
    c, doc = _contract(lost)
    late = bytes(c.late_model(doc["participants"][LOST]).call()).hex()
    if late == "00" * 32:
        pytest.skip("the late model was not added (see the test before)")
    copy = tmp_path / "run"
    shutil.copytree(lost.out, copy)
    (blob,) = (copy / "ledger" / "blobs").rglob(late)
    blob.chmod(0o644)
    blob.write_text(blob.read_text().replace(LOST, "train_part0", 1))
    # Execute
    report = verify(copy)
    # Assert
    assert not report.ok and f"the model {LOST} added after the archive" in str(report), str(report)


class ScheduleTransport(DirectTransport):
    """Nodes that do not answer given rounds' messages (``down``: round -> names), answered at once."""

    def __init__(self, services, down: dict[int, set[str]]) -> None:
        super().__init__(services)
        self.schedule = down

    def exchange(self, requests, timeout, optional=frozenset()):
        rounds = {m[0].get("round") for m in requests.values() if m[0].get("cmd") == "round"}
        self.down = set().union(*(self.schedule.get(r, set()) for r in rounds)) if rounds else set()
        return super().exchange(requests, timeout, optional)


def test_a_round_waiting_for_the_attestation_of_a_lost_committer_is_closed_by_it_when_it_is_back(perovskite,
                                                                                                tmp_path):
    """Round 2's committers are just the quorum (train_part0 is down); train_part2 is lost after its
    commitment, before it attests round 2, so round 2 cannot be finalized without it. Back at round 4,
    it catches up through round 2 (the finalized aggregate of round 1 and round 2's updates) and attests
    it, instead of the coordinator waiting for a finalization that needs that very node."""
    _require()
    from fedmdh.deploy.processes import Services, start_anvil
    from fedmdh.audit import show, verify
    from fedmdh.runtime.node import NodeService

    # Prepare
    cfg = ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=("fedavg",),
                           seeds=1, rounds=4)
    with _trial_keys():
        with Services(tmp_path / "logs") as services:
            _, url = start_anvil(services)
            nodes = {n: NodeService(n, p, "e_form", tmp_path / n, test=perovskite["test"])
                     for n, p in zip(NAMES, perovskite["institutions"])}
            transport = ScheduleTransport(nodes, {2: {"train_part0"}, 3: {"train_part2"}})
            task = DeployTask("attest4", experiment_settings(cfg), 3, url, str(tmp_path / "out"),
                              keystore=str(tmp_path / "keystore"), wait_s=30, round_timeout=TIMEOUT_S)
            # Execute
            final = Coordinator(task, transport).run()
            # Assert: every round finalized, round 2 by its two committers, the task verifies
            rounds = {r["round"]: r for r in show(tmp_path / "out")["rounds"]}
            assert sorted(rounds[2]["commitments"]) == ["train_part1", "train_part2"]
            assert sorted(rounds[2]["attestations"]) == ["train_part1", "train_part2"]
            assert all(rounds[r]["finalized"] for r in range(1, 5)) and not final.get("missing")
            report = verify(tmp_path / "out")
            assert report.ok and report.complete, str(report)


class SlowFinishTransport(DirectTransport):
    """One node takes longer than the round timeout to come to the last round's message: the others'
    attestations and the janitor's close_round finalize the last round (the task ends) before it attests."""

    def __init__(self, services, slow: str, delay: float) -> None:
        super().__init__(services)
        inner = services[slow].handle

        def handle(meta, arrays):
            if meta.get("cmd") == "finish":
                time.sleep(delay)
            return inner(meta, arrays)

        self.services[slow] = type("Slow", (), {"handle": staticmethod(handle)})()


def test_a_node_that_comes_to_the_last_round_after_the_quorum_closed_it_still_finishes_and_is_archived(perovskite,
                                                                                                      tmp_path):
    """The last round, finalized by the others after its timeout, ends the task on chain; the late node's
    attestation is then refused ("the task has ended"), which must not make it fail its finish (it was
    left out of the archive as missing)."""
    _require()
    from fedmdh.deploy.processes import Services, start_anvil
    from fedmdh.audit import verify
    from fedmdh.runtime.node import NodeService

    # Prepare
    cfg = ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=("fedavg",),
                           seeds=1, rounds=2)
    with _trial_keys():
        with Services(tmp_path / "logs") as services:
            _, url = start_anvil(services)
            nodes = {n: NodeService(n, p, "e_form", tmp_path / n, test=perovskite["test"])
                     for n, p in zip(NAMES, perovskite["institutions"])}
            transport = SlowFinishTransport(nodes, "train_part2", TIMEOUT_S + 8)
            task = DeployTask("slow2", experiment_settings(cfg), 3, url, str(tmp_path / "out"),
                              keystore=str(tmp_path / "keystore"), wait_s=60, round_timeout=TIMEOUT_S)
            # Execute
            final = Coordinator(task, transport).run()
            # Assert: nobody missing, every model archived, verified
            assert not final.get("missing") and sorted(final["per_institution"]) == NAMES, final
            report = verify(tmp_path / "out")
            assert report.ok and report.complete, str(report)
