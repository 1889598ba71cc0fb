"""Failover on a real local deployment (anvil, a TLS SuperLink with SuperNode authentication, one
``fedmdh node start`` process per institution of the perovskite split), with the faults of
``fedmdh deploy local --fault``: the coordinator killed and replaced, a node killed and restarted,
a quorum lost and the task resumed. One deployment serves the module; nothing is left running."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmdh.config import ExperimentConfig
from fedmdh.models import load_model
from fedmdh.experiment.runner import load_tables, prepare
from fedmdh.runtime.coordinator import DeployTask, experiment_settings
from fedmdh.runtime.simulator import simulate

from test_deploy import NAMES, local_deployment

ROUNDS = 5
#: seconds a round waits for a silent institution (short, for the tests; the CLI's default is longer)
TIMEOUT_S = 15.0
#: where every institution must make every round (a replaced coordinator: nodes reconnect, then train),
#: a timeout no live node reaches on a loaded machine
PATIENT_S = 90.0


@pytest.fixture(scope="module")
def deployment(perovskite, tmp_path_factory):
    yield from local_deployment(perovskite, tmp_path_factory.mktemp("failover"))


def _config(perovskite, rounds: int = ROUNDS) -> ExperimentConfig:
    return ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=("fedavg",),
                            seeds=1, rounds=rounds)


def _task(dep, cfg, out: Path, task_id: str, timeout: float = TIMEOUT_S) -> DeployTask:
    return DeployTask(task_id, experiment_settings(cfg), 3, dep.chain_url, str(out),
                      keystore=str(dep.folder / "deploy" / "keystore"), wait_s=120.0, round_timeout=timeout)


def _node_model(dep, name: str, task_id: str):
    return load_model(dep.node_state(name) / "tasks" / task_id / "models" / name)


def _commitments(out: Path) -> dict[int, list[str]]:
    from fedmdh.audit import show

    return {r["round"]: sorted(r["commitments"]) for r in show(out)["rounds"]}


def _ensure_nodes(dep) -> None:
    for name in NAMES:
        if name not in dep.nodes:
            dep.start_node(name)


def test_coordinator_killed_at_round_2_a_new_one_resumes_with_the_same_models(deployment, perovskite, tmp_path):
    from fedmdh.deploy.local import Fault, run_task
    from fedmdh.audit import verify

    # Prepare
    _ensure_nodes(deployment)
    cfg = _config(perovskite)
    out = tmp_path / "run"
    first_link, first_db = deployment.link.pid, deployment.link_db
    said = []
    # Execute: kill -9 the SuperLink and its ServerApp before round 2; a new SuperLink (new
    # process, new database) and a new ServerApp resume the task
    last = run_task(deployment, _task(deployment, cfg, out, "coord5", PATIENT_S).to_json(),
                    faults=[Fault.parse("coordinator@2")], say=said.append)
    # Assert
    assert last["event"] == "finished"
    assert any("killed the coordinator" in s for s in said) and any("resuming" in s for s in said)
    assert deployment.link.pid != first_link and deployment.link_db != first_db and deployment.link_db.is_file()
    sim = simulate(prepare(cfg, load_tables(cfg), 0), cfg.build_algorithm("fedavg"), ROUNDS, seed=0)
    for name in NAMES:
        model = _node_model(deployment, name, "coord5")
        assert model.info["best_round"] == sim.best_rounds[name]
        for k, v in sim.models[name].items():
            assert np.asarray(model.params[k]).tobytes() == np.asarray(v).tobytes(), (name, k)
    assert _commitments(out) == {r: NAMES for r in range(1, ROUNDS + 1)}
    assert "resumed by a new coordinator at round" in (out / "run.log").read_text()
    report = verify(out)
    assert report.ok, str(report)


def test_a_node_killed_at_round_2_and_restarted_at_round_4_catches_up(deployment, perovskite, tmp_path):
    from fedmdh.deploy.local import Fault, run_task
    from fedmdh.ledger import codec
    from fedmdh.audit import verify
    from fedmdh.ledger.blobs import DirBlobStore

    # Prepare
    _ensure_nodes(deployment)
    cfg = _config(perovskite)
    out = tmp_path / "run"
    dropped = NAMES[0]
    # Execute
    last = run_task(deployment, _task(deployment, cfg, out, "drop5").to_json(),
                    faults=[Fault.parse(f"node:{dropped}@2-4")])
    # Assert: the rounds it missed closed with the two others' commitments, after the timeout
    assert last["event"] == "finished"
    commits = _commitments(out)
    others = [n for n in NAMES if n != dropped]
    assert commits[2] == others and commits[3] == others
    assert commits[1] == NAMES and commits[ROUNDS] == NAMES
    report = verify(out)
    assert report.ok, str(report)
    # its final model is a finalized aggregate (fedavg's personal model is the global one)
    task = json.loads((out / "ledger" / "task.json").read_text())
    blobs = DirBlobStore(out / "ledger" / "blobs")
    records = {r["round"]: r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(1, ROUNDS + 1))
    model = _node_model(deployment, dropped, "drop5")
    kept = model.info["best_round"]
    from fedmdh.audit import show

    finalized = {r["round"]: r["finalized"] for r in show(out)["rounds"]}
    agg = codec.decode_payload(blobs.get(finalized[kept].removeprefix("0x")))
    assert sorted(agg) == sorted(model.params)
    for k, v in agg.items():
        assert np.asarray(model.params[k]).tobytes() == np.asarray(v).tobytes(), k
    assert task["round_timeout"] == TIMEOUT_S


def test_a_lost_quorum_stops_the_task_naming_the_missing_and_a_resume_completes_it(deployment, perovskite,
                                                                                  tmp_path):
    from fedmdh.deploy.local import Fault, run_task
    from fedmdh.errors import InputError
    from fedmdh.audit import verify

    # Prepare
    _ensure_nodes(deployment)
    cfg = _config(perovskite, rounds=4)
    out = tmp_path / "run"
    task = _task(deployment, cfg, out, "quorum4")
    gone = NAMES[1:]
    # Execute: two of three nodes go and stay down before round 2
    with pytest.raises(InputError) as exc:
        run_task(deployment, task.to_json(), faults=[Fault.parse(f"node:{n}@2") for n in gone])
    msg = str(exc.value)
    # Assert: it names them and says how to go on
    assert f"missing: {', '.join(gone)}." in msg and "the quorum is 2" in msg and "fedmdh deploy resume" in msg
    # round 1 waits for a quorum of attestations (the two missing attest it in round 2's messages)
    stopped = verify(out, partial=True)
    assert stopped.ok and not stopped.complete, str(stopped)
    # they come back; a new coordinator resumes the task from the run record
    _ensure_nodes(deployment)
    from fedmdh.cli import main

    main(["deploy", "resume", "--superlink", deployment.superlink, "--root-certificates", str(deployment.certs.ca),
          "--out", str(out), "--task", "quorum4"])
    assert json.loads((out / "final_metrics.json").read_text())["algorithm"] == "fedavg"
    assert sorted(_commitments(out)) == [1, 2, 3, 4]
    report = verify(out)
    assert report.ok and str(report).startswith("OK: 4 of 4 rounds finalized"), str(report)


def test_the_chain_node_restarted_mid_task_the_task_goes_on(deployment, perovskite, tmp_path):
    from fedmdh.deploy.local import Fault, run_task
    from fedmdh.audit import verify

    # Prepare
    _ensure_nodes(deployment)
    cfg = _config(perovskite, rounds=3)
    out = tmp_path / "run"
    chain_before = deployment.chain.pid
    # Execute: anvil stopped (it writes its state file) and started again from it before round 2
    last = run_task(deployment, _task(deployment, cfg, out, "chain3", PATIENT_S).to_json(),
                    faults=[Fault.parse("chain@2")])
    # Assert: a new chain process, every round with every institution, the same models as the simulator
    assert last["event"] == "finished" and deployment.chain.pid != chain_before
    assert _commitments(out) == {r: NAMES for r in range(1, 4)}
    sim = simulate(prepare(cfg, load_tables(cfg), 0), cfg.build_algorithm("fedavg"), 3, seed=0)
    for name in NAMES:
        model = _node_model(deployment, name, "chain3")
        for k, v in sim.models[name].items():
            assert np.asarray(model.params[k]).tobytes() == np.asarray(v).tobytes(), (name, k)
    report = verify(out)
    assert report.ok, str(report)
