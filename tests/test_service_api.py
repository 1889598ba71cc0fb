"""The task service's REST API, over HTTP against a real ``fedmdh serve`` process, on the perovskite split.

One service process serves the module (a module-scoped fixture); the restart test starts and stops its
own on a folder of its own. Every check reads what a client would: status codes, JSON, the SSE stream,
the zip; results are compared with the library (``run_experiment``, ``load_model``) and the CLI's
messages with the CLI's own output.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import re
import signal
import sqlite3
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _service import ServiceProcess

TOKEN = "service-api-test-token-0123456789"
FINAL = ("finished", "failed", "interrupted")


# ---------------------------------------------------------------------------------------------- helpers


def wait_for(api, task_id: str, until=lambda t: t["status"] in FINAL, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = api.get(f"/api/tasks/{task_id}").json()
        if until(t):
            return t
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} did not get there in {timeout} s: {t['status']} round {t['round']}")


def read_events(api, task_id: str, limit: int | None = None, headers: dict | None = None) -> list[tuple]:
    """The task's server-sent events as (event, id, data) until ``end`` (or ``limit`` events)."""
    out: list[tuple] = []
    with api.stream("GET", f"/api/tasks/{task_id}/events", headers=headers or {}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event, eid, data = None, None, None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                eid = int(line[4:])
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and event is not None:
                out.append((event, eid, data))
                if event == "end" or (limit is not None and len(out) >= limit):
                    break
                event, eid, data = None, None, None
    return out


def uploads(paths: list[str], test: str) -> list[tuple]:
    files = [("institutions", (Path(p).name, Path(p).read_bytes(), "text/csv")) for p in paths]
    return files + [("test", (Path(test).name, Path(test).read_bytes(), "text/csv"))]


def cli_error(capsys, args: list[str]) -> str:
    """The one line ``fedmdh ARGS`` prints for a user error (exit status 2)."""
    from fedmdh.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, when it got that far
    assert err.startswith("error: "), err
    return err[len("error: "):]


# ---------------------------------------------------------------------------------------------- fixtures


def opener(folder: Path) -> tuple[dict[str, str], Path]:
    """A $BROWSER for Python's webbrowser module that writes the address it is asked to open to a file."""
    script, record = folder / "open-browser", folder / "opened.txt"
    script.write_text(f"#!/bin/sh\necho \"$1\" >> {record}\n")
    script.chmod(0o755)
    return {"BROWSER": str(script)}, record


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    base = tmp_path_factory.mktemp("service-api")
    env, opened = opener(base)
    svc = ServiceProcess(base / "service", TOKEN, "--max-upload-mb", "5", env=env).start()
    yield svc
    assert svc.stop() == 0
    assert not opened.exists(), "fedmdh serve opened a browser without --open"


@pytest.fixture(scope="module")
def api(service):
    with service.client() as client:
        yield client


@pytest.fixture(scope="module")
def finished(api, perovskite):
    """A 20-round fedavg task on uploaded files, with the embedded ledger, followed over SSE to its end."""
    r = api.post("/api/tasks", files=uploads(perovskite["institutions"], perovskite["test"]),
                 data={"target": "e_form", "algorithm": "fedavg", "rounds": "20", "seed": "0"})
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    assert r.headers["location"] == f"/api/tasks/{task_id}"
    first = api.get(f"/api/tasks/{task_id}").json()
    events = read_events(api, task_id)
    return {"id": task_id, "first": first, "events": events, "task": api.get(f"/api/tasks/{task_id}").json()}


@pytest.fixture(scope="module")
def ledger_off(api, perovskite):
    """A 5-round task given by server paths (JSON), with the ledger off."""
    r = api.post("/api/tasks", json={"institutions": perovskite["institutions"], "test": perovskite["test"],
                                     "target": "e_form", "rounds": 5, "ledger": "off"})
    assert r.status_code == 201, r.text
    return wait_for(api, r.json()["id"])


# ---------------------------------------------------------------------------------------------- service


def test_health_and_openapi_need_no_token(service):
    import httpx

    health = httpx.get(service.url + "api/health")
    assert health.status_code == 200 and health.json()["runtime"] == "simulator"
    spec = httpx.get(service.url + "openapi.json").json()
    assert set(spec["paths"]) == {
        "/api/health", "/api/tasks", "/api/tasks/{task_id}", "/api/tasks/{task_id}/events",
        "/api/tasks/{task_id}/ledger", "/api/tasks/{task_id}/verify", "/api/tasks/{task_id}/model",
        "/api/tasks/{task_id}/predict", "/api/tasks/{task_id}/resume"}
    body = spec["paths"]["/api/tasks"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert httpx.get(service.url + "docs").status_code == 404  # its page would load scripts from a CDN


def test_service_prints_its_loopback_address_and_keeps_a_database(service):
    assert service.url.startswith("http://127.0.0.1:")
    assert any(line.startswith(f"fedmdh service on {service.url}") for line in service.lines)
    db = service.folder / "tasks.sqlite3"
    with sqlite3.connect(db) as con:
        assert {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {"tasks", "rounds"}


def test_open_opens_the_signed_in_page(tmp_path):
    env, opened = opener(tmp_path)
    svc = ServiceProcess(tmp_path / "service", TOKEN, "--open", env=env).start()
    try:
        deadline = time.monotonic() + 30
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert opened.read_text().split() == [f"{svc.url}login?token={TOKEN}"]
    finally:
        assert svc.stop() == 0


# ---------------------------------------------------------------------------------------------- auth

ENDPOINTS = [("GET", "/api/tasks"), ("POST", "/api/tasks"), ("GET", "/api/tasks/x"), ("GET", "/api/tasks/x/events"),
             ("GET", "/api/tasks/x/ledger"), ("POST", "/api/tasks/x/verify"), ("GET", "/api/tasks/x/model"),
             ("POST", "/api/tasks/x/predict"), ("POST", "/api/tasks/x/resume")]


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", "Basic " + TOKEN, TOKEN])
def test_every_task_endpoint_needs_the_token(service, method, path, header):
    import httpx

    r = httpx.request(method, service.url + path.lstrip("/"), headers={"Authorization": header} if header else {})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"].startswith(f"this service needs its token (it is in {service.token_file})")


def test_sign_in_sets_a_session_cookie_that_refuses_other_sites(service):
    import httpx

    with httpx.Client(base_url=service.url, follow_redirects=False) as c:
        page = c.get("/")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/"
        assert c.get("/login?token=not-the-token").status_code == 401
        assert c.post("/login", data={"token": "not-the-token", "next": "/"}).status_code == 401
        ok = c.post("/login", data={"token": TOKEN, "next": "//elsewhere.example/"})
        assert ok.status_code == 303 and ok.headers["location"] == "/"  # no open redirect
        for away in ("/\\elsewhere.example", "https://elsewhere.example/"):
            assert c.post("/login", data={"token": TOKEN, "next": away}).headers["location"] == "/"
        assert c.post("/login", data={"token": TOKEN, "next": "/tasks/abc"}).headers["location"] == "/tasks/abc"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        assert c.get("/api/tasks").status_code == 200
        assert c.get("/").status_code == 200
        cross = c.post("/api/tasks", json={}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403 and "cross-site request from http://evil.example refused" in cross.json()["detail"]
        same = c.post("/api/tasks", json={}, headers={"Origin": service.url.rstrip("/")})
        assert same.status_code == 422  # past the token, into validation
        c.post("/logout")
        assert c.get("/api/tasks").status_code == 401


# ---------------------------------------------------------------------------------------------- a task


def test_task_runs_to_the_library_result(finished, perovskite, perovskite_fed, tmp_path):
    from fedmdh.config import ExperimentConfig
    from fedmdh.experiment.runner import run_experiment
    from fedmdh.ledger.options import LedgerOptions

    t = finished["task"]
    assert finished["first"]["status"] in ("queued", "running")
    assert t["status"] == "finished" and t["round"] == t["rounds"] == 20 and t["error"] is None
    assert [m["round"] for m in t["metrics"]] == list(range(1, 21))
    assert t["institutions"] == ["train_part0", "train_part1", "train_part2"]
    assert t["files"] == {f"train_part{i}": f"train_part{i}.csv" for i in range(3)}  # the uploads' own names
    # the same run through the library, as `fedmdh run` makes it
    cfg = ExperimentConfig(institutions=tuple(perovskite["institutions"]), test=perovskite["test"], target="e_form",
                           algorithms=("fedavg",), seeds=1, rounds=20)
    ref = run_experiment(cfg, "fedavg", tmp_path / "ref", ledger=LedgerOptions(mode="off"))
    assert t["final"]["best_round"] == ref.best_round
    assert t["final"]["rmse"] == pytest.approx(ref.final["rmse"], abs=1e-12)
    assert t["final"]["r2"] == pytest.approx(ref.final["r2"], abs=1e-12)
    for name, m in ref.final_per_institution.items():
        assert t["per_institution"][name]["rmse"] == pytest.approx(m["rmse"], abs=1e-12)
    assert [m["rmse"] for m in t["metrics"]] == pytest.approx([r.rmse for r in ref.history], abs=1e-12)


def test_task_reports_the_federations_heterogeneity(finished, perovskite_fed, perovskite_tables):
    t = finished["task"]
    het = perovskite_fed.heterogeneity
    assert t["heterogeneity"] == pytest.approx({"H": het.H, "alpha": het.alpha, "KL_avg": het.KL_avg}, abs=1e-12)
    assert t["heterogeneity"] == pytest.approx({"H": 0.9589, "alpha": 1.3816, "KL_avg": 1.0603}, abs=5e-5)
    hist = t["federation"]["label_histogram"]
    tables, _ = perovskite_tables
    assert len(hist["edges"]) == 21
    pooled = np.concatenate([tb.y for tb in tables])
    assert hist["edges"][0] == pytest.approx(pooled.min()) and hist["edges"][-1] == pytest.approx(pooled.max())
    for tb in tables:
        assert sum(hist["counts"][tb.name]) == tb.n_rows
        assert hist["counts"][tb.name] == np.histogram(tb.y, np.asarray(hist["edges"]))[0].tolist()
    assert hist["pooled"] == list(np.sum([hist["counts"][tb.name] for tb in tables], axis=0))


def test_events_stream_every_round_then_the_end(finished, api):
    events = finished["events"]
    rounds = [e for e in events if e[0] == "round"]
    assert [e[1] for e in rounds] == list(range(1, 21))  # SSE ids: the round numbers, in order
    assert all(e[2]["round"] == e[1] and e[2]["rounds"] == 20 and "rmse" in e[2] for e in rounds)
    assert events[-1][0] == "end" and events[-1][2]["status"] == "finished"
    stored = finished["task"]["metrics"]
    assert [e[2]["rmse"] for e in rounds] == [m["rmse"] for m in stored]
    # a client that reconnects after round 17 gets only what it missed
    again = read_events(api, finished["id"], headers={"Last-Event-ID": "17"})
    assert [e[1] for e in again if e[0] == "round"] == [18, 19, 20] and again[-1][0] == "end"


def test_task_list_has_every_task_without_round_metrics(finished, api):
    tasks = api.get("/api/tasks").json()["tasks"]
    mine = next(t for t in tasks if t["id"] == finished["id"])
    assert "metrics" not in mine
    assert mine["status"] == "finished" and mine["latest"]["round"] == 20
    assert mine["final"]["rmse"] == finished["task"]["final"]["rmse"]


# ---------------------------------------------------------------------------------------------- ledger


def test_ledger_shows_every_round(finished, api, service):
    from fedmdh.audit import show

    r = api.get(f"/api/tasks/{finished['id']}/ledger")
    assert r.status_code == 200
    led = r.json()
    assert led["task"]["algorithm"] == "fedavg" and led["task"]["rounds"] == 20 and led["task"]["chain"] == "embedded"
    assert set(led["participants"]) == {"train_part0", "train_part1", "train_part2"}
    assert [x["round"] for x in led["rounds"]] == list(range(1, 21))
    for x in led["rounds"]:
        assert set(x["commitments"]) == set(led["participants"]) and x["finalized"] and x["gas"] > 0
    assert led["archive"]["model_hash"].startswith("0x")
    direct = show(service.folder / "tasks" / finished["id"] / "run")  # what `fedmdh ledger show` reads
    assert led["rounds"] == json.loads(json.dumps(direct["rounds"])) and led["total_gas"] == direct["total_gas"]


def test_verify_says_ok_and_catches_an_altered_update(finished, api, service):
    r = api.post(f"/api/tasks/{finished['id']}/verify")
    assert r.status_code == 200
    v = r.json()
    assert v["ok"] is True and v["message"].startswith("OK: 20 of 20 rounds finalized and verified; archived model ")
    assert v["rounds_verified"] == 20 and any(n.startswith("covered:") and "models/" in n for n in v["notes"])
    # alter one stored update of round 7: the same check must fail there
    led = api.get(f"/api/tasks/{finished['id']}/ledger").json()
    digest = led["rounds"][6]["commitments"]["train_part1"]["update_hash"][2:]
    blob = service.folder / "tasks" / finished["id"] / "run" / "ledger" / "blobs" / digest
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        bad = api.post(f"/api/tasks/{finished['id']}/verify").json()
    finally:
        blob.write_bytes(original)
    assert bad["ok"] is False
    assert bad["message"].startswith("FAILED: round 7, institution train_part1: update blob")
    assert "altered" in bad["message"]
    assert api.post(f"/api/tasks/{finished['id']}/verify").json()["ok"] is True


def test_ledger_of_a_task_without_one_is_a_conflict(ledger_off, api):
    assert ledger_off["status"] == "finished"
    for method, path in (("GET", "ledger"), ("POST", "verify")):
        r = api.request(method, f"/api/tasks/{ledger_off['id']}/{path}")
        assert r.status_code == 409
        assert r.json()["detail"] == f"task {ledger_off['id']} was run with the ledger off: it has no ledger."


# ---------------------------------------------------------------------------------------------- model and predict


def test_model_zip_matches_the_archived_hashes(finished, api, service, perovskite, tmp_path):
    from fedmdh.models import load_model

    r = api.get(f"/api/tasks/{finished['id']}/model")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == f'attachment; filename="fedmdh-{finished["id"]}-models.zip"'
    z = zipfile.ZipFile(io.BytesIO(r.content))
    manifest = json.loads(z.read("MANIFEST.json"))
    led = api.get(f"/api/tasks/{finished['id']}/ledger").json()
    digest = led["archive"]["model_hash"][2:]
    assert manifest["model_hash"] == r.headers["x-fedmdh-model-hash"] == digest
    # the archive's own manifest, a blob whose sha256 is the on-chain hash
    blob = (service.folder / "tasks" / finished["id"] / "run" / "ledger" / "blobs" / digest).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == digest
    archived = json.loads(blob)["files"]
    names = sorted(n for n in z.namelist() if n != "MANIFEST.json")
    assert names == sorted(rel.removeprefix("models/") for rel in archived)
    for rel, h in archived.items():
        assert hashlib.sha256(z.read(rel.removeprefix("models/"))).hexdigest() == h == manifest["files"][
            rel.removeprefix("models/")]
    z.extractall(tmp_path / "models")
    model = load_model(tmp_path / "models" / "train_part2")
    rows = pd.read_csv(perovskite["test"]).head(8)
    got = api.post(f"/api/tasks/{finished['id']}/predict", data={"institution": "train_part2"},
                   files={"file": ("rows.csv", rows.to_csv(index=False).encode(), "text/csv")})
    assert got.status_code == 200
    pred = pd.read_csv(io.StringIO(got.text))["predicted_e_form"].to_numpy()
    assert pred == pytest.approx(model.predict(rows), abs=1e-9)


def test_model_of_a_task_without_ledger_says_it_is_not_archived(ledger_off, api):
    r = api.get(f"/api/tasks/{ledger_off['id']}/model")
    assert r.status_code == 200 and "x-fedmdh-model-hash" not in r.headers
    z = zipfile.ZipFile(io.BytesIO(r.content))
    manifest = json.loads(z.read("MANIFEST.json"))
    assert manifest["model_hash"] is None and "ledger off" in manifest["verified"]
    assert {n.split("/")[0] for n in z.namelist() if n != "MANIFEST.json"} == set(ledger_off["institutions"])


def test_predict_returns_the_rows_with_predictions(finished, api, service, perovskite, capsys, tmp_path):
    rows = pd.read_csv(perovskite["test"]).head(10)
    r = api.post(f"/api/tasks/{finished['id']}/predict", data={"institution": "train_part0"},
                 files={"file": ("new materials.csv", rows.to_csv(index=False).encode(), "text/csv")})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == 'attachment; filename="predictions_train_part0_new_materials.csv"'
    out = pd.read_csv(io.StringIO(r.text))
    assert list(out.columns) == [*rows.columns, "predicted_e_form"] and len(out) == 10
    # `fedmdh predict` with the task's run folder gives the same numbers
    from fedmdh.cli import main

    rows.to_csv(tmp_path / "in.csv", index=False)
    main(["predict", "--model", str(service.folder / "tasks" / finished["id"] / "run"), "--institution",
          "train_part0", str(tmp_path / "in.csv"), str(tmp_path / "out.csv")])
    cli = pd.read_csv(tmp_path / "out.csv")
    assert out["predicted_e_form"].to_numpy() == pytest.approx(cli["predicted_e_form"].to_numpy(), abs=1e-12)
    # the predictions track the truth (a trained model, not noise)
    assert np.corrcoef(out["predicted_e_form"], rows["e_form"])[0, 1] > 0.5


def test_predict_refuses_bad_requests_with_one_line(finished, api, perovskite, capsys, tmp_path):
    tid = finished["id"]
    url = f"/api/tasks/{tid}/predict"
    rows = pd.read_csv(perovskite["test"]).head(5)
    good = ("rows.csv", rows.to_csv(index=False).encode(), "text/csv")

    def post(data, files):
        r = api.post(url, data=data, files=files)
        return r.status_code, r.json().get("field"), r.json()["detail"]

    assert post({}, {"file": good}) == (
        422, "institution", "missing institution; choose whose model predicts: train_part0, train_part1, train_part2.")
    assert post({"institution": "lab9"}, {"file": good}) == (
        422, "institution", f"task {tid} has no model for institution 'lab9'; choose one of: train_part0, "
                            "train_part1, train_part2.")
    assert post({"institution": "train_part0"}, {"other": good}) == (
        422, "file", "missing file; upload a CSV of new materials in that institution's columns.")
    status, field, detail = post({"institution": "train_part0"}, {"file": ("blob.csv", b"\x00\x01binary", "text/csv")})
    assert (status, field) == (422, "file")
    # the CLI's own line for that file, with the upload named as the user named it
    (tmp_path / "blob.csv").write_bytes(b"\x00\x01binary")
    assert detail == f"{tmp_path / 'blob.csv'}: is not a CSV file (it contains binary data); export the table as CSV." \
        .replace(str(tmp_path / "blob.csv"), "blob.csv")
    status, field, detail = post({"institution": "train_part0"},
                                 {"file": ("few.csv", rows.drop(columns=["mu_b"]).to_csv(index=False).encode(), "text/csv")})
    assert (status, field) == (422, "file")
    assert detail == "few.csv: lacks column 'mu_b' of institution train_part0; give the institution's own columns."
    r = api.post(url, json={"institution": "train_part0"})
    assert r.status_code == 415


# ---------------------------------------------------------------------------------------------- validation


def _json_case(perovskite, tmp_path, name):
    """(request body changes, CLI arguments changes, expected field) of each case, on server paths."""
    insts, test = list(perovskite["institutions"]), perovskite["test"]
    frame = pd.read_csv(test)
    if name == "test lacks a column":
        frame.drop(columns=["beta"]).to_csv(tmp_path / "test_nobeta.csv", index=False)
        return {"test": str(tmp_path / "test_nobeta.csv")}, "test"
    if name == "test lacks the target":
        frame.drop(columns=["e_form"]).to_csv(tmp_path / "test_notarget.csv", index=False)
        return {"test": str(tmp_path / "test_notarget.csv")}, "test"
    if name == "non-numeric feature":
        part = pd.read_csv(insts[1])
        part["mu_b"] = part["mu_b"].astype(object)
        part.loc[4, "mu_b"] = "n/a?"
        part.to_csv(tmp_path / "train_part1.csv", index=False)
        return {"institutions": [insts[0], str(tmp_path / "train_part1.csv"), insts[2]]}, "institutions"
    return {
        "unknown algorithm": ({"algorithm": "fedsgd"}, "algorithm"),
        "zero rounds": ({"rounds": 0}, "rounds"),
        "unknown ledger": ({"ledger": "paper"}, "ledger"),
        "rpc ledger without a node": ({"ledger": "rpc"}, "chain_rpc"),
        "target not a column": ({"target": "band_gap"}, "institutions"),
        "one institution": ({"institutions": insts[:1]}, "institutions"),
        "missing file": ({"institutions": [insts[0], "/nonexistent/lab_b.csv"]}, "institutions"),
    }[name]


CLI_CASES = ["unknown algorithm", "zero rounds", "unknown ledger", "rpc ledger without a node", "target not a column",
             "one institution", "missing file", "test lacks a column", "test lacks the target", "non-numeric feature"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_validation_errors_are_the_clis_lines(case, api, perovskite, capsys, tmp_path, service):
    before = {p.name for p in (service.folder / "tasks").iterdir()}
    change, field = _json_case(perovskite, tmp_path, case)
    body = {"institutions": perovskite["institutions"], "test": perovskite["test"], "target": "e_form",
            "algorithm": "fedavg", "rounds": 20, **change}
    r = api.post("/api/tasks", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    args = ["run", "--out", str(tmp_path / "out"), "--institutions", *body["institutions"], "--test", body["test"],
            "--target", body["target"], "--algorithm", body["algorithm"], "--rounds", str(body["rounds"])]
    if "ledger" in body:
        args += ["--ledger", body["ledger"]]
    # the CLI names its option ("--algorithm: ..."), the API the field (in "field"): the rest is the same line
    assert r.json()["detail"] == re.sub(r"^--[a-z-]+: ", "", cli_error(capsys, args))
    assert {p.name for p in (service.folder / "tasks").iterdir()} == before  # nothing kept of a refused request


def test_upload_errors_name_the_uploaded_file(api, perovskite, capsys, tmp_path, service):
    before = {p.name for p in (service.folder / "tasks").iterdir()}
    insts, test = perovskite["institutions"], perovskite["test"]
    files = uploads(insts, test)
    # a binary file among the institutions: the CLI's line for it, named as uploaded
    bad = files[:1] + [("institutions", ("../../etc/lab b?.csv", b"\x00\x00PK binary", "text/csv"))] + files[1:]
    r = api.post("/api/tasks", files=bad, data={"target": "e_form", "rounds": "5"})
    assert r.status_code == 422 and r.json()["field"] == "institutions"
    (tmp_path / "x.csv").write_bytes(b"\x00\x00PK binary")
    line = cli_error(capsys, ["run", "--out", str(tmp_path / "o"), "--institutions", str(tmp_path / "x.csv"), insts[1],
                              "--test", test, "--target", "e_form"])
    assert r.json()["detail"] == line.replace(str(tmp_path / "x.csv"), "../../etc/lab b?.csv")
    # the stored copy of such an upload never escapes the task's folder, and a refused one is removed
    assert {p.name for p in (service.folder / "tasks").iterdir()} == before
    # an upload over the limit (5 MB here) is refused with its name
    big = files[:2] + [("institutions", ("huge.csv", b"a,b\n" + b"1,2\n" * 1_600_000, "text/csv"))] + files[2:]
    r = api.post("/api/tasks", files=big, data={"target": "e_form"})
    assert r.status_code == 413
    assert r.json()["detail"] == ("huge.csv: is 6.4 MB, over the service's upload limit of 5 MB per file; send a "
                                  "smaller file or start the service with a larger --max-upload-mb.")
    # a test file that is not the right table: the field is the test's
    r = api.post("/api/tasks", files=files[:3] + [("test", ("t.csv", b"x,y\n1,2\n", "text/csv"))],
                 data={"target": "e_form"})
    assert r.status_code == 422 and r.json()["field"] == "test"
    assert r.json()["detail"].startswith("t.csv: target column 'e_form' not found")
    assert {p.name for p in (service.folder / "tasks").iterdir()} == before


def test_a_request_over_the_size_limit_is_refused_before_it_is_read(service):
    host, port = service.url[len("http://"):].rstrip("/").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=30)
    con.putrequest("POST", "/api/tasks")
    con.putheader("Authorization", f"Bearer {TOKEN}")
    con.putheader("Content-Type", "multipart/form-data; boundary=x")
    con.putheader("Content-Length", str(60_000_000))  # 10 x the per-file limit is the most a request may carry
    con.endheaders()
    r = con.getresponse()
    assert r.status == 413
    assert json.loads(r.read())["detail"].startswith("the request is 60.0 MB, over the service's limit of 50 MB")
    con.close()


@pytest.mark.parametrize("body,status,field,detail", [
    ({}, 422, "institutions", "missing institutions; upload one CSV file per institution (at least two)."),
    ({"institutions": "a.csv,b.csv"}, 422, "institutions",
     "institutions must be a list of CSV file paths (or upload the files as multipart/form-data)."),
    ({"institutions": ["a.csv", "b.csv"]}, 422, "test",
     "missing test; upload the shared test CSV file (it carries every column)."),
    ({"institutions": ["a.csv", "b.csv"], "test": 3}, 422, "test",
     "test must be the path of a CSV file (or upload it as multipart/form-data)."),
    ({"institutions": ["a.csv", "b.csv"], "test": "t.csv"}, 422, "target",
     "missing target; choose the target column (a column of every file)."),
    ({"institutions": ["a.csv", "b.csv"], "test": "t.csv", "target": "y", "rounds": "many"}, 422, "rounds",
     "rounds must be a whole number, got 'many'."),
    ({"institutions": ["a.csv", "b.csv"], "test": "t.csv", "target": "y", "rounds": True}, 422, "rounds",
     "rounds must be a whole number, got True."),
    ({"institutions": ["a.csv", "b.csv"], "test": "t.csv", "target": "y", "seed": "zero"}, 422, "seed",
     "seed must be a whole number, got 'zero'."),
    ({"institutions": ["a.csv", "b.csv"], "test": "t.csv", "target": "y", "epochs": 3}, 422, "epochs",
     "unknown field 'epochs'; known: institutions, test, target, algorithm, rounds, seed, ledger, chain_rpc, exclude."),
    ({"institutions": ["a.csv", "b.csv"], "test": "t.csv", "target": "y", "exclude": 4}, 422, "exclude",
     "exclude must be a list of column names, got 4."),
])
def test_request_fields_are_checked_in_form_order(api, body, status, field, detail):
    r = api.post("/api/tasks", json=body)
    assert (r.status_code, r.json().get("field"), r.json()["detail"]) == (status, field, detail)


def test_bodies_that_are_not_a_task(api):
    r = api.post("/api/tasks", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"] == "the request body is not valid JSON."
    r = api.post("/api/tasks", json=[1, 2])
    assert r.status_code == 422 and r.json()["detail"] == "the request body must be a JSON object of the task's fields."
    r = api.post("/api/tasks", content=b"institutions=a", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["detail"].startswith("send the task as JSON (application/json)")
    r = api.post("/api/tasks", files={"target": ("t.txt", b"e_form", "text/plain")},
                 data={"institutions": ["a.csv", "b.csv"], "test": "t.csv"})
    assert r.status_code == 422 and r.json() == {"detail": "target must be a value, not a file.", "field": "target"}


@pytest.mark.parametrize("method,path", [(m, p.replace("/x", "/0123abcd0123")) for m, p in ENDPOINTS[2:]])
def test_unknown_task_is_404(api, method, path):
    r = api.request(method, path)
    assert r.status_code == 404
    assert r.json()["detail"] == "task '0123abcd0123' not found; GET /api/tasks lists the tasks."


def test_resume_of_a_finished_task_is_a_conflict(ledger_off, api):
    r = api.post(f"/api/tasks/{ledger_off['id']}/resume")
    assert r.status_code == 409
    assert r.json()["detail"] == f"task {ledger_off['id']} is finished; only an interrupted task can be resumed."


# ---------------------------------------------------------------------------------------------- restart


def test_a_restarted_service_lists_every_task_and_marks_the_running_one_interrupted(tmp_path, perovskite):
    folder = tmp_path / "service"
    task = {"institutions": perovskite["institutions"], "test": perovskite["test"], "target": "e_form",
            "ledger": "off"}
    a = ServiceProcess(folder, TOKEN).start()
    try:
        with a.client() as c:
            short = c.post("/api/tasks", json={**task, "rounds": 3}).json()["id"]
            short_task = wait_for(c, short)
            assert short_task["status"] == "finished"
            long = c.post("/api/tasks", json={**task, "rounds": 100_000}).json()["id"]
            queued = c.post("/api/tasks", json={**task, "rounds": 4}).json()["id"]
            wait_for(c, long, until=lambda t: t["status"] == "running" and t["round"] >= 3)
            live = read_events(c, long, limit=6)
            assert [e[0] for e in live[:2]] == ["round", "round"] and live[1][1] == live[0][1] + 1
            assert c.get(f"/api/tasks/{queued}").json()["status"] == "queued"
            r = c.get(f"/api/tasks/{long}/model")
            assert r.status_code == 409 and r.json()["detail"] == (
                f"task {long} is running: its models are saved when it finishes; downloading the model needs a "
                "finished task.")
            r = c.post(f"/api/tasks/{queued}/predict", data={"institution": "train_part0"},
                       files={"file": ("a.csv", b"a,b\n1,2\n", "text/csv")})
            assert r.status_code == 409 and r.json()["detail"].startswith(f"task {queued} is queued")
            r = c.post(f"/api/tasks/{long}/resume")
            assert r.status_code == 409 and r.json()["detail"] == (
                f"task {long} is running; only an interrupted task can be resumed.")
    finally:
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL  # no chance to record anything: the store says running
    b = ServiceProcess(folder, TOKEN).start()
    try:
        with b.client() as c:
            ids = [t["id"] for t in c.get("/api/tasks").json()["tasks"]]
            assert ids == [queued, long, short]  # every task, newest first
            again = c.get(f"/api/tasks/{short}").json()
            assert again["status"] == "finished" and again["final"] == short_task["final"]
            assert again["metrics"] == short_task["metrics"]
            lost = c.get(f"/api/tasks/{long}").json()
            assert lost["status"] == "interrupted" and lost["resumable"] is False
            n = lost["round"]
            assert n >= 3 and [m["round"] for m in lost["metrics"]] == list(range(1, n + 1))
            assert lost["error"] == (f"the service stopped while this task was running (after round {n} of 100000); "
                                     "submit it again to rerun it")
            r = c.post(f"/api/tasks/{long}/resume")
            assert r.status_code == 409 and r.json()["detail"] == (
                "the simulator runtime cannot resume a task (it keeps no checkpoint); submit the task again.")
            assert wait_for(c, queued)["status"] == "finished"  # still queued at the restart: run now
            # a stop with notice (SIGTERM) interrupts the running task at a round boundary, ledger closed
            graceful = c.post("/api/tasks", json={**task, "rounds": 100_000, "ledger": "embedded"}).json()["id"]
            wait_for(c, graceful, until=lambda t: t["status"] == "running" and t["round"] >= 3)
            b.note_children()
            assert b.seen_children, "the embedded chain runs in a process of its own"
            followed: list[tuple] = []

            def follow() -> None:
                with b.client() as own:
                    followed.extend(read_events(own, graceful))

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            time.sleep(1.0)
    finally:
        t0 = time.monotonic()
        assert b.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 15  # an open event stream does not hold the stop up
    follower.join(5)
    assert not follower.is_alive() and followed[0][0] == "round"
    assert followed[-1][0] == "end" and followed[-1][2]["status"] == "interrupted" or (
        followed[-1][0] == "status" and followed[-1][2]["status"] == "stopping")
    c3 = ServiceProcess(folder, TOKEN).start()
    try:
        with c3.client() as c:
            g = c.get(f"/api/tasks/{graceful}").json()
            assert g["status"] == "interrupted"
            assert g["error"] == (f"the service was stopped after round {g['round']} of 100000; submit the task again "
                                  "to rerun it")
            v = c.post(f"/api/tasks/{graceful}/verify").json()  # the ledger up to where it stopped still verifies
            assert v["ok"] is True and 1 <= v["rounds_verified"] <= g["round"]
            assert len(c.get("/api/tasks").json()["tasks"]) == 4
    finally:
        assert c3.stop() == 0
    with sqlite3.connect(folder / "tasks.sqlite3") as con:
        assert dict(con.execute("SELECT id, status FROM tasks")) == {
            short: "finished", long: "interrupted", queued: "finished", graceful: "interrupted"}
