"""A real deployment on 127.0.0.1: anvil, a SuperLink with TLS and SuperNode authentication, one
``fedmdh node start`` process per institution of the perovskite split. One deployment serves the
whole module; every task runs through Flower and is compared with the in-process simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmdh.algorithms import ALGORITHMS
from fedmdh.config import ExperimentConfig
from fedmdh.errors import TrainingDiverged
from fedmdh.models import load_model
from fedmdh.experiment.runner import load_tables, prepare
from fedmdh.runtime.coordinator import DeployTask, experiment_settings
from fedmdh.runtime.simulator import simulate

NAMES = ["train_part0", "train_part1", "train_part2"]
WAIT_S = 120.0


def _anvil_or_skip() -> None:
    from fedmdh.deploy.processes import anvil_binary
    from fedmdh.errors import InputError

    try:
        anvil_binary()
    except InputError as exc:
        print(exc)
        pytest.skip(str(exc))


def local_deployment(perovskite, folder: Path):
    """A local deployment of the perovskite split in ``folder`` for a module's tests; asserts at
    the end that none of its processes is left running."""
    from fedmdh.deploy.local import start_local
    from fedmdh.deploy.processes import Services

    _anvil_or_skip()
    files = {n: Path(p) for n, p in zip(NAMES, perovskite["institutions"])}
    with Services(folder / "deploy" / "logs") as services:
        yield start_local(folder, files, "e_form", Path(perovskite["test"]), services)
    # Flower's SuperExec processes watch their parent (--parent-pid) and leave within a few seconds of it
    deadline = time.monotonic() + 15
    while (left := _processes_under(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running 15 s after the deployment stopped: {left}"


@pytest.fixture(scope="module")
def deployment(perovskite, tmp_path_factory):
    yield from local_deployment(perovskite, tmp_path_factory.mktemp("deploy"))


def _processes_under(folder: Path) -> list[str]:
    """Processes whose command line or environment names the deployment's folder."""
    out = []
    key = str(folder).encode()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes()
            if key in cmd or key in (d / "environ").read_bytes():
                out.append(f"{d.name}: {cmd.replace(bytes(1), b' ').decode(errors='replace')[:120]}")
        except OSError:
            continue
    return [p for p in out if not p.startswith(f"{os.getpid()}:")]


def _config(perovskite, algorithm: str, rounds: int) -> ExperimentConfig:
    return ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=(algorithm,),
                            seeds=1, rounds=rounds)


def _deploy(dep, cfg: ExperimentConfig, out: Path, task_id: str, nodes: int = 3, **task_kw) -> dict:
    from fedmdh.deploy.local import run_task

    task = DeployTask(task_id, experiment_settings(cfg), nodes, dep.chain_url, str(out),
                      keystore=str(dep.folder / "deploy" / "keystore"), wait_s=WAIT_S, **task_kw)
    events = []
    last = run_task(dep, task.to_json(), on_event=events.append)
    assert [e["round"] for e in events if e["event"] == "round"] == list(range(1, cfg.rounds + 1))
    return last


def _node_model(dep, name: str, task_id: str):
    return load_model(dep.node_state(name) / "tasks" / task_id / "models" / name)


def _assert_equals_the_simulator(dep, perovskite, algorithm: str, rounds: int, task_id: str, out: Path) -> None:
    # Prepare
    cfg = _config(perovskite, algorithm, rounds)
    # Execute
    _deploy(dep, cfg, out, task_id)
    sim = simulate(prepare(cfg, load_tables(cfg), 0), cfg.build_algorithm(algorithm), rounds, seed=0)
    # Assert: every institution's kept model, bit for bit, and the record's metrics
    for name in NAMES:
        model = _node_model(dep, name, task_id)
        assert model.info["best_round"] == sim.best_rounds[name]
        assert sorted(model.params) == sorted(sim.models[name])
        for k, v in sim.models[name].items():
            assert np.asarray(model.params[k]).tobytes() == np.asarray(v).tobytes(), (name, k)
    final = json.loads((out / "final_metrics.json").read_text())
    for name in NAMES:
        assert final["per_institution"][name]["rmse"] == sim.final_per_institution[name]["rmse"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["rmse"] for x in lines] == [h.rmse for h in sim.history]
    fed = json.loads((out / "federation.json").read_text())
    het = prepare(cfg, load_tables(cfg), 0).heterogeneity
    assert (fed["H"], fed["alpha"]) == (het.H, het.alpha) and fed["KL_avg"] == pytest.approx(het.KL_avg, rel=1e-12)


def test_fedavg_deployed_is_the_simulator_bit_for_bit_and_verifies(deployment, perovskite, capsys):
    from fedmdh.cli import main

    out = deployment.folder  # the run record beside the nodes' folders, as `fedmdh deploy local` writes it
    _assert_equals_the_simulator(deployment, perovskite, "fedavg", 3, "fedavg3", out)
    capsys.readouterr()
    main(["ledger", "verify", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("OK: 3 of 3 rounds finalized and verified")
    assert "models (6 files) in nodes/ match the archived hashes" in text
    assert "one party" not in text  # each institution signed with its own key on its own node


def _fedmdh_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmdh.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_a_finished_trial_verifies_with_its_chain_stopped_and_cannot_check_without_its_state(deployment, perovskite,
                                                                                             tmp_path):
    """`fedmdh ledger verify RUN` of a finished `fedmdh deploy local` trial (its chain no longer running)
    brings the chain back from RUN/deploy/chain-state.json and says OK; without that file it says
    "cannot check" with its own exit status (3), never FAILED (issue 21: it said FAILED, exit 1)."""
    import shutil

    from fedmdh.deploy.processes import start_anvil

    # Prepare: a task of the trial; then its chain stopped, as at the end of `deploy local` (anvil writes its state)
    out = tmp_path / "run"
    _deploy(deployment, _config(perovskite, "fedavg", 2), out, "stopped2")
    state = deployment.folder / "deploy" / "chain-state.json"
    deployment.services.stop(deployment.chain)
    try:
        (out / "deploy").mkdir()
        shutil.copy(state, out / "deploy" / "chain-state.json")  # the run record's layout: RUN/deploy/...

        # Execute
        with_state = _fedmdh_cli("ledger", "verify", out)
        (out / "deploy" / "chain-state.json").unlink()
        without = _fedmdh_cli("ledger", "verify", out)
        got = _fedmdh_cli("model", "get", out, "--out", tmp_path / "got")
    finally:  # the module's other tests use the chain again, on its port
        deployment.chain, _ = start_anvil(deployment.services, port=deployment.chain_port, state_file=state)

    # Assert
    assert with_state.returncode == 0, with_state.stdout + with_state.stderr
    assert with_state.stdout.startswith("OK: 2 of 2 rounds finalized and verified")
    note = next(line for line in with_state.stdout.splitlines() if line.startswith("the trial's chain was not running"))
    assert f"brought back from {out / 'deploy' / 'chain-state.json'} (a copy)" in note
    pid = int(note.split(", pid ")[1].split(",")[0])
    assert not Path(f"/proc/{pid}").exists() or b"anvil" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert without.returncode == 3, without.stdout + without.stderr
    assert without.stdout.startswith(f"cannot check the receipts: the node at {deployment.chain_url} is unreachable "
                                     f"and {out / 'deploy' / 'chain-state.json'}, the trial's saved chain, is missing")
    assert "FAILED" not in without.stdout and "Traceback" not in without.stderr
    assert got.returncode == 3 and "error: " in got.stderr and "cannot check the receipts" in got.stderr
    assert not (tmp_path / "got").exists()


def test_fedmdh_deployed_is_the_simulator_bit_for_bit(deployment, perovskite, tmp_path):
    from fedmdh.audit import verify

    _assert_equals_the_simulator(deployment, perovskite, "fedmdh", 3, "fedmdh3", tmp_path / "run")
    report = verify(tmp_path / "run")
    assert report.ok, str(report)


def test_secure_fedavg_over_flower_relays_and_stores_no_clear_update_and_verifies(deployment, perovskite, tmp_path):
    """--secure across the processes: a recorder keeps every message the coordinator (the ServerApp)
    sends and receives; no piece of an institution's clear update or setup statistics is in any of
    them, nor in any blob the coordinator stored; the ledger verifies; the test metrics are the
    plain deployment's (the simulator's, bit for bit) within 0.005."""
    from fedmdh.data.federation import local_split, setup_summary
    from fedmdh.data.io import load_institution
    from fedmdh.ledger import codec
    from fedmdh.audit import verify
    from fedmdh.ledger.blobs import DirBlobStore
    from fedmdh.secure.aggregation import contribution
    from fedmdh.secure.backend import unavailable_reason

    if unavailable_reason():
        print(f"skipped: {unavailable_reason()}")
        pytest.skip(unavailable_reason())
    rounds = 3
    cfg = _config(perovskite, "fedavg", rounds)
    record = tmp_path / "messages"
    # Execute
    _deploy(deployment, cfg, tmp_path / "run", "secure3", secure=True, record_messages=str(record))
    # Assert: what each institution holds in the clear (its statistics, its updates in its own folder)
    clear = []
    for name, path in zip(NAMES, perovskite["institutions"]):
        s = setup_summary(local_split(load_institution(path, "e_form", name=name), cfg.first_seed, cfg.val_fraction))
        clear += [s.x_stats.total, s.x_stats.total_sq, s.y_stats.total]
        folder = deployment.node_state(name) / "tasks" / "secure3" / "blobs"
        updates = [codec.decode_update(DirBlobStore(folder).get(p.name)) for p in folder.rglob("*") if p.is_file()]
        plain = [u for u in updates if "ct.bytes" not in u.payload]
        assert len(plain) == rounds
        clear += [np.asarray(v) for u in plain for v in u.payload.values()] + [contribution(u) for u in plain]
    seen = [p.read_bytes() for p in sorted(record.glob("*.bin")) + sorted((tmp_path / "run").rglob("*")) if p.is_file()]
    assert len(list(record.glob("*-from-*.bin"))) >= 3 * (2 * rounds + 4)
    found = []
    for i, v in enumerate(x for x in clear if np.asarray(x).nbytes >= 64):
        b = np.ascontiguousarray(v).tobytes()
        if any(w in blob for w in (b[:64], b[len(b) // 2:len(b) // 2 + 64]) for blob in seen):
            found.append(i)
    assert not found, f"{len(found)} clear arrays found in the coordinator's messages or blobs"
    report = verify(tmp_path / "run")
    assert report.ok and report.complete, str(report)
    sim = simulate(prepare(cfg, load_tables(cfg), 0), cfg.build_algorithm("fedavg"), rounds, seed=0)
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert abs(final["r2"] - sim.final["r2"]) < 0.005


OTHERS = sorted(n for n, c in ALGORITHMS.items() if c.federated and not c.centralized and n not in ("fedavg", "fedmdh"))


@pytest.mark.parametrize("algorithm", OTHERS)
def test_every_algorithm_runs_deployed(deployment, perovskite, tmp_path, algorithm):
    from fedmdh.audit import verify

    cfg = _config(perovskite, algorithm, 2)
    last = _deploy(deployment, cfg, tmp_path / "run", f"{algorithm.replace('-', '')}2")
    assert last["event"] == "finished" and np.isfinite(last["rmse"])
    assert verify(tmp_path / "run").ok


def test_the_coordinator_holds_no_institution_key(deployment):
    from eth_account import Account

    keystore = deployment.folder / "deploy" / "keystore"
    assert sorted(p.name for p in keystore.iterdir()) == ["coordinator.json"]
    own = {}
    for name in NAMES:
        files = sorted((deployment.node_state(name) / "keystore").iterdir())
        assert [p.name for p in files] == [f"{name}.json"]
        own[name] = "0x" + json.loads(files[0].read_text())["address"].lower().removeprefix("0x")
    task = json.loads((deployment.folder / "ledger" / "task.json").read_text())
    recs = [json.loads(x) for x in (deployment.folder / "ledger" / "transactions.jsonl").read_text().splitlines()]
    signed = [r for r in recs if r["fn"] in ("register", "commit", "attest", "attest_model")]
    assert signed
    for r in signed:
        signer = Account.recover_transaction(r["raw"]).lower()
        assert signer == own[r["actor"]] == task["participants"][r["actor"]].lower()
    coordinator = {r["from"].lower() for r in recs if r["fn"] in ("deploy", "archive")}
    assert coordinator == {task["submitter"].lower()} and coordinator.isdisjoint(own.values())


def test_references_are_refused_for_a_deployment(tmp_path, capsys):
    from fedmdh.cli import main

    for algorithm in ("local", "pooled"):
        with pytest.raises(SystemExit) as exc:
            main(["deploy", "run", "--superlink", "127.0.0.1:1", "--root-certificates", str(tmp_path / "ca.crt"),
                  "--chain-rpc", "http://127.0.0.1:1", "--out", str(tmp_path / "o"), "--nodes", "3",
                  "--target", "e_form", "--algorithm", algorithm])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "does not communicate" in err and len(err.splitlines()) == 1


def test_a_node_whose_key_is_not_registered_is_refused(deployment, perovskite, tmp_path):
    from fedmdh.deploy.certs import make_node_key

    make_node_key(tmp_path / "x.key", tmp_path / "x.pub")
    argv = [sys.executable, "-m", "fedmdh.cli", "node", "start", "--name", "intruder", "--data",
            perovskite["institutions"][0], "--target", "e_form", "--superlink", deployment.superlink,
            "--root-certificates", str(deployment.certs.ca), "--key", str(tmp_path / "x.key"),
            "--state", str(tmp_path / "state")]
    proc = subprocess.run(argv, env=deployment.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "refused its key" in last and "Traceback" not in proc.stderr


def test_nodes_with_bad_data_fail_setup_with_one_line_naming_them(deployment, perovskite, tmp_path):
    from fedmdh.deploy.flower import register_node
    from fedmdh.deploy.certs import make_node_key
    from fedmdh.errors import InputError

    frame = pd.read_csv(perovskite["institutions"][0])
    bad = {"no-target": frame.drop(columns=["e_form"]).head(50), "few-rows": frame.head(5)}
    for name, table in bad.items():
        path = tmp_path / f"{name}.csv"
        table.to_csv(path, index=False)
        key = deployment.certs.folder / "nodes" / f"{name}.key"
        make_node_key(key, key.with_suffix(".pub"))
        register_node(deployment.flwr_home, key.with_suffix(".pub"), name)
        deployment.node_args[name] = [*deployment.node_args[NAMES[0]]]
        args = deployment.node_args[name]
        for flag, value in (("--name", name), ("--data", str(path)), ("--key", str(key)),
                            ("--state", str(deployment.node_state(name)))):
            args[args.index(flag) + 1] = value
        deployment.start_node(name)
    try:
        with pytest.raises(InputError) as exc:
            _deploy(deployment, _config(perovskite, "fedavg", 2), tmp_path / "run", "bad", nodes=5)
        msg = str(exc.value)
        assert "setup failed at few-rows, no-target" in msg
        assert "target column 'e_form' not found" in msg and "at least 10" in msg
        assert "\n" not in msg
    finally:
        for name in bad:
            deployment.stop_node(name)


def test_a_deployed_task_that_diverges_stops_with_the_simulators_line_and_verifies_as_partial(deployment, perovskite,
                                                                                              tmp_path, capsys):
    """The round engine's divergence check runs deployed too: lr 1e6 stops the task at round 1's aggregate with
    the line `fedmdh run` prints, before any node attests it; `ledger verify --partial` accepts the record."""
    from fedmdh.cli import main
    from fedmdh.errors import InputError

    # Prepare
    cfg = ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=("fedavg",),
                           seeds=1, rounds=3, algorithm_settings={"fedavg": {"lr": 1e6}})
    with pytest.raises(TrainingDiverged) as sim:
        simulate(prepare(cfg, load_tables(cfg), 0), cfg.build_algorithm("fedavg"), 3, seed=0)
    out = tmp_path / "run"
    # Execute
    with pytest.raises(InputError) as exc:
        _deploy(deployment, cfg, out, "diverges")
    # Assert: the simulator's words and round
    assert f"training diverged at round {sim.value.round} (" in str(exc.value)
    assert "lower the learning rate" in str(exc.value)
    assert "training diverged at round" in (out / "run.log").read_text()
    capsys.readouterr()
    try:
        main(["ledger", "verify", "--partial", str(out)])
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    text = capsys.readouterr().out
    assert code == 0 and "0 of 3 rounds finalized" in text, text
