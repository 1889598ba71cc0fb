"""The deployment commands under abuse (issue 21): ``fedmdh deploy local`` killed with SIGKILL leaves
no process behind, a taken port is refused, a failed trial's folder can be replaced with
``--overwrite`` (and only then, and never with an input inside), and the help shows every default.

The tests that start real processes (anvil, the SuperLink, the nodes) carry the tiers' markers
(``deploy``/``chain`` and ``slow``, as tests/conftest.py gives test_deploy.py's) and are skipped, like
those, where anvil or the perovskite split is missing; each stops what it started by PID.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fedmdh.cli import main

from test_deploy import _anvil_or_skip, _processes_under

# ---------------------------------------------------------------------- processes, from /proc


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of ``pid``; ``None`` when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every process under ``root`` (children, grandchildren, ...): pid -> (start time, command line)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        st = _stat(int(d.name))
        if st is not None:
            children.setdefault(st[0], []).append(int(d.name))
    out: dict[int, tuple[int, str]] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            st = _stat(pid)
            if st is None or pid in out:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = ""
            out[pid] = (st[2], cmd.strip())
            todo.append(pid)
    return out


def _alive(procs: dict[int, tuple[int, str]]) -> dict[int, str]:
    """Those of ``procs`` still running (the same process: same start time; a zombie counts as gone)."""
    out = {}
    for pid, (start, cmd) in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[1] != "Z":
            out[pid] = cmd
    return out


def _kill_left(procs: dict[int, tuple[int, str]]) -> None:
    """SIGKILL, by PID, whichever of ``procs`` is still running (a failed test cleans up after itself)."""
    for pid in _alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait_gone(procs: dict[int, tuple[int, str]], timeout: float) -> dict[int, str]:
    t_end = time.monotonic() + timeout
    while _alive(procs) and time.monotonic() < t_end:
        time.sleep(0.2)
    return _alive(procs)


def _lines(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


# ---------------------------------------------------------------------- 1. SIGKILL leaves nothing behind


@pytest.mark.deploy
@pytest.mark.slow
def test_deploy_local_killed_with_sigkill_leaves_no_process_behind(perovskite, tmp_path):
    """A real trial (chain, SuperLink, three nodes, Flower's SuperExec, ServerApp and ClientApp
    processes) is killed with SIGKILL in its second round: within seconds none of the processes
    under it (collected from /proc before the kill) is running."""
    _anvil_or_skip()
    folder = tmp_path / "trial"
    argv = [sys.executable, "-m", "fedmdh.cli", "deploy", "local", "--out", str(folder), "--target",
            "e_form", "--rounds", "60", "--institutions", *perovskite["institutions"]]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    procs: dict[int, tuple[int, str]] = {}
    seen: list[str] = []
    try:
        # Prepare: wait until the task runs (round 2: every node's ClientApp has started)
        lines = _lines(proc.stderr)
        t_end = time.monotonic() + 400
        while not any("round 2/60" in s for s in seen):
            try:
                line = lines.get(timeout=max(0.1, t_end - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the trial did not reach round 2 in time: {''.join(seen)[-2000:]}")
            if line is None:
                pytest.fail(f"the trial ended early ({proc.wait()}): {''.join(seen)[-2000:]}")
            seen.append(line)
        procs = _descendants(proc.pid)
        commands = " ".join(cmd for _, cmd in procs.values())
        for part in ("anvil", "flower-superlink", "flwr-serverapp", "flower-supernode", "flower-superexec"):
            assert part in commands, f"{part} not among the trial's processes: {commands}"
        assert commands.count("fedmdh.cli node start") == 3
        # Execute
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        left = _wait_gone(procs, timeout=20)
        # Assert: none of them, nor one started after they were collected (a ClientApp) that names the trial
        assert not left, f"{len(left)} of {len(procs)} processes outlived `fedmdh deploy local`: {left}"
        assert not _processes_under(folder)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_left(procs)
        for line in _processes_under(folder):  # what the trial started after the processes were collected
            try:
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
            except OSError:
                pass


def test_a_supervised_command_takes_its_grandchildren_with_it_even_in_other_sessions(tmp_path):
    """The watchdog alone, without Flower: a process that starts a child, which starts a grandchild
    in a session of its own and exits (the grandchild goes to init), then dies by SIGKILL: the
    grandchild is stopped too; a process started outside the block is left alone."""
    pid_file = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        from fedmdh.deploy.watchdog import supervised
        outside = subprocess.Popen(["sleep", "300"], start_new_session=True)
        with supervised():
            child = subprocess.Popen([sys.executable, "-c",
                "import subprocess; p = subprocess.Popen(['sleep', '300'], start_new_session=True, "
                "stdout=subprocess.DEVNULL); print(p.pid)"], stdout=subprocess.PIPE, text=True)
            grandchild = int(child.communicate()[0])
            open({str(pid_file)!r}, "w").write(f"{{outside.pid}} {{grandchild}}")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    outside, grandchild = (int(x) for x in pid_file.read_text().split())
    procs = {p: (_stat(p)[2], "sleep") for p in (outside, grandchild) if _stat(p) is not None}
    try:
        t_end = time.monotonic() + 15
        while grandchild in _alive(procs) and time.monotonic() < t_end:
            time.sleep(0.2)
        assert grandchild not in _alive(procs), "the grandchild outlived its supervised parent"
        assert outside in _alive(procs), "a process started outside the supervised block was stopped"
    finally:
        _kill_left(procs)


# ---------------------------------------------------------------------- 2. a taken port


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_deploy_chain_on_a_taken_port_says_so_and_exits_2(tmp_path, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, err = _cli(["deploy", "chain", "--state", str(tmp_path / "chain-state.json"), "--port", str(port)],
                         capsys)
    assert code == 2
    assert f"127.0.0.1:{port} is taken" in _one_line(err) and "chain at" not in err


@pytest.mark.chain
@pytest.mark.slow
def test_a_chain_that_cannot_listen_is_not_taken_for_the_process_on_its_port(tmp_path, monkeypatch):
    """The port is taken after the check (a race): the started anvil exits, and start_anvil says so
    instead of taking the other process's answers for the chain's."""
    from fedmdh.deploy import processes
    from fedmdh.deploy.processes import ServiceError, Services, start_anvil

    _anvil_or_skip()
    monkeypatch.setattr(processes, "check_port_free", lambda *a, **k: None)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with Services(tmp_path / "logs") as services:
            with pytest.raises(ServiceError) as exc:
                start_anvil(services, port=port, state_file=tmp_path / "chain-state.json")
            assert all(not s.alive() for s in services.started)
    assert "the chain (anvil)" in str(exc.value) and "exited" in str(exc.value)


def test_deploy_coordinator_on_a_taken_port_says_so_and_exits_2(tmp_path, capsys):
    from fedmdh.deploy.certs import make_certs

    make_certs(tmp_path / "certs", hosts=("127.0.0.1",), nodes=())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, err = _cli(["deploy", "coordinator", "--certs", str(tmp_path / "certs"), "--port", str(port),
                          "--folder", str(tmp_path / "coord")], capsys)
    assert code == 2 and f"127.0.0.1:{port} is taken" in _one_line(err)


# ---------------------------------------------------------------------- 3. rerunning a failed trial


def _broken_anvil(tmp_path: Path, monkeypatch) -> None:
    """An anvil that cannot start (not executable): the trial fails after it wrote its certificates."""
    fake = tmp_path / "anvil"
    fake.write_text("not a program\n")
    fake.chmod(0o644)
    monkeypatch.setenv("FEDMDH_ANVIL", str(fake))


def _local(out: Path, perovskite, *extra: str) -> list[str]:
    return ["deploy", "local", "--out", str(out), "--target", "e_form", "--rounds", "2", "--institutions",
            *perovskite["institutions"], *extra]


def test_a_failed_trial_is_rerun_with_overwrite(perovskite, tmp_path, monkeypatch, capsys):
    # Prepare: a trial that failed after it wrote into --out
    _broken_anvil(tmp_path, monkeypatch)
    out = tmp_path / "trial"
    code, err = _cli(_local(out, perovskite), capsys)
    assert code == 2 and "cannot start anvil" in _one_line(err)
    first_ca = (out / "deploy" / "certs" / "ca.crt").read_bytes()
    # without --overwrite: refused, and the message names the way out
    code, err = _cli(_local(out, perovskite), capsys)
    assert code == 2 and "not an empty folder" in _one_line(err) and "--overwrite" in err
    # Execute: with --overwrite the folder is replaced and the trial starts again (and fails at anvil again)
    code, err = _cli(_local(out, perovskite, "--overwrite"), capsys)
    # Assert
    assert code == 2 and "cannot start anvil" in _one_line(err)
    assert (out / "deploy" / "certs" / "ca.crt").read_bytes() != first_ca  # a new trial's CA


def test_overwrite_never_deletes_a_folder_fedmdh_did_not_write(perovskite, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = _cli(_local(out, perovskite, "--overwrite"), capsys)
    assert code == 2 and "not written by fedmdh" in _one_line(err)
    assert (out / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(out)) == ["thesis.tex"]


def test_overwrite_of_a_folder_that_holds_an_input_is_refused(perovskite, tmp_path, monkeypatch, capsys):
    import shutil

    _broken_anvil(tmp_path, monkeypatch)
    out = tmp_path / "trial"
    assert _cli(_local(out, perovskite), capsys)[0] == 2  # a failed trial: fedmdh's folder
    inside = out / "mine.csv"
    shutil.copy(perovskite["institutions"][0], inside)
    files = [str(inside), *perovskite["institutions"][1:]]
    code, err = _cli(["deploy", "local", "--out", str(out), "--target", "e_form", "--rounds", "2", "--institutions",
                      *files, "--overwrite"], capsys)
    assert code == 2 and f"{inside}: is an input of this run" in _one_line(err)
    assert inside.is_file() and (out / "deploy" / "certs" / "ca.crt").is_file()


# ---------------------------------------------------------------------- 4. help and defaults


def _help(capsys, *cmd: str) -> str:
    capsys.readouterr()
    main([*cmd, "--help"])
    out = capsys.readouterr().out
    return " ".join(out.replace("│", " ").split())  # rich wraps the help in a box: compare as one line


@pytest.mark.parametrize("cmd", [("deploy", "run"), ("deploy", "local"), ("deploy", "resume"),
                                 ("deploy", "coordinator"), ("deploy", "certs"), ("node", "start")])
def test_deploy_help_has_no_stray_space_and_shows_defaults(capsys, cmd):
    text = _help(capsys, *cmd)
    assert " ." not in text and " ," not in text, text
    if cmd[1] in ("run", "local"):
        assert "Communication rounds. [default: 400]" in text and "Seed. [default: 0]" in text
        assert "[default: a majority]" in text
    if cmd[1] == "local":
        assert "--overwrite" in text
    if cmd[1] == "run":
        assert "relay key). [default: $FEDMDH_KEYSTORE, else $FEDMDH_HOME/keystore, else ~/.fedmdh/keystore]" in text
    if cmd[1] == "resume":
        assert "relay key). [default: the task's]" in text
    if cmd[1] == "coordinator":
        assert "[default: FOLDER/superlink.db]" in text


def test_deploy_run_records_the_default_keystore_that_honours_fedmdh_keystore(tmp_path, monkeypatch, capsys):
    from fedmdh import cli_deploy

    seen = {}

    def follow(superlink, ca, task, rounds):
        seen["task"] = task
        raise cli_deploy.InputError("stopped before submitting")

    monkeypatch.setattr(cli_deploy, "_follow", follow)
    monkeypatch.setenv("FEDMDH_KEYSTORE", str(tmp_path / "ks"))
    code, err = _cli(["deploy", "run", "--superlink", "127.0.0.1:1", "--root-certificates", str(tmp_path / "ca"),
                      "--chain-rpc", "http://127.0.0.1:1", "--out", str(tmp_path / "o"), "--nodes", "3",
                      "--target", "e_form", "--rounds", "2"], capsys)
    assert code == 2 and "stopped before submitting" in err
    assert seen["task"].keystore == str((tmp_path / "ks").resolve())
