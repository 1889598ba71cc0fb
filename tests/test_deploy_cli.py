"""The deployment commands' input checks (no process is started): faults, resume, timeouts."""

from __future__ import annotations

import json

import pytest

from fedmdh.deploy.local import FAULT_PAUSE_S, Fault, with_faults
from fedmdh.errors import InputError


@pytest.mark.parametrize("text, expected", [
    ("coordinator@2", Fault("coordinator", 2)),
    ("chain@3", Fault("chain", 3)),
    ("node:inst-a@2-4", Fault("node", 2, "inst-a", 4)),
    ("node:train_part0@3", Fault("node", 3, "train_part0", None)),
])
def test_faults_parse(text, expected):
    assert Fault.parse(text) == expected


@pytest.mark.parametrize("text", ["coordinator", "node:a@4-2", "node:@2", "disk@2", "node:a@x", "node:../x@2"])
def test_bad_faults_are_one_line(text):
    with pytest.raises(InputError) as exc:
        Fault.parse(text)
    assert "--fault" in str(exc.value) and "\n" not in str(exc.value)


def test_the_coordinator_pauses_before_every_round_a_fault_touches():
    task = with_faults({"task_id": "t", "pause_before": {"7": 1.0}},
                       [Fault.parse("node:a@2-4"), Fault.parse("coordinator@3")])
    assert task["pause_before"] == {"7": 1.0, "2": FAULT_PAUSE_S, "4": FAULT_PAUSE_S, "3": FAULT_PAUSE_S}


def _cli_error(argv, capsys) -> str:
    from fedmdh.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_resume_without_a_task_record_is_one_line(tmp_path, capsys):
    err = _cli_error(["deploy", "resume", "--superlink", "127.0.0.1:1", "--root-certificates",
                      str(tmp_path / "ca.crt"), "--out", str(tmp_path)], capsys)
    assert "no deploy_task.json" in err


def test_resume_of_another_task_is_refused(tmp_path, capsys):
    from fedmdh.runtime.coordinator import TASK_FILE, DeployTask

    task = DeployTask("abc123", {"target": "e_form", "algorithms": ["fedavg"], "rounds": 3}, 3,
                      "http://127.0.0.1:1", str(tmp_path))
    (tmp_path / TASK_FILE).write_text(json.dumps(task.to_json()))
    err = _cli_error(["deploy", "resume", "--superlink", "127.0.0.1:1", "--root-certificates",
                      str(tmp_path / "ca.crt"), "--out", str(tmp_path), "--task", "zzz"], capsys)
    assert "records task abc123" in err


def test_a_fault_naming_no_institution_or_past_the_last_round_is_refused(perovskite, tmp_path, capsys):
    base = ["deploy", "local", "--out", str(tmp_path / "o"), "--target", "e_form", "--rounds", "3",
            "--institutions", *perovskite["institutions"]]
    assert "no institution 'nobody'" in _cli_error([*base, "--fault", "node:nobody@2-3"], capsys)
    assert "only 3 rounds" in _cli_error([*base, "--fault", "coordinator@5"], capsys)
    assert not (tmp_path / "o").exists()  # refused before anything started or was written


def test_a_negative_round_timeout_is_refused(tmp_path, capsys):
    err = _cli_error(["deploy", "run", "--superlink", "127.0.0.1:1", "--root-certificates", str(tmp_path / "ca"),
                      "--chain-rpc", "http://127.0.0.1:1", "--out", str(tmp_path / "o"), "--nodes", "3",
                      "--target", "e_form", "--round-timeout", "-1"], capsys)
    assert "round timeout must be >= 0" in err


def test_secure_deployment_of_an_uncovered_algorithm_is_refused_before_anything_starts(perovskite, tmp_path, capsys):
    err = _cli_error(["deploy", "local", "--out", str(tmp_path / "o"), "--target", "e_form", "--rounds", "3",
                      "--algorithm", "flic", "--secure", "--institutions", *perovskite["institutions"]], capsys)
    assert "--secure covers" in err and "flic would still reveal" in err
    assert not (tmp_path / "o").exists()


def test_secure_deployment_without_openfhe_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    from fedmdh.secure import backend

    monkeypatch.setattr(backend, "unavailable_reason", lambda: "no interpreter here imports openfhe")
    err = _cli_error(["deploy", "run", "--superlink", "127.0.0.1:1", "--root-certificates", str(tmp_path / "ca"),
                      "--chain-rpc", "http://127.0.0.1:1", "--out", str(tmp_path / "o"), "--nodes", "3",
                      "--target", "e_form", "--secure"], capsys)
    assert err.endswith("--secure needs OpenFHE at the coordinator and at every node: no interpreter here imports "
                        "openfhe")
