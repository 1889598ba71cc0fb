"""The task service's page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

A person's path through the page, on the perovskite split: sign in, see the form's errors beside its
fields, submit a 20-round fedavg task, watch it finish, press Verify and see OK, download the model,
upload rows for Predict and get predictions. What the page shows is checked against the API. A
screenshot of each page goes to ``test-artifacts/service/`` (git-ignored). Skipped, saying why, only
where /usr/bin/chromium is absent (CI installs it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from _service import ServiceProcess, alive, descendants

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "service"
TOKEN = "service-browser-test-token-0123456789"
REQUESTS: list[str] = []  # every URL the browser asked for


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: the browser tests need Debian's chromium (apt-get install chromium)"
        print(reason)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="module")
def service(chromium, tmp_path_factory):
    svc = ServiceProcess(tmp_path_factory.mktemp("service-browser") / "service", TOKEN).start()
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    """One Chromium for the module, with a fresh profile; every request it makes is recorded."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = descendants(os.getpid())
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(chromium), headless=True,
            args=FLAGS, accept_downloads=True, viewport={"width": 1280, "height": 900})
        ctx.on("request", lambda r: REQUESTS.append(r.url))
        ctx.set_default_timeout(30_000)
        yield ctx
        ctx.close()
    left = [pid for pid in descendants(os.getpid()) - before if alive(pid)]
    assert not left, f"the browser left processes running: {left}"


@pytest.fixture()
def page(browser, service):
    pg = browser.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # an HTTP error the page handles (a 422 it shows beside a field) is logged as "Failed to load resource"
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and not m.text.startswith(
        "Failed to load resource") else None)
    yield pg
    pg.close()
    assert not errors, f"the page reported errors: {errors}"
    foreign = [u for u in REQUESTS if not u.startswith(service.url) and not u.startswith(("blob:", "data:"))]
    assert not foreign, f"the page reached outside the service: {foreign}"


def sign_in(page, service) -> None:
    page.goto(service.url + f"login?token={TOKEN}")
    assert page.url == service.url


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_sign_in(page, service):
    page.goto(service.url)
    assert page.url.startswith(service.url + "login")
    shot(page, "login")
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    assert page.inner_text("#login-error") == "that is not the service's token"
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(service.url)
    assert page.inner_text("h1") == "New regression task"


def test_form_lists_the_common_columns_and_shows_errors_beside_fields(page, service, perovskite):
    sign_in(page, service)
    page.click("#submit")
    err = page.locator('[data-error-for="institutions"]')
    err.wait_for(state="visible")
    assert err.inner_text() == "missing institutions; upload one CSV file per institution (at least two)."
    page.set_input_files("#institutions", perovskite["institutions"][:2])
    page.set_input_files("#test", perovskite["test"])
    assert page.locator("#institution-list li").count() == 2
    # the target list: the columns every chosen file has, in the test file's order
    frames = [pd.read_csv(p, nrows=1) for p in [*perovskite["institutions"][:2], perovskite["test"]]]
    common = [c for c in frames[-1].columns if all(c in f.columns for f in frames)]
    assert page.eval_on_selector_all("#target option", "os => os.map(o => o.value)") == common
    page.select_option("#target", "e_form")
    page.fill("#rounds", "0")
    page.click("#submit")
    rounds_err = page.locator('[data-error-for="rounds"]')
    rounds_err.wait_for(state="visible")
    from fedmdh.config import check_types
    from fedmdh.errors import InputError

    with pytest.raises(InputError) as expected:  # the library's own line, as the CLI prints it
        check_types({"rounds": 0})
    assert rounds_err.inner_text() == str(expected.value)
    assert "invalid" in page.get_attribute('.field[data-field="rounds"]', "class")
    assert page.inner_text('[data-error-for="institutions"]') == ""  # cleared: that field is fine now
    shot(page, "form-errors")
    page.fill("#rounds", "5")
    page.click("summary")
    page.select_option("#ledger", "off")
    page.fill("#exclude", "no such column")
    page.click("#submit")
    exclude_err = page.locator('[data-error-for="exclude"]')
    exclude_err.wait_for(state="visible")
    assert exclude_err.inner_text().startswith("exclude 'no such column': no file has this column (columns: ")
    page.fill("#exclude", "alpha")
    page.click("#submit")
    page.wait_for_url(service.url + "tasks/*")
    shot(page, "task-queued")


def test_submit_watch_verify_download_predict(page, service, perovskite, tmp_path):
    api = service.client()
    sign_in(page, service)
    # ---- submit a 20-round fedavg task on the perovskite split from the form
    page.set_input_files("#institutions", perovskite["institutions"])
    page.set_input_files("#test", perovskite["test"])
    page.select_option("#target", "e_form")
    page.select_option("#algorithm", "fedavg")
    page.fill("#rounds", "20")
    shot(page, "new-task")
    page.click("#submit")
    page.wait_for_url(service.url + "tasks/*")
    task_id = page.url.rsplit("/", 1)[1]
    # ---- watch it finish: the progress bar and the curve follow the rounds as they come
    page.locator("#status.finished").wait_for(timeout=240_000)  # the page's CSP forbids eval: no wait_for_function
    task = api.get(f"/api/tasks/{task_id}").json()
    assert task["status"] == "finished" and task["rounds"] == 20 and task["algorithm"] == "fedavg"
    assert task["ledger"] == "embedded"
    assert page.get_attribute("#progress", "value") == "20" and page.get_attribute("#progress", "max") == "20"
    assert page.inner_text("#progress-text") == "round 20 of 20"
    assert page.get_attribute("#chart", "data-points") == "20"
    assert int(page.get_attribute("#task", "data-live-rounds") or 0) >= 1  # rounds arrived as server-sent events
    assert page.locator("#chart canvas").count() >= 1
    rows = page.locator("#institution-table tbody tr")
    assert rows.count() == 4  # three institutions and the mean
    for i, name in enumerate(task["institutions"]):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[0] == name
        assert cells[7] == f"{task['final']['per_institution'][name]['rmse']:.4f}"
    het = task["heterogeneity"]
    for name in ("H", "alpha", "KL_avg"):
        assert page.inner_text(f'[data-figure="{name}"] .value') == f"{het[name]:.4f}"
    assert page.locator(".histogram").count() == 3
    for name in task["institutions"]:
        assert page.locator(f'.histogram[data-institution="{name}"] rect').count() == 20
    shot(page, "task")
    # ---- the ledger tab, Verify
    page.click("#tab-ledger")
    page.locator("#ledger-table tbody tr").nth(19).wait_for()
    assert page.locator("#ledger-table tbody tr").count() == 20
    led = api.get(f"/api/tasks/{task_id}/ledger").json()
    assert page.inner_text("#archive-hash") == led["archive"]["model_hash"]
    page.click("#verify")
    page.locator("#verify-message").wait_for(timeout=120_000)
    assert page.inner_text("#verify-message").startswith("OK: 20 of 20 rounds finalized and verified")
    assert "ok" in page.get_attribute("#verify-result", "class")
    shot(page, "ledger")
    # ---- Download model: the zip's files are the archived ones
    page.click("#tab-model")
    with page.expect_download() as dl:
        page.click("#download")
    assert dl.value.suggested_filename == f"fedmdh-{task_id}-models.zip"
    dl.value.save_as(tmp_path / "models.zip")
    z = zipfile.ZipFile(tmp_path / "models.zip")
    manifest = json.loads(z.read("MANIFEST.json"))
    assert "0x" + manifest["model_hash"] == led["archive"]["model_hash"]
    archived = json.loads((service.folder / "tasks" / task_id / "run" / "ledger" / "blobs" /
                           manifest["model_hash"]).read_bytes())["files"]
    for rel, h in archived.items():
        assert hashlib.sha256(z.read(rel.removeprefix("models/"))).hexdigest() == h
    # ---- Predict with an upload
    new = pd.read_csv(perovskite["test"]).tail(12)
    new.to_csv(tmp_path / "new_materials.csv", index=False)
    page.select_option("#predict-institution", "train_part1")
    page.set_input_files("#predict-file", str(tmp_path / "new_materials.csv"))
    page.click("#predict")
    page.locator("#predict-result").wait_for(state="visible")
    assert page.inner_text("#predict-summary") == (
        "predicted_e_form for 12 rows of new_materials.csv with train_part1's fedavg model.")
    ref = api.post(f"/api/tasks/{task_id}/predict", data={"institution": "train_part1"},
                   files={"file": ("new_materials.csv", (tmp_path / "new_materials.csv").read_bytes(), "text/csv")})
    expected = pd.read_csv(io.StringIO(ref.text))["predicted_e_form"]
    shown = page.locator("#predict-table td.pred").all_inner_texts()
    assert shown == [f"{v:.4f}" for v in expected]
    with page.expect_download() as saved:
        page.click("#predict-save")
    saved.value.save_as(tmp_path / "predictions.csv")
    assert (tmp_path / "predictions.csv").read_text() == ref.text
    shot(page, "model")
    # ---- the task list
    page.goto(service.url)
    page.locator(f'#task-table a[href="/tasks/{task_id}"]').wait_for()
    row = page.locator("#task-table tbody tr", has=page.locator(f'a[href="/tasks/{task_id}"]'))
    assert row.locator(".status").inner_text() == "finished"
    shot(page, "tasks")
    api.close()
