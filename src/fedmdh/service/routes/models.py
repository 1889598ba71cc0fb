"""A task's models: downloaded (checked against the archived hashes) and used to predict new materials."""

from __future__ import annotations

import io
import json
import secrets
import shutil
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from fedmdh.data.io import read_csv_checked
from fedmdh.errors import InputError
from fedmdh.models import load_model
from fedmdh.audit import get_model
from fedmdh.ledger.blobs import sha256_hex
from fedmdh.service.context import TOKEN, Problem, Service, ServiceDep
from fedmdh.service.runner import run_dir, task_dir
from fedmdh.service.store import TaskRow
from fedmdh.service.submission import FieldError, FileEntry, sanitise_filename

router = APIRouter()


@router.get("/api/tasks/{task_id}/model", tags=["models"],
         summary="The archived models as a zip, every file checked against the archived hashes",
         dependencies=TOKEN,
         responses={200: {"content": {"application/zip": {}}}})
async def get_models(task_id: str, svc: ServiceDep):
    row = svc.row(task_id, with_metrics=False)
    svc.require_finished(row, "downloading the model")
    data, digest = await run_in_threadpool(_model_zip, svc, row, run_dir(svc.folder, row.id))
    headers = {"Content-Disposition": f'attachment; filename="fedmdh-{row.id}-models.zip"'}
    if digest:
        headers["X-Fedmdh-Model-Hash"] = digest
    return Response(data, media_type="application/zip", headers=headers)

def _model_zip(svc: Service, row: TaskRow, rd: Path) -> tuple[bytes, str | None]:
    with tempfile.TemporaryDirectory(dir=task_dir(svc.folder, row.id)) as tmp:
        if row.spec["ledger"] != "off":
            try:
                got = get_model(tmp, run_dir=rd)
            except InputError as exc:
                raise Problem(409, svc.public(row, str(exc))) from None
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

@router.post("/api/tasks/{task_id}/predict", tags=["models"],
          summary="Predict new materials with an institution's model (form: institution, file) -> CSV",
          dependencies=TOKEN,
          openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
              "type": "object", "required": ["institution", "file"],
              "properties": {"institution": {"type": "string"},
                             "file": {"type": "string", "format": "binary",
                                      "description": "new materials in that institution's columns"}}}}}}},
          responses={200: {"content": {"text/csv": {}}, "description": "the rows with predicted_TARGET added"}})
async def predict(task_id: str, request: Request, svc: ServiceDep):
    row = svc.row(task_id, with_metrics=False)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise Problem(415, "send institution and file as a form (multipart/form-data).")
    form = await svc.read_form(request)
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
    svc.require_finished(row, "predicting")
    tmp = task_dir(svc.folder, row.id) / "predict" / secrets.token_hex(6)
    try:
        entry = await svc.save_upload(upload, tmp / sanitise_filename(upload.filename, "input.csv"))
        try:
            csv_text, n = await run_in_threadpool(_predict_csv, run_dir(svc.folder, row.id) / "models" / inst,
                                                  entry)
        except InputError as exc:
            raise FieldError("file", svc.public(row, str(exc).replace(entry.path, entry.shown))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stem = Path(sanitise_filename(upload.filename, "input.csv")).stem
    return Response(csv_text, media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="predictions_{inst}_{stem}.csv"', "X-Fedmdh-Rows": str(n)})

def _predict_csv(model_dir: Path, entry: FileEntry) -> tuple[str, int]:
    m = load_model(model_dir)
    frame = read_csv_checked(entry.path)
    target = m.info.get("target", "y")
    out = frame.copy()
    out[f"predicted_{target}"] = m.predict(frame, entry.path)
    return out.to_csv(index=False), len(out)
