"""The task service against a careful attacker and a clumsy user, over HTTP against a real ``fedmdh serve`` process.

The module's service runs with Python's recursion limit at 100,000, as it is once an embedded-ledger task has
imported the eth packages: a JSON document nested 200,000 deep then overflows the C stack of ``json.loads`` and
kills the process instead of raising. Each test sends what a client would (raw sockets where the point is what
the server reads) and checks the answer, the server's log and that the server is still alive.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from _service import ServiceProcess

TOKEN = "service-reliability-token-0123456789"
DEEP_LIMIT = "import sys; sys.setrecursionlimit(100000); "  # what importing the eth packages does


# ---------------------------------------------------------------------------------------------- helpers


def _csv(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "y": rng.normal(size=n)}).to_csv(
        index=False).encode()


def _uploads() -> list[tuple]:
    return [("institutions", ("A.csv", _csv(40, 1), "text/csv")), ("institutions", ("B.csv", _csv(40, 2), "text/csv")),
            ("test", ("T.csv", _csv(30, 3), "text/csv"))]


def _wait(api: httpx.Client, task_id: str, until, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = api.get(f"/api/tasks/{task_id}").json()
        if until(t):
            return t
        time.sleep(0.2)
    raise AssertionError(f"task {task_id}: {t}")


def _raw(service: ServiceProcess, head: str, body: bytes = b"", timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """Send ``head`` (request line and headers, without the blank line) and ``body``; the answer, read to the close."""
    host, port = service.url[len("http://"):].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        return _read_answer(s)


def _read_answer(s: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:n]


def _alive(service: ServiceProcess) -> None:
    assert service.proc is not None and service.proc.poll() is None, (
        f"fedmdh serve ended (status {service.proc.poll()}):\n" + "\n".join(service.lines[-20:]))
    assert httpx.get(service.url + "api/health", timeout=10).status_code == 200


def _no_traceback(service: ServiceProcess) -> None:
    assert not any("Traceback" in ln for ln in service.lines), "\n".join(service.lines)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = ServiceProcess(tmp_path_factory.mktemp("service-reliability") / "service", TOKEN, "--max-upload-mb", "20",
                         prelude=DEEP_LIMIT).start()
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module")
def api(service):
    with service.client() as client:
        yield client


@pytest.fixture(scope="module")
def task(api) -> dict:
    """A finished 3-round task on uploaded files, ledger off."""
    r = api.post("/api/tasks", files=_uploads(), data={"target": "y", "rounds": "3", "ledger": "off"})
    assert r.status_code == 201, r.text
    return _wait(api, r.json()["id"], lambda t: t["status"] in ("finished", "failed", "interrupted"))


# ---------------------------------------------------------------------------------------------- one service per folder


def test_a_second_service_on_the_same_folder_is_refused_and_names_the_first(tmp_path):
    folder = tmp_path / "service"
    first = ServiceProcess(folder, TOKEN).start()
    second = None
    try:
        with first.client() as c:
            r = c.post("/api/tasks", files=_uploads(), data={"target": "y", "rounds": "100000", "ledger": "off"})
            tid = r.json()["id"]
            _wait(c, tid, lambda t: t["status"] == "running" and t["round"] >= 2)
            # Execute: a second service on the same folder (another port)
            second = subprocess.Popen(
                [sys.executable, "-c", "from fedmdh.cli import main; main()", "serve", "--port", "0", "--folder",
                 str(folder), "--token-file", str(first.token_file)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                out, err = second.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(second.pid, signal.SIGKILL)
                second.wait(10)
                raise AssertionError("the second fedmdh serve started on the folder the first one serves") from None
            # Verify: one line naming the holder (PID and address), exit 2, the store untouched
            assert second.returncode == 2, (out, err)
            assert "Traceback" not in err and out == ""
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith(f"error: {folder.resolve()}: another fedmdh serve uses this "
                                                          f"folder (PID {first.proc.pid} on "), err
            assert f", at {first.url}); stop it first, or give this one another --folder." in lines[0]
            t = c.get(f"/api/tasks/{tid}").json()
            assert t["status"] == "running" and t["error"] is None  # not marked interrupted under the first one
            time.sleep(1.0)
            assert c.get(f"/api/tasks/{tid}").json()["round"] > t["round"]  # and still training
            with sqlite3.connect(folder / "tasks.sqlite3") as con:
                assert con.execute("SELECT status FROM tasks WHERE id=?", (tid,)).fetchone() == ("running",)
    finally:
        assert first.stop() == 0
    # the lock goes with the service: the folder can be served again
    again = ServiceProcess(folder, TOKEN).start()
    assert again.stop() == 0


# ---------------------------------------------------------------------------------------------- nested JSON


def test_a_deeply_nested_json_body_is_refused_and_the_service_lives(service, api):
    deep = b"[" * 200_000 + b"]" * 200_000
    # Execute: with a Content-Length, sent in chunks (no Content-Length), and inside a task's field
    r = api.post("/api/tasks", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("the request body is JSON nested more than 64 levels deep (at least "), r.text
    _alive(service)
    r = api.post("/api/tasks", content=iter([deep[:150_000], deep[150_000:]]),
                 headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 422 and "nested more than 64 levels deep" in r.json()["detail"]
    _alive(service)
    nested = b'{"institutions": ' + b"[" * 100_000 + b"]" * 100_000 + b', "target": "y"}'
    r = api.post("/api/tasks", content=nested, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "nested more than 64 levels deep" in r.json()["detail"]
    # Verify: the server is alive and still takes a task as JSON
    _alive(service)
    r = api.post("/api/tasks", json={"institutions": ["/nonexistent/a.csv", "/nonexistent/b.csv"],
                                     "test": "/nonexistent/t.csv", "target": "y"})
    assert r.status_code == 422 and r.json()["detail"].startswith("/nonexistent/a.csv: file not found")
    _no_traceback(service)


def test_a_store_altered_to_deep_json_is_one_line_not_a_crash(tmp_path):
    from fedmdh.service.store import TaskStore

    folder = tmp_path / "service"
    folder.mkdir()
    store = TaskStore(folder)
    store.add("0123456789ab", {"rounds": 3}, None)
    store.close()
    with sqlite3.connect(folder / "tasks.sqlite3") as con:
        con.execute("UPDATE tasks SET status='finished', spec=? WHERE id='0123456789ab'",
                    ("[" * 200_000 + "]" * 200_000,))
    svc = ServiceProcess(folder, TOKEN, prelude=DEEP_LIMIT).start()
    try:
        with svc.client() as c:
            for path in ("/api/tasks", "/api/tasks/0123456789ab"):
                r = c.get(path)
                assert r.status_code == 500, r.text
                assert r.json()["detail"].startswith("the task store holds an unreadable task 0123456789ab (JSON "
                                                     "nested more than 64 levels deep")
            _alive(svc)
    finally:
        assert svc.stop() == 0


# ---------------------------------------------------------------------------------------------- Last-Event-ID


@pytest.mark.parametrize("value", [b"9" * 40, b"\xb2", b"1\xb9", b"12\xff", b"-1", b"1.5", b"0x10"],
                         ids=["40-digits", "superscript-two", "one-superscript-one", "non-utf8", "negative", "decimal",
                              "hex"])
def test_a_last_event_id_that_is_not_a_round_number_is_a_400(service, api, task, value):
    r = api.get(f"/api/tasks/{task['id']}/events", headers={"Last-Event-ID": value})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("Last-Event-ID ") and detail.endswith(
        "is not the id of an event of this stream (a round number, ASCII digits, at most 9); send the last id "
        "received, or none.")
    assert len(detail) < 300
    _alive(service)
    _no_traceback(service)


def test_a_valid_last_event_id_resumes_after_that_round(api, task):
    assert task["status"] == "finished", task
    with api.stream("GET", f"/api/tasks/{task['id']}/events", headers={"Last-Event-ID": "2"}) as r:
        assert r.status_code == 200
        ids = [int(ln[4:]) for ln in r.iter_lines() if ln.startswith("id: ")]
    assert ids == [3]


# ---------------------------------------------------------------------------------------------- body sizes


def test_an_anonymous_login_over_the_limit_is_refused_before_its_body_is_read(service):
    # Execute: 300 MB declared, nothing sent yet: the answer comes from the headers alone
    status, headers, body = _raw(service, "POST /login HTTP/1.1\r\nHost: x\r\n"
                                          "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 300000000")
    assert status == 413 and headers.get("connection") == "close"
    assert httpx.Response(413, content=body).json()["detail"] == (
        "the request body is 300.0 MB, over the 16.0 kB a request without the service's token may carry.")
    # a chunked body (no Content-Length) is counted as it comes: refused long before 300 MB have gone
    host, port = service.url[len("http://"):].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 16) + b"a" * (1 << 16) + b"\r\n"
        sent = 0
        try:
            while sent < 300_000_000:
                if select.select([s], [], [], 0)[0]:
                    break  # the server answered
                s.sendall(chunk)
                sent += 1 << 16
        except OSError:  # the server closed the connection under us
            pass
        status, headers, body = _read_answer(s)
    assert sent < 50_000_000, sent
    assert status == 413 and headers.get("connection") == "close"
    assert httpx.Response(413, content=body).json()["detail"] == (
        "the request body is over the 16.0 kB a request without the service's token may carry.")
    # a task request without the token is a 401 without its body read (and its connection closed)
    status, headers, body = _raw(service, "POST /api/tasks HTTP/1.1\r\nHost: x\r\n"
                                          "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 300000000")
    assert status == 401 and headers.get("connection") == "close"
    # the sign-in form itself still works
    r = httpx.post(service.url + "login", data={"token": "wrong-token-wrong-token", "next": "/"})
    assert r.status_code == 401
    r = httpx.post(service.url + "login", data={"token": TOKEN, "next": "/"})
    assert r.status_code == 303 and "fedmdh_session" in r.cookies
    _alive(service)
    _no_traceback(service)


def test_a_signed_in_json_body_over_its_limit_is_refused_before_it_is_read(service, api):
    status, headers, body = _raw(service, f"POST /api/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                          "Content-Type: application/json\r\nContent-Length: 20000000")
    assert status == 413 and headers.get("connection") == "close"
    assert httpx.Response(413, content=body).json()["detail"] == (
        "the request body is 20.0 MB, over the 1.0 MB a request other than an upload form may carry.")
    big = b'{"target": "' + b"x" * 2_000_000 + b'"}'
    r = api.post("/api/tasks", content=iter([big[:1_000_000], big[1_000_000:]]),
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == (
        "the request body is over the 1.0 MB a request other than an upload form may carry.")
    status, _, body = _raw(service, f"POST /api/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                    "Content-Type: application/json\r\nContent-Length: 12abc")
    assert status == 400
    _alive(service)
    _no_traceback(service)


# ---------------------------------------------------------------------------------------------- CSV columns


def _wide(columns: int, rows: int, seed: int) -> bytes:
    header = ",".join(f"c{i}" for i in range(columns))
    rng = np.random.default_rng(seed)
    body = "\n".join(",".join(str(v) for v in rng.integers(0, 9, columns)) for _ in range(rows))
    return (header + "\n" + body + "\n").encode()


def test_a_csv_with_too_many_columns_is_refused_from_its_header(service, api):
    files = [("institutions", ("a.csv", _wide(10_001, 12, 1), "text/csv")),
             ("institutions", ("b.csv", _wide(10_001, 12, 2), "text/csv")),
             ("test", ("t.csv", _wide(10_001, 12, 3), "text/csv"))]
    t0 = time.monotonic()
    r = api.post("/api/tasks", files=files, data={"target": "c0", "ledger": "off"})
    assert (r.status_code, r.json()) == (422, {
        "detail": "a.csv: has 10,001 columns; fedmdh reads tables of at most 10,000: keep the columns you need.",
        "field": "institutions"})
    # a million columns: the header line alone is over its bound
    million = ("," .join(f"c{i}" for i in range(1_000_001)) + "\n").encode()
    files[0] = ("institutions", ("a.csv", million + million.replace(b"c", b"1")[:2_000_000], "text/csv"))
    r = api.post("/api/tasks", files=files, data={"target": "c0", "ledger": "off"})
    assert r.status_code == 422 and r.json()["detail"] == (
        "a.csv: the header line is longer than 1,000,000 bytes; fedmdh reads tables of at most 10,000 columns: keep "
        "the columns you need.")
    assert time.monotonic() - t0 < 30  # on d465001: 202 s of CPU and 1.7 GB for the million columns
    _alive(service)


def test_the_cli_refuses_a_csv_with_too_many_columns(tmp_path, capsys):
    from fedmdh.cli import main

    paths = []
    for i, name in enumerate(("A", "B", "T")):
        p = tmp_path / f"{name}.csv"
        p.write_bytes(_wide(10_001, 12, i))
        paths.append(str(p))
    with pytest.raises(SystemExit) as exc:
        main(["run", "--institutions", paths[0], paths[1], "--test", paths[2], "--target", "c0", "--rounds", "2",
              "--ledger", "off", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [
        f"error: {paths[0]}: has 10,001 columns; fedmdh reads tables of at most 10,000: keep the columns you need."]


# ---------------------------------------------------------------------------------------------- field lengths


@pytest.mark.parametrize("field,value,limit", [
    ("target", "x" * 500_000, 256),
    ("algorithm", "fedavg" * 100, 256),
    ("ledger", "e" * 1000, 256),
    ("chain_rpc", "http://" + "h" * 10_000, 4096),
    ("rounds", "9" * 50, 32),
    ("seed", "1" * 100, 32),
])
def test_a_long_field_is_refused_without_echoing_it(service, api, field, value, limit):
    body = {"institutions": ["/nonexistent/a.csv", "/nonexistent/b.csv"], "test": "/nonexistent/t.csv", "target": "y",
            field: value}
    if field == "chain_rpc":
        body["ledger"] = "rpc"
    r = api.post("/api/tasks", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text[:300]
    detail = r.json()["detail"]
    assert detail.startswith(f"{field} is {len(value):,} characters long; the service takes at most {limit:,} (got "
                             f"{value[:40]!r}... ({len(value):,} characters)).")
    assert len(r.content) < 500


def test_long_names_paths_and_keys_are_refused_without_echoing_them(service, api):
    base = {"institutions": ["/nonexistent/a.csv", "/nonexistent/b.csv"], "test": "/nonexistent/t.csv", "target": "y"}
    cases = [
        ({**base, "exclude": ["a", "z" * 300_000]}, "exclude", "exclude is 300,000 characters long"),
        ({**base, "exclude": ",".join(["c"] * 20_000)}, "exclude", "exclude names 20,000 columns; a table has at most"),
        ({**base, "institutions": ["/" + "p" * 100_000, "/b.csv"]}, "institutions",
         "institutions is 100,001 characters (a file's name or path) long"),
        ({**base, "k" * 100_000: 1}, "k" * 256, "unknown field 'kkkk"),
    ]
    for body, field, start in cases:
        r = api.post("/api/tasks", json=body)
        assert r.status_code == 422 and r.json()["field"] == field and r.json()["detail"].startswith(start), r.text[:300]
        assert len(r.content) < 1000
    # a 20 MB target: over the size of any JSON task, refused before it is read
    r = api.post("/api/tasks", json={**base, "target": "x" * 20_000_000})
    assert r.status_code == 413 and len(r.content) < 500
    # in a form, a field's value is bounded as well
    r = api.post("/api/tasks", files=_uploads(), data={"target": "t" * 100_000, "ledger": "off"})
    assert r.status_code == 422 and r.json()["detail"].startswith("target is 100,000 characters long")
    assert len(r.content) < 500
    _alive(service)
    _no_traceback(service)
