"""The "Regression Task" service: a JSON API (OpenAPI at ``/openapi.json``) and the page over it.

``create_app(folder, token)`` builds the FastAPI app; ``fedmdh serve`` runs it under uvicorn. The
service's folder holds ``tasks.sqlite3`` (the task store), ``token`` (when no ``--token-file`` is
given) and ``tasks/<id>/`` (``uploads/``, the request's CSV files; ``run/``, the task's run folder in
the layout of ``fedmdh run``). The endpoints are listed in docs/service.md.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import shutil
import tempfile
import threading
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile
from starlette.requests import HTTPConnection

from fedmdh import __version__ as fedmdh_version
from fedmdh.algorithms import ALGORITHMS
from fedmdh import jsonsafe
from fedmdh.errors import InputError
from fedmdh.service.auth import COOKIE, TokenAuth
from fedmdh.service.limits import BodyLimits, RequestRefused, shown
from fedmdh.service.runner import EventHub, TaskRunner, run_dir, task_dir
from fedmdh.service.runtime import SimulatorRuntime, TaskRuntime, TaskSpec
from fedmdh.service.store import FINAL, StoreDamaged, TaskRow, TaskStore, now
from fedmdh.service.submission import (
    MAX_INSTITUTIONS, FieldError, FileEntry, build_task, discard, sanitise_filename, too_large,
)

HERE = Path(__file__).parent
#: one line per algorithm for the form (README, Algorithms)
ALGORITHM_NOTES = {
    "local": "each institution alone (reference, no communication)",
    "pooled": "all rows in one place (reference, not federated)",
    "fedavg": "FedAvg, sample-weighted average of local SGD",
    "fedprox": "FedProx, FedAvg with a proximal term",
    "fedmdh": "FedMDH: GFAM + GPD-CGAN + RKD",
    "fedmdh-no-gfam": "FedMDH without GFAM (ablation)",
    "fedmdh-no-cgan": "FedMDH without GPD-CGAN (ablation)",
    "fedmdh-no-rkd": "FedMDH without RKD (ablation)",
    "fedgan": "averaged conditional GAN augmenting the regressor",
    "flic": "personal embeddings into a common latent space",
    "fedgen": "data-free generator of latent features",
    "fedkd": "private mentor, shared mentee, mutual distillation",
}
DEFAULT_MAX_UPLOAD = 100_000_000
#: a request carries at most this many times the per-file limit (checked on Content-Length, before reading)
REQUEST_FILES_FACTOR = 10
KEEPALIVE_S = 15.0
#: a Last-Event-ID is a round number the stream sent (rounds are at most 100,000): ASCII digits only
_EVENT_ID = re.compile(r"[0-9]{1,9}")
POLL_S = 0.5  # how often an idle event stream looks whether the service is stopping
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'")


def _problem(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


class Problem(HTTPException):
    """An HTTP error whose body is ``{"detail": one line}``."""


def create_app(
    folder: str | Path,
    token: str,
    runtime: TaskRuntime | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    token_hint: str | None = None,
) -> FastAPI:
    """The service over ``folder`` (created), writes and task reads guarded by ``token``.

    ``runtime`` runs the tasks (default :class:`SimulatorRuntime`); ``max_upload_bytes`` bounds each
    uploaded file; ``token_hint`` (where the token is) goes into the 401 message.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks").mkdir(exist_ok=True)
    runtime = runtime or SimulatorRuntime()
    auth = TokenAuth(token)
    store = TaskStore(folder)
    hub = EventHub()
    runner = TaskRunner(store, runtime, folder, hub)
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        hub.close_all()
        stopped = await run_in_threadpool(runner.stop)
        store.close()
        print(f"{now()} fedmdh service stopped" + ("" if stopped else " (a task was still ending; it shows as "
                                                   "interrupted at the next start)"), flush=True)

    app = FastAPI(
        title="fedmdh Regression Task service",
        version=fedmdh_version,
        description="Submit a federated regression task, follow its rounds, read and verify its ledger, "
                    "download its models and predict new materials. Every /api/tasks endpoint needs the "
                    "service's token (Authorization: Bearer TOKEN).",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's docs page loads its scripts from a CDN; the page works offline
        redoc_url=None,
    )
    app.state.store, app.state.runner, app.state.folder = store, runner, folder
    closing = threading.Event()

    def begin_shutdown() -> None:
        """The server is stopping: end the event streams and stop the task in flight at its next round."""
        closing.set()
        runner.stop_event.set()

    app.state.begin_shutdown = begin_shutdown
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ------------------------------------------------------------------ errors

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, exc: FieldError) -> JSONResponse:
        return _problem(exc.status, str(exc), exc.field)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return _problem(422, str(exc))

    @app.exception_handler(RequestRefused)
    async def _refused(request: Request, exc: RequestRefused) -> JSONResponse:
        return _problem(exc.status, exc.message, headers={"Connection": "close"})

    @app.exception_handler(StoreDamaged)
    async def _store_damaged(request: Request, exc: StoreDamaged) -> JSONResponse:
        return _problem(500, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        return _problem(422, f"{where or 'request'}: {err.get('msg', 'invalid')}.", where or None)

    # ------------------------------------------------------------------ auth

    def signed_in(request: HTTPConnection) -> bool:
        return auth.bearer_ok(request.headers.get("authorization")) or auth.cookie_ok(request.cookies.get(COOKIE))

    def require_token(request: Request) -> None:
        if auth.bearer_ok(request.headers.get("authorization")):
            return
        if auth.cookie_ok(request.cookies.get(COOKIE)):
            origin = request.headers.get("origin")
            own = f"{request.url.scheme}://{request.headers.get('host', '')}"
            if request.method not in _SAFE_METHODS and origin is not None and origin != own:
                raise Problem(403, f"cross-site request from {origin} refused; use the service's own page.")
            return
        hint = f" (it is in {token_hint})" if token_hint else ""
        raise Problem(401, f"this service needs its token{hint}: send Authorization: Bearer TOKEN, or sign in "
                           "on the page.", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Problem)
    async def _problem_handler(request: Request, exc: Problem) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), headers=exc.headers)

    # every body bounded before it is read; a JSON body's depth checked before it is parsed (limits.py)
    app.add_middleware(BodyLimits, signed_in=lambda scope: signed_in(HTTPConnection(scope)),
                       upload_bytes=max_upload_bytes * REQUEST_FILES_FACTOR)

    # ------------------------------------------------------------------ helpers

    def get_row(task_id: str, with_metrics: bool = True) -> TaskRow:
        row = store.get(task_id, with_metrics=with_metrics) if len(task_id) <= 64 else None
        if row is None:
            raise Problem(404, f"task {shown(task_id, 64)} not found; GET /api/tasks lists the tasks.")
        return row

    def public(row: TaskRow, text: str) -> str:
        """A message with the task's stored paths named as the user knows them."""
        text = TaskSpec.from_dict(row.spec).public(text)
        return text.replace(str(run_dir(folder, row.id)), f"task {row.id}").replace(
            str(task_dir(folder, row.id)), f"task {row.id}")

    def view(row: TaskRow, latest: dict[str, Any] | None = None, full: bool = True) -> dict[str, Any]:
        s = row.spec
        fed = row.federation or {}
        last = (row.metrics[-1] if row.metrics else None) if full else latest
        out: dict[str, Any] = {
            "id": row.id,
            "status": row.status,
            "created": row.created,
            "started": row.started,
            "finished": row.finished,
            "round": row.round,
            "rounds": s["rounds"],
            "algorithm": s["algorithm"],
            "target": s["target"],
            "seed": s["seed"],
            "ledger": s["ledger"],
            "institutions": [i["name"] for i in fed.get("institutions", [])],
            "files": fed.get("files", {}),
            "test": fed.get("test"),
            "runtime": runtime.name,
            "resumable": row.status == "interrupted" and bool(runtime.can_resume),
            "error": row.error,
            "latest": last,
            "final": row.final,
            "per_institution": (row.final or {}).get("per_institution") or (last or {}).get("per_institution"),
            "heterogeneity": {k: fed.get(k) for k in ("H", "alpha", "KL_avg")},
            "federation": fed,
        }
        if full:
            out["metrics"] = row.metrics
        return out

    def require_finished(row: TaskRow, what: str) -> None:
        if row.status != "finished":
            tail = ("its models are saved when it finishes" if row.status in ("queued", "running")
                    else "it has no models")
            raise Problem(409, f"task {row.id} is {row.status}: {tail}; {what} needs a finished task.")

    async def save_upload(upload: UploadFile, dest: Path) -> FileEntry:
        shown = upload.filename or dest.name
        size = upload.size if upload.size is not None else 0
        if size > max_upload_bytes:
            raise too_large(shown, size, max_upload_bytes)
        dest.parent.mkdir(parents=True, exist_ok=True)
        await upload.seek(0)
        with dest.open("wb") as fh:
            written = 0
            while chunk := await upload.read(1 << 20):
                written += len(chunk)
                if written > max_upload_bytes:
                    raise too_large(shown, written, max_upload_bytes)
                fh.write(chunk)
        return FileEntry(str(dest), shown)

    def check_length(request: Request) -> None:
        length = request.headers.get("content-length")
        if length is None:
            raise Problem(411, "send the request with a Content-Length header.")
        limit = max_upload_bytes * REQUEST_FILES_FACTOR
        if not length.isdigit():
            raise Problem(400, f"the Content-Length header {length!r} is not a number of bytes.")
        if int(length) > limit:
            raise Problem(413, f"the request is {int(length) / 1e6:.1f} MB, over the service's limit of "
                               f"{limit / 1e6:g} MB per request; send smaller files or start the service with a "
                               "larger --max-upload-mb.")

    async def read_form(request: Request):
        check_length(request)
        try:
            return await request.form(max_files=MAX_INSTITUTIONS + 2, max_fields=200)
        except HTTPException as exc:
            raise Problem(400, f"the form could not be read ({exc.detail}); send multipart/form-data.") from None

    # ------------------------------------------------------------------ pages

    def page(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        if not signed_in(request):
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        resp = templates.TemplateResponse(request, name, {"version": fedmdh_version, "runtime": runtime.name, **ctx})
        resp.headers["Content-Security-Policy"] = _CSP
        return resp

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(request: Request):
        return page(request, "index.html", algorithms=[(a, ALGORITHM_NOTES.get(a, "")) for a in ALGORITHMS])

    @app.get("/tasks/{task_id}", response_class=HTMLResponse, include_in_schema=False)
    async def task_page(request: Request, task_id: str):
        if signed_in(request):
            get_row(task_id, with_metrics=False)
        return page(request, "task.html", task_id=task_id)

    def _next(value: str | None) -> str:
        # only a path of this service: "//host" and "/\\host" would leave it
        return value if value and value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"

    def _signed_in_redirect(target: str) -> RedirectResponse:
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(COOKIE, auth.session, httponly=True, samesite="strict", path="/")
        return resp

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_page(request: Request, next: str | None = None, token: str | None = None):
        if token is not None and auth.token_ok(token):
            return _signed_in_redirect(_next(next))
        resp = templates.TemplateResponse(
            request, "login.html", {"next": _next(next), "error": "that is not the service's token" if token else None,
                                    "hint": token_hint, "version": fedmdh_version},
            status_code=401 if token else 200)
        resp.headers["Content-Security-Policy"] = _CSP
        return resp

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        tok, nxt = form.get("token"), form.get("next")
        if isinstance(tok, str) and auth.token_ok(tok):
            return _signed_in_redirect(_next(nxt if isinstance(nxt, str) else None))
        resp = templates.TemplateResponse(
            request, "login.html", {"next": _next(nxt if isinstance(nxt, str) else None),
                                    "error": "that is not the service's token", "hint": token_hint,
                                    "version": fedmdh_version}, status_code=401)
        resp.headers["Content-Security-Policy"] = _CSP
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout():
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # ------------------------------------------------------------------ API

    @app.get("/api/health", tags=["service"], summary="Liveness (no token needed)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": fedmdh_version, "runtime": runtime.name}

    task_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {
                    "type": "object", "required": ["institutions", "test", "target"],
                    "properties": {
                        "institutions": {"type": "array", "items": {"type": "string"},
                                         "description": "paths of the institutions' CSV files on the server"},
                        "test": {"type": "string", "description": "path of the shared test CSV on the server"},
                        "target": {"type": "string"},
                        "algorithm": {"type": "string", "default": "fedavg"},
                        "rounds": {"type": "integer", "default": 400},
                        "seed": {"type": "integer", "default": 0},
                        "ledger": {"type": "string", "enum": ["embedded", "rpc", "off"], "default": "embedded"},
                        "chain_rpc": {"type": "string"},
                        "exclude": {"type": "array", "items": {"type": "string"}},
                    }}},
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["institutions", "test", "target"],
                    "properties": {
                        "institutions": {"type": "array", "items": {"type": "string", "format": "binary"},
                                         "description": "one CSV file per institution (or a server path)"},
                        "test": {"type": "string", "format": "binary"},
                        "target": {"type": "string"}, "algorithm": {"type": "string"},
                        "rounds": {"type": "integer"}, "seed": {"type": "integer"},
                        "ledger": {"type": "string"}, "chain_rpc": {"type": "string"},
                        "exclude": {"type": "string", "description": "comma-separated column names"},
                    }}},
            },
        },
        "responses": {"201": {"description": "queued: {id, status, url}"},
                      "422": {"description": "{detail: one line, field}: a field is not valid"},
                      "413": {"description": "an upload is over the size limit"}},
    }

    @app.post("/api/tasks", status_code=201, tags=["tasks"], summary="Submit a task",
              dependencies=[Depends(require_token)], openapi_extra=task_body)
    async def create_task(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        task_id = secrets.token_hex(6)
        tdir = task_dir(folder, task_id)
        institutions: list[FileEntry] = []
        test: FileEntry | None = None
        try:
            if ctype == "application/json":
                try:  # BodyLimits bounded its size and depth already; jsonsafe checks the depth again
                    body = jsonsafe.loads(await request.body())
                except jsonsafe.JSONTooDeep as exc:
                    raise FieldError(None, f"the request body is JSON nested more than {exc.max_depth} levels "
                                           "deep; a task is one JSON object of its fields.") from None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise FieldError(None, "the request body is not valid JSON.") from None
                if not isinstance(body, dict):
                    raise FieldError(None, "the request body must be a JSON object of the task's fields.")
                inst = body.pop("institutions", None) or []
                if isinstance(inst, str) or not isinstance(inst, list) or not all(isinstance(p, str) for p in inst):
                    raise FieldError("institutions", "institutions must be a list of CSV file paths (or upload the "
                                                     "files as multipart/form-data).")
                institutions = [FileEntry(p, p) for p in inst if p.strip()]
                t = body.pop("test", None)
                if t is not None and not isinstance(t, str):
                    raise FieldError("test", "test must be the path of a CSV file (or upload it as "
                                             "multipart/form-data).")
                test = FileEntry(t, t) if t and t.strip() else None
                fields = body
            elif ctype == "multipart/form-data":
                form = await read_form(request)
                for i, item in enumerate(form.getlist("institutions")):
                    if isinstance(item, UploadFile):
                        if not item.filename and not item.size:
                            continue  # an empty file input
                        name = sanitise_filename(item.filename, f"institution{i}.csv")
                        institutions.append(await save_upload(item, tdir / "uploads" / f"inst{i}" / name))
                    elif item.strip():
                        institutions.append(FileEntry(item.strip(), item.strip()))
                t = form.get("test")
                if isinstance(t, UploadFile) and (t.filename or t.size):
                    test = await save_upload(t, tdir / "uploads" / "test" / sanitise_filename(t.filename, "test.csv"))
                elif isinstance(t, str) and t.strip():
                    test = FileEntry(t.strip(), t.strip())
                fields = {}
                for key in set(form.keys()) - {"institutions", "test"}:
                    values = [v for v in form.getlist(key) if isinstance(v, str)]
                    if len(values) != len(form.getlist(key)):
                        raise FieldError(key, f"{key} must be a value, not a file.")
                    fields[key] = ",".join(values) if key == "exclude" else (values[-1] if values else None)
            else:
                raise Problem(415, "send the task as JSON (application/json) with server paths, or as a form "
                                   "(multipart/form-data) with the CSV files.")
            spec, info = await run_in_threadpool(build_task, task_id, fields, institutions, test)
        except BaseException:
            discard(tdir)
            raise
        store.add(task_id, spec.to_dict(), info)
        runner.submit(task_id)
        return JSONResponse({"id": task_id, "status": "queued", "url": f"/api/tasks/{task_id}"}, status_code=201,
                            headers={"Location": f"/api/tasks/{task_id}"})

    @app.get("/api/tasks", tags=["tasks"], summary="Every task, newest first (without per-round metrics)",
             dependencies=[Depends(require_token)])
    async def list_tasks() -> dict[str, Any]:
        latest = store.latest_rounds()
        return {"tasks": [view(r, latest.get(r.id), full=False) for r in store.list()]}

    @app.get("/api/tasks/{task_id}", tags=["tasks"], summary="One task: status, rounds, metrics, heterogeneity",
             dependencies=[Depends(require_token)])
    async def get_task(task_id: str) -> dict[str, Any]:
        return view(get_row(task_id))

    @app.get("/api/tasks/{task_id}/events", tags=["tasks"], summary="Live progress (server-sent events)",
             dependencies=[Depends(require_token)],
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "events `round` (id = round), `status`, and `end`"}})
    async def task_events(task_id: str, request: Request):
        get_row(task_id, with_metrics=False)
        last = (request.headers.get("last-event-id") or "").strip()
        if last and not _EVENT_ID.fullmatch(last):
            raise Problem(400, f"Last-Event-ID {shown(last)} is not the id of an event of this stream (a round "
                               "number, ASCII digits, at most 9); send the last id received, or none.")
        after = int(last) if last else 0
        queue = hub.subscribe(task_id)

        def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
            head = f"id: {event_id}\n" if event_id is not None else ""
            return f"{head}event: {event}\ndata: {json.dumps(data, default=float)}\n\n"

        async def stream():
            sent = after
            try:
                row = get_row(task_id, with_metrics=False)
                rounds = row.spec["rounds"]
                for rec in store.rounds_after(task_id, sent):
                    yield sse("round", {**rec, "rounds": rounds}, rec["round"])
                    sent = rec["round"]
                row = get_row(task_id, with_metrics=False)
                status = {"status": row.status, "round": row.round, "rounds": rounds, "error": row.error}
                yield sse("status", status)
                if row.status in FINAL:
                    yield sse("end", status)
                    return
                idle = 0.0
                while True:
                    try:
                        event, data = await asyncio.wait_for(queue.get(), POLL_S)
                    except asyncio.TimeoutError:
                        if closing.is_set():
                            event, data = "shutdown", {}
                        else:
                            idle += POLL_S
                            if idle >= KEEPALIVE_S:
                                idle = 0.0
                                if await request.is_disconnected():
                                    return
                                yield ": keep-alive\n\n"
                            continue
                    if event == "shutdown":
                        yield sse("status", {**status, "status": "stopping"})
                        return
                    if event == "round":
                        if data["round"] <= sent:
                            continue
                        sent = data["round"]
                        yield sse("round", data, sent)
                    elif event == "status":
                        if data["status"] in FINAL:  # rounds stored before the end, not yet sent
                            for rec in store.rounds_after(task_id, sent):
                                yield sse("round", {**rec, "rounds": rounds}, rec["round"])
                                sent = rec["round"]
                        yield sse("status", data)
                        if data["status"] in FINAL:
                            yield sse("end", data)
                            return
            finally:
                hub.unsubscribe(task_id, queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def ledger_dir_of(row: TaskRow) -> Path:
        if row.spec["ledger"] == "off":
            raise Problem(409, f"task {row.id} was run with the ledger off: it has no ledger.")
        return run_dir(folder, row.id)

    @app.get("/api/tasks/{task_id}/ledger", tags=["ledger"],
             summary="Task, participants, rounds, commitments, attestations, gas (as `fedmdh ledger show`)",
             dependencies=[Depends(require_token)])
    async def get_ledger(task_id: str) -> dict[str, Any]:
        from fedmdh.ledger.audit import show

        row = get_row(task_id, with_metrics=False)
        where = ledger_dir_of(row)
        try:
            info = await run_in_threadpool(show, where)
        except InputError as exc:
            raise Problem(409, public(row, str(exc))) from None
        info.pop("ledger", None)
        return info

    @app.post("/api/tasks/{task_id}/verify", tags=["ledger"],
              summary="Replay and check the ledger (as `fedmdh ledger verify`): {ok, message, notes}",
              dependencies=[Depends(require_token)])
    async def verify_ledger(task_id: str) -> dict[str, Any]:
        from fedmdh.ledger.audit import verify

        row = get_row(task_id, with_metrics=False)
        where = ledger_dir_of(row)
        # a task that stopped before its end is checked up to its last finalized round, and said so
        partial = row.status in ("interrupted", "failed")
        try:
            report = await run_in_threadpool(lambda: verify(where, partial=partial))
        except InputError as exc:
            raise Problem(409, public(row, str(exc))) from None
        lines = str(report).splitlines()
        return {"ok": report.ok, "status": report.status, "message": public(row, lines[0]),
                "notes": [public(row, n) for n in report.notes],
                "rounds_verified": report.rounds_verified, "rounds_total": report.rounds_total}

    @app.get("/api/tasks/{task_id}/model", tags=["models"],
             summary="The archived models as a zip, every file checked against the archived hashes",
             dependencies=[Depends(require_token)],
             responses={200: {"content": {"application/zip": {}}}})
    async def get_models(task_id: str):
        row = get_row(task_id, with_metrics=False)
        require_finished(row, "downloading the model")
        data, digest = await run_in_threadpool(_model_zip, row, run_dir(folder, row.id))
        headers = {"Content-Disposition": f'attachment; filename="fedmdh-{row.id}-models.zip"'}
        if digest:
            headers["X-Fedmdh-Model-Hash"] = digest
        return Response(data, media_type="application/zip", headers=headers)

    def _model_zip(row: TaskRow, rd: Path) -> tuple[bytes, str | None]:
        from fedmdh.ledger.audit import get_model
        from fedmdh.ledger.blobs import sha256_hex

        with tempfile.TemporaryDirectory(dir=task_dir(folder, row.id)) as tmp:
            if row.spec["ledger"] != "off":
                try:
                    got = get_model(tmp, run_dir=rd)
                except InputError as exc:
                    raise Problem(409, public(row, str(exc))) from None
                digest, note = got["model_hash"], ("every file was read from the task's archive and matched the "
                                                   "sha256 the ledger archived (model_hash names that manifest)")
                src = Path(tmp)
            else:
                digest, note = None, "the task ran with the ledger off: no archive to check against"
                src = rd / "models"
            files = sorted(p for p in src.rglob("*") if p.is_file())
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                hashes = {}
                for p in files:
                    rel = p.relative_to(src).as_posix()
                    blob = p.read_bytes()
                    hashes[rel] = sha256_hex(blob)
                    z.writestr(rel, blob)
                manifest = {"task": row.id, "algorithm": row.spec["algorithm"], "target": row.spec["target"],
                            "model_hash": digest, "verified": note, "files": hashes,
                            "use": "fedmdh predict --model THIS_FOLDER --institution NAME IN.csv OUT.csv"}
                z.writestr("MANIFEST.json", json.dumps(manifest, indent=2))
        return buf.getvalue(), digest

    @app.post("/api/tasks/{task_id}/predict", tags=["models"],
              summary="Predict new materials with an institution's model (form: institution, file) -> CSV",
              dependencies=[Depends(require_token)],
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["institution", "file"],
                  "properties": {"institution": {"type": "string"},
                                 "file": {"type": "string", "format": "binary",
                                          "description": "new materials in that institution's columns"}}}}}}},
              responses={200: {"content": {"text/csv": {}}, "description": "the rows with predicted_TARGET added"}})
    async def predict(task_id: str, request: Request):
        row = get_row(task_id, with_metrics=False)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise Problem(415, "send institution and file as a form (multipart/form-data).")
        form = await read_form(request)
        inst, upload = form.get("institution"), form.get("file")
        names = [i["name"] for i in (row.federation or {}).get("institutions", [])]
        if not isinstance(inst, str) or not inst.strip():
            raise FieldError("institution", f"missing institution; choose whose model predicts: {', '.join(names)}.")
        inst = inst.strip()
        if inst not in names:
            raise FieldError("institution", f"task {row.id} has no model for institution {inst!r}; choose one of: "
                                            f"{', '.join(names)}.")
        if not isinstance(upload, UploadFile) or not (upload.filename or upload.size):
            raise FieldError("file", "missing file; upload a CSV of new materials in that institution's columns.")
        require_finished(row, "predicting")
        tmp = task_dir(folder, row.id) / "predict" / secrets.token_hex(6)
        try:
            entry = await save_upload(upload, tmp / sanitise_filename(upload.filename, "input.csv"))
            try:
                csv_text, n = await run_in_threadpool(_predict_csv, run_dir(folder, row.id) / "models" / inst,
                                                      entry)
            except InputError as exc:
                raise FieldError("file", public(row, str(exc).replace(entry.path, entry.shown))) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stem = Path(sanitise_filename(upload.filename, "input.csv")).stem
        return Response(csv_text, media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="predictions_{inst}_{stem}.csv"', "X-Fedmdh-Rows": str(n)})

    def _predict_csv(model_dir: Path, entry: FileEntry) -> tuple[str, int]:
        from fedmdh.data.io import read_csv_checked
        from fedmdh.experiment.models import load_model

        m = load_model(model_dir)
        frame = read_csv_checked(entry.path)
        target = m.info.get("target", "y")
        out = frame.copy()
        out[f"predicted_{target}"] = m.predict(frame, entry.path)
        return out.to_csv(index=False), len(out)

    @app.post("/api/tasks/{task_id}/resume", status_code=202, tags=["tasks"],
              summary="Resume an interrupted task (where the runtime can)", dependencies=[Depends(require_token)])
    async def resume(task_id: str) -> dict[str, Any]:
        row = get_row(task_id, with_metrics=False)
        if row.status != "interrupted":
            raise Problem(409, f"task {row.id} is {row.status}; only an interrupted task can be resumed.")
        if not runtime.can_resume:
            raise Problem(409, f"the {runtime.name} runtime cannot resume a task (it keeps no checkpoint); submit "
                               "the task again.")
        store.requeue(row.id)
        runner.submit(row.id)
        return {"id": row.id, "status": "queued"}

    return app
