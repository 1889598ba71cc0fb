"""Tasks: submit (JSON with server paths, or a form with the CSV files), list, read, follow live, resume."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from fedmdh import __version__ as fedmdh_version
from fedmdh import jsonsafe
from fedmdh.service.context import TOKEN, Problem, ServiceDep
from fedmdh.service.limits import shown
from fedmdh.service.runner import task_dir
from fedmdh.service.store import FINAL
from fedmdh.service.submission import FieldError, FileEntry, build_task, discard, sanitise_filename

router = APIRouter()

KEEPALIVE_S = 15.0
#: a Last-Event-ID is a round number the stream sent (rounds are at most 100,000): ASCII digits only
_EVENT_ID = re.compile(r"[0-9]{1,9}")
POLL_S = 0.5  # how often an idle event stream looks whether the service is stopping


@router.get("/api/health", tags=["service"], summary="Liveness (no token needed)")
async def health(svc: ServiceDep) -> dict[str, Any]:
    return {"status": "ok", "version": fedmdh_version, "runtime": svc.runtime.name}


TASK_BODY = {
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



@router.post("/api/tasks", status_code=201, tags=["tasks"], summary="Submit a task",
          dependencies=TOKEN, openapi_extra=TASK_BODY)
async def create_task(request: Request, svc: ServiceDep):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    task_id = secrets.token_hex(6)
    tdir = task_dir(svc.folder, task_id)
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
            form = await svc.read_form(request)
            for i, item in enumerate(form.getlist("institutions")):
                if isinstance(item, UploadFile):
                    if not item.filename and not item.size:
                        continue  # an empty file input
                    name = sanitise_filename(item.filename, f"institution{i}.csv")
                    institutions.append(await svc.save_upload(item, tdir / "uploads" / f"inst{i}" / name))
                elif item.strip():
                    institutions.append(FileEntry(item.strip(), item.strip()))
            t = form.get("test")
            if isinstance(t, UploadFile) and (t.filename or t.size):
                test = await svc.save_upload(t, tdir / "uploads" / "test" / sanitise_filename(t.filename, "test.csv"))
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
    svc.store.add(task_id, spec.to_dict(), info)
    svc.runner.submit(task_id)
    return JSONResponse({"id": task_id, "status": "queued", "url": f"/api/tasks/{task_id}"}, status_code=201,
                        headers={"Location": f"/api/tasks/{task_id}"})

@router.get("/api/tasks", tags=["tasks"], summary="Every task, newest first (without per-round metrics)",
         dependencies=TOKEN)
async def list_tasks(svc: ServiceDep) -> dict[str, Any]:
    latest = svc.store.latest_rounds()
    return {"tasks": [svc.view(r, latest.get(r.id), full=False) for r in svc.store.list()]}

@router.get("/api/tasks/{task_id}", tags=["tasks"], summary="One task: status, rounds, metrics, heterogeneity",
         dependencies=TOKEN)
async def get_task(task_id: str, svc: ServiceDep) -> dict[str, Any]:
    return svc.view(svc.row(task_id))

@router.get("/api/tasks/{task_id}/events", tags=["tasks"], summary="Live progress (server-sent events)",
         dependencies=TOKEN,
         responses={200: {"content": {"text/event-stream": {}},
                          "description": "events `round` (id = round), `status`, and `end`"}})
async def task_events(task_id: str, request: Request, svc: ServiceDep):
    svc.row(task_id, with_metrics=False)
    last = (request.headers.get("last-event-id") or "").strip()
    if last and not _EVENT_ID.fullmatch(last):
        raise Problem(400, f"Last-Event-ID {shown(last)} is not the id of an event of this stream (a round "
                           "number, ASCII digits, at most 9); send the last id received, or none.")
    after = int(last) if last else 0
    queue = svc.hub.subscribe(task_id)

    def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
        head = f"id: {event_id}\n" if event_id is not None else ""
        return f"{head}event: {event}\ndata: {json.dumps(data, default=float)}\n\n"

    async def stream():
        sent = after
        try:
            row = svc.row(task_id, with_metrics=False)
            rounds = row.spec["rounds"]
            for rec in svc.store.rounds_after(task_id, sent):
                yield sse("round", {**rec, "rounds": rounds}, rec["round"])
                sent = rec["round"]
            row = svc.row(task_id, with_metrics=False)
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
                    if svc.closing.is_set():
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
                        for rec in svc.store.rounds_after(task_id, sent):
                            yield sse("round", {**rec, "rounds": rounds}, rec["round"])
                            sent = rec["round"]
                    yield sse("status", data)
                    if data["status"] in FINAL:
                        yield sse("end", data)
                        return
        finally:
            svc.hub.unsubscribe(task_id, queue)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/api/tasks/{task_id}/resume", status_code=202, tags=["tasks"],
          summary="Resume an interrupted task (where the runtime can)", dependencies=TOKEN)
async def resume(task_id: str, svc: ServiceDep) -> dict[str, Any]:
    row = svc.row(task_id, with_metrics=False)
    if row.status != "interrupted":
        raise Problem(409, f"task {row.id} is {row.status}; only an interrupted task can be resumed.")
    if not svc.runtime.can_resume:
        raise Problem(409, f"the {svc.runtime.name} runtime cannot resume a task (it keeps no checkpoint); submit "
                           "the task again.")
    svc.store.requeue(row.id)
    svc.runner.submit(row.id)
    return {"id": row.id, "status": "queued"}

