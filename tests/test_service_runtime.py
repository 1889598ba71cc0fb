"""The service's seams without a server: the TaskRuntime contract as the runner uses it, the store, upload names."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from fedmdh.errors import InputError
from fedmdh.service.runner import EventHub, TaskRunner
from fedmdh.service.runtime import SimulatorRuntime, TaskSpec, TaskStopped
from fedmdh.service.store import TaskStore
from fedmdh.service.submission import sanitise_filename


def spec(task_id: str, rounds: int = 3) -> TaskSpec:
    return TaskSpec(id=task_id, institutions=("a.csv", "b.csv"), test="t.csv", target="y", algorithm="fedavg",
                    rounds=rounds, seed=0)


class FakeRuntime:
    """A runtime that resumes: rounds are recorded in a file of the run folder."""

    name = "fake"
    can_resume = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate = threading.Event()

    def _rounds(self, spec: TaskSpec, run_dir: Path, start: int, progress, stop) -> dict:
        run_dir.mkdir(parents=True, exist_ok=True)
        for r in range(start, spec.rounds + 1):
            progress(r, spec.rounds, {"round": r, "rmse": 1.0 / r, "per_institution": {}})
            (run_dir / "last_round").write_text(str(r))
            if spec.target == "bad":
                raise InputError(f"{spec.institutions[0]}: no such file; check the path.")
            if spec.target == "slow":
                self.gate.wait(10)
            if stop.is_set():
                raise TaskStopped(r)
        return {"rmse": 1.0 / spec.rounds, "best_round": spec.rounds, "per_institution": {}}

    def run(self, spec, run_dir, progress, stop):
        self.calls.append(("run", spec.id))
        return self._rounds(spec, run_dir, 1, progress, stop)

    def resume(self, spec, run_dir, progress, stop):
        self.calls.append(("resume", spec.id))
        return self._rounds(spec, run_dir, int((run_dir / "last_round").read_text()) + 1, progress, stop)


def wait(store: TaskStore, task_id: str, status: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while store.get(task_id).status != status:
        assert time.monotonic() < deadline, store.get(task_id)
        time.sleep(0.02)


def test_the_simulator_runtime_keeps_the_seams_contract(perovskite, tmp_path):
    """The contract of the module docstring, on the real split: progress after every round with JSON
    records, the run folder in ``fedmdh run``'s layout, final_metrics.json returned, a stop honoured at the
    next round boundary, and no resume."""
    import json

    rt = SimulatorRuntime()
    task = TaskSpec(id="t", institutions=tuple(perovskite["institutions"]), test=perovskite["test"],
                    target="e_form", algorithm="fedavg", rounds=3, seed=0, ledger="off")
    calls: list[tuple[int, int, dict]] = []
    final = rt.run(task, tmp_path / "run", lambda r, n, rec: calls.append((r, n, rec)), threading.Event())
    assert [(r, n) for r, n, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert [json.loads(json.dumps(rec))["round"] for _, _, rec in calls] == [1, 2, 3]
    assert final == json.loads((tmp_path / "run" / "final_metrics.json").read_text(encoding="utf-8"))
    names = [Path(p).stem for p in perovskite["institutions"]]
    assert sorted(p.name for p in (tmp_path / "run" / "models").iterdir()) == names
    assert {"metrics.jsonl", "federation.json", "config.toml"} <= {p.name for p in (tmp_path / "run").iterdir()}

    stop, seen = threading.Event(), []

    def progress(r, n, rec):
        seen.append(r)
        stop.set()

    with pytest.raises(TaskStopped) as info:
        rt.run(task, tmp_path / "stopped", progress, stop)
    assert info.value.after_round == 1 and seen == [1]
    assert rt.can_resume is False
    with pytest.raises(NotImplementedError):
        rt.resume(task, tmp_path / "stopped", progress, stop)


def test_runner_stores_rounds_ends_tasks_and_resumes_where_the_runtime_can(tmp_path):
    store, rt = TaskStore(tmp_path), FakeRuntime()
    store.add("ok", spec("ok").to_dict(), None)
    bad = TaskSpec(**{**spec("bad").to_dict(), "target": "bad", "institutions": (str(tmp_path / "up" / "a.csv"), "b"),
                      "display": {str(tmp_path / "up" / "a.csv"): "lab_a.csv"}})
    store.add("bad", bad.to_dict(), None)
    runner = TaskRunner(store, rt, tmp_path, EventHub())
    runner.start()
    wait(store, "ok", "finished")
    wait(store, "bad", "failed")
    assert [m["round"] for m in store.get("ok").metrics] == [1, 2, 3] and store.get("ok").final["best_round"] == 3
    assert store.get("bad").error == "lab_a.csv: no such file; check the path."  # the user's name for the file
    # stopping the runner interrupts the task in flight at a round boundary
    slow = TaskSpec(**{**spec("slow", rounds=50).to_dict(), "target": "slow"})
    store.add("slow", slow.to_dict(), None)
    runner.submit("slow")
    wait(store, "slow", "running")
    assert runner.stop(timeout=0.05) is False  # held at its gate
    rt.gate.set()
    runner._thread.join(10)
    row = store.get("slow")
    assert row.status == "interrupted" and row.error.startswith("the service was stopped after round 1 of 50")
    # a resumable runtime continues it after a restart from what its run folder holds
    store.requeue("slow")
    runner2 = TaskRunner(store, rt, tmp_path, EventHub())
    runner2.start()  # a queued task with rounds done is resumed
    wait(store, "slow", "finished")
    runner2.stop()
    assert rt.calls[-1] == ("resume", "slow")
    assert [m["round"] for m in store.get("slow").metrics] == list(range(1, 51))


def test_store_marks_tasks_left_running_as_interrupted(tmp_path):
    store = TaskStore(tmp_path)
    store.add("t1", spec("t1").to_dict(), {"H": 1.0})
    store.set_running("t1")
    store.add_round("t1", 1, {"round": 1})
    store.close()
    again = TaskStore(tmp_path)
    assert again.interrupt_running() == ["t1"]
    row = again.get("t1")
    assert row.status == "interrupted" and row.round == 1 and row.federation == {"H": 1.0}
    assert row.error == "the service stopped while this task was running (after round 1 of 3); submit it again to rerun it"


@pytest.mark.parametrize("name,safe", [
    ("train_part0.csv", "train_part0.csv"), ("../../etc/passwd", "passwd"), ("C:\\data\\lab a.csv", "lab_a.csv"),
    (".hidden.csv", "hidden.csv"), ("", "upload.csv"), ("...", "upload.csv"), (None, "upload.csv"),
    ("données été.csv", "donn_es_t_.csv"),
])
def test_upload_names_are_sanitised(name, safe):
    assert sanitise_filename(name) == safe


@given(st.text(max_size=300))
def test_a_sanitised_name_stays_in_its_folder(name):
    safe = sanitise_filename(name)
    assert safe and len(safe) <= 100 and "/" not in safe and "\\" not in safe and not safe.startswith(".")
    assert (Path("/up") / safe).resolve().parent == Path("/up")


def _serve_error(capsys, args: list[str]) -> str:
    from fedmdh.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["serve", *args])
    assert exc.value.code == 2
    return capsys.readouterr().err.strip()


def test_serve_refuses_bad_options_with_one_line(capsys, tmp_path):
    import socket

    missing = tmp_path / "no-token"
    assert _serve_error(capsys, ["--folder", str(tmp_path / "f"), "--token-file", str(missing)]) == (
        f"error: {missing}: token file not found; give a file holding the token (e.g. `openssl rand -hex 32 > "
        f"{missing}`), or leave --token-file out to have one made.")
    weak = tmp_path / "weak"
    weak.write_text("hunter2\n")
    assert _serve_error(capsys, ["--folder", str(tmp_path / "f"), "--token-file", str(weak)]) == (
        f"error: {weak}: the token is 7 characters long; use at least 16 (e.g. `openssl rand -hex 32`).")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert _serve_error(capsys, ["--folder", str(tmp_path / "f"), "--port", str(port)]) == (
            f"error: port {port} on 127.0.0.1 is in use; choose another with --port (0: any free port).")
    assert _serve_error(capsys, ["--folder", str(tmp_path / "f"), "--port", "70000"]) == (
        "error: --port must be in 0..65535, got 70000.")
    # without --token-file the service made its own token, readable by its owner only
    token = tmp_path / "f" / "token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) == 64
