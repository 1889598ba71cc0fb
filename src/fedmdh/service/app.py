"""The "Regression Task" service: a JSON API (OpenAPI at ``/openapi.json``) and the page over it.

``create_app(folder, token)`` builds the FastAPI app; ``fedmdh serve`` runs it under uvicorn. The
service's folder holds ``tasks.sqlite3`` (the task store), ``token`` (when no ``--token-file`` is
given) and ``tasks/<id>/`` (``uploads/``, the request's CSV files; ``run/``, the task's run folder in
the layout of ``fedmdh run``). The endpoints are listed in docs/service.md; they live in :mod:`fedmdh.service.routes`, one
module per resource, and reach the service's state through :data:`fedmdh.service.context.ServiceDep`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import HTTPConnection

from fedmdh import __version__ as fedmdh_version
from fedmdh.errors import InputError
from fedmdh.service.auth import TokenAuth
from fedmdh.service.context import HERE, REQUEST_FILES_FACTOR, Problem, Service, problem
from fedmdh.service.limits import BodyLimits, RequestRefused
from fedmdh.service.routes import ledger, models, pages, tasks
from fedmdh.service.runner import EventHub, TaskRunner
from fedmdh.service.runtime import SimulatorRuntime, TaskRuntime
from fedmdh.service.store import StoreDamaged, TaskStore, now
from fedmdh.service.submission import FieldError

DEFAULT_MAX_UPLOAD = 100_000_000


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
    store = TaskStore(folder)
    hub = EventHub()
    svc = Service(folder=folder, runtime=runtime, auth=TokenAuth(token), store=store, hub=hub,
                  runner=TaskRunner(store, runtime, folder, hub), max_upload_bytes=max_upload_bytes,
                  token_hint=token_hint)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.runner.start()
        yield
        svc.hub.close_all()
        stopped = await run_in_threadpool(svc.runner.stop)
        svc.store.close()
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
    app.state.service = svc
    app.state.store, app.state.runner, app.state.folder = svc.store, svc.runner, folder

    def begin_shutdown() -> None:
        """The server is stopping: end the event streams and stop the task in flight at its next round."""
        svc.closing.set()
        svc.runner.stop_event.set()

    app.state.begin_shutdown = begin_shutdown
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ------------------------------------------------------------------ errors

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, exc: FieldError) -> JSONResponse:
        return problem(exc.status, str(exc), exc.field)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return problem(422, str(exc))

    @app.exception_handler(RequestRefused)
    async def _refused(request: Request, exc: RequestRefused) -> JSONResponse:
        return problem(exc.status, exc.message, headers={"Connection": "close"})

    @app.exception_handler(StoreDamaged)
    async def _store_damaged(request: Request, exc: StoreDamaged) -> JSONResponse:
        return problem(500, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        return problem(422, f"{where or 'request'}: {err.get('msg', 'invalid')}.", where or None)

    @app.exception_handler(Problem)
    async def _problem_handler(request: Request, exc: Problem) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), headers=exc.headers)

    # every body bounded before it is read; a JSON body's depth checked before it is parsed (limits.py)
    app.add_middleware(BodyLimits, signed_in=lambda scope: svc.signed_in(HTTPConnection(scope)),
                       upload_bytes=max_upload_bytes * REQUEST_FILES_FACTOR)

    for module in (pages, tasks, ledger, models):
        app.include_router(module.router)
    return app
