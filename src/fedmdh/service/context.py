"""What every route of the service shares: the :class:`Service` (store, runner, runtime, token, templates), reached
through the dependency :data:`ServiceDep`, the token check :func:`require_token`, and the helpers several
resources use (a task's row and its public view, uploads, the page renderer, one-line error bodies)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile
from starlette.requests import HTTPConnection

from fedmdh import __version__ as fedmdh_version
from fedmdh.service.auth import COOKIE, TokenAuth
from fedmdh.service.limits import shown
from fedmdh.service.runner import EventHub, TaskRunner, run_dir, task_dir
from fedmdh.service.runtime import TaskRuntime, TaskSpec
from fedmdh.service.store import TaskRow, TaskStore
from fedmdh.service.submission import MAX_INSTITUTIONS, FileEntry, too_large

HERE = Path(__file__).parent
#: a request carries at most this many times the per-file limit (checked on Content-Length, before reading)
REQUEST_FILES_FACTOR = 10
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")


def problem(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error body ``{"detail": one line, "field": ...}``."""
    body: dict[str, Any] = {"detail": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


class Problem(HTTPException):
    """An HTTP error whose body is ``{"detail": one line}``."""


@dataclass
class Service:
    """One service over its folder: built once by :func:`fedmdh.service.app.create_app`."""

    folder: Path
    runtime: TaskRuntime
    auth: TokenAuth
    store: TaskStore
    hub: EventHub
    runner: TaskRunner
    max_upload_bytes: int
    token_hint: str | None = None
    templates: Jinja2Templates = field(default_factory=lambda: Jinja2Templates(directory=str(HERE / "templates")))
    #: set when the server is stopping: the event streams end
    closing: threading.Event = field(default_factory=threading.Event)

    # -- auth -------------------------------------------------------------------------------------
    def signed_in(self, request: HTTPConnection) -> bool:
        return (self.auth.bearer_ok(request.headers.get("authorization"))
                or self.auth.cookie_ok(request.cookies.get(COOKIE)))

    # -- tasks ------------------------------------------------------------------------------------
    def row(self, task_id: str, with_metrics: bool = True) -> TaskRow:
        """The task's row, or a 404 naming it."""
        row = self.store.get(task_id, with_metrics=with_metrics) if len(task_id) <= 64 else None
        if row is None:
            raise Problem(404, f"task {shown(task_id, 64)} not found; GET /api/tasks lists the tasks.")
        return row

    def public(self, row: TaskRow, text: str) -> str:
        """A message with the task's stored paths named as the user knows them."""
        text = TaskSpec.from_dict(row.spec).public(text)
        return text.replace(str(run_dir(self.folder, row.id)), f"task {row.id}").replace(
            str(task_dir(self.folder, row.id)), f"task {row.id}")

    def view(self, row: TaskRow, latest: dict[str, Any] | None = None, full: bool = True) -> dict[str, Any]:
        """The task as the API shows it (``full``: with every round's metrics)."""
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
            "runtime": self.runtime.name,
            "resumable": row.status == "interrupted" and bool(self.runtime.can_resume),
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

    @staticmethod
    def require_finished(row: TaskRow, what: str) -> None:
        if row.status != "finished":
            tail = ("its models are saved when it finishes" if row.status in ("queued", "running")
                    else "it has no models")
            raise Problem(409, f"task {row.id} is {row.status}: {tail}; {what} needs a finished task.")

    # -- uploads ----------------------------------------------------------------------------------
    async def save_upload(self, upload: UploadFile, dest: Path) -> FileEntry:
        name = upload.filename or dest.name
        size = upload.size if upload.size is not None else 0
        if size > self.max_upload_bytes:
            raise too_large(name, size, self.max_upload_bytes)
        dest.parent.mkdir(parents=True, exist_ok=True)
        await upload.seek(0)
        with dest.open("wb") as fh:
            written = 0
            while chunk := await upload.read(1 << 20):
                written += len(chunk)
                if written > self.max_upload_bytes:
                    raise too_large(name, written, self.max_upload_bytes)
                fh.write(chunk)
        return FileEntry(str(dest), name)

    def check_length(self, request: Request) -> None:
        length = request.headers.get("content-length")
        if length is None:
            raise Problem(411, "send the request with a Content-Length header.")
        limit = self.max_upload_bytes * REQUEST_FILES_FACTOR
        if not length.isdigit():
            raise Problem(400, f"the Content-Length header {length!r} is not a number of bytes.")
        if int(length) > limit:
            raise Problem(413, f"the request is {int(length) / 1e6:.1f} MB, over the service's limit of "
                               f"{limit / 1e6:g} MB per request; send smaller files or start the service with a "
                               "larger --max-upload-mb.")

    async def read_form(self, request: Request):
        self.check_length(request)
        try:
            return await request.form(max_files=MAX_INSTITUTIONS + 2, max_fields=200)
        except HTTPException as exc:
            raise Problem(400, f"the form could not be read ({exc.detail}); send multipart/form-data.") from None

    # -- pages ------------------------------------------------------------------------------------
    def page(self, request: Request, name: str, **ctx: Any) -> HTMLResponse:
        """The page ``name`` for a signed-in user; others go to the sign-in page first."""
        if not self.signed_in(request):
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return self.render(request, name, {"runtime": self.runtime.name, **ctx})

    def render(self, request: Request, name: str, ctx: dict[str, Any], status_code: int = 200) -> HTMLResponse:
        resp = self.templates.TemplateResponse(request, name, {"version": fedmdh_version, **ctx},
                                               status_code=status_code)
        resp.headers["Content-Security-Policy"] = CSP
        return resp


def get_service(request: HTTPConnection) -> Service:
    """The dependency every route takes its :class:`Service` from."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_token(request: Request, svc: ServiceDep) -> None:
    """The API's guard: a bearer token, or the page's session cookie on a same-origin request."""
    if svc.auth.bearer_ok(request.headers.get("authorization")):
        return
    if svc.auth.cookie_ok(request.cookies.get(COOKIE)):
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if request.method not in _SAFE_METHODS and origin is not None and origin != own:
            raise Problem(403, f"cross-site request from {origin} refused; use the service's own page.")
        return
    hint = f" (it is in {svc.token_hint})" if svc.token_hint else ""
    raise Problem(401, f"this service needs its token{hint}: send Authorization: Bearer TOKEN, or sign in "
                       "on the page.", headers={"WWW-Authenticate": "Bearer"})


#: the dependency list of every /api/tasks route
TOKEN = [Depends(require_token)]
