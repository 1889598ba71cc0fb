"""A task's ledger: shown (as ``fedmdh ledger show``) and verified (as ``fedmdh ledger verify``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from fedmdh.errors import InputError
from fedmdh.audit import show, verify
from fedmdh.service.context import TOKEN, Problem, Service, ServiceDep
from fedmdh.service.runner import run_dir
from fedmdh.service.store import TaskRow

router = APIRouter()


def ledger_dir_of(svc: Service, row: TaskRow) -> Path:
    if row.spec["ledger"] == "off":
        raise Problem(409, f"task {row.id} was run with the ledger off: it has no ledger.")
    return run_dir(svc.folder, row.id)

@router.get("/api/tasks/{task_id}/ledger", tags=["ledger"],
         summary="Task, participants, rounds, commitments, attestations, gas (as `fedmdh ledger show`)",
         dependencies=TOKEN)
async def get_ledger(task_id: str, svc: ServiceDep) -> dict[str, Any]:
    row = svc.row(task_id, with_metrics=False)
    where = ledger_dir_of(svc, row)
    try:
        info = await run_in_threadpool(show, where)
    except InputError as exc:
        raise Problem(409, svc.public(row, str(exc))) from None
    info.pop("ledger", None)
    return info

@router.post("/api/tasks/{task_id}/verify", tags=["ledger"],
          summary="Replay and check the ledger (as `fedmdh ledger verify`): {ok, message, notes}",
          dependencies=TOKEN)
async def verify_ledger(task_id: str, svc: ServiceDep) -> dict[str, Any]:
    row = svc.row(task_id, with_metrics=False)
    where = ledger_dir_of(svc, row)
    # a task that stopped before its end is checked up to its last finalized round, and said so
    partial = row.status in ("interrupted", "failed")
    try:
        report = await run_in_threadpool(lambda: verify(where, partial=partial))
    except InputError as exc:
        raise Problem(409, svc.public(row, str(exc))) from None
    lines = str(report).splitlines()
    return {"ok": report.ok, "status": report.status, "message": svc.public(row, lines[0]),
            "notes": [svc.public(row, n) for n in report.notes],
            "rounds_verified": report.rounds_verified, "rounds_total": report.rounds_total}
