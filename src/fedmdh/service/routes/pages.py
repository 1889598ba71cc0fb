"""The page: the task form, a task's page, signing in and out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from fedmdh.algorithms import ALGORITHMS
from fedmdh.service.auth import COOKIE
from fedmdh.service.context import ServiceDep

router = APIRouter(include_in_schema=False)

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


def _next(value: str | None) -> str:
    # only a path of this service: "//host" and "/\\host" would leave it
    return value if value and value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


def _signed_in_redirect(svc: ServiceDep, target: str) -> RedirectResponse:
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(COOKIE, svc.auth.session, httponly=True, samesite="strict", path="/")
    return resp


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, svc: ServiceDep):
    return svc.page(request, "index.html", algorithms=[(a, ALGORITHM_NOTES.get(a, "")) for a in ALGORITHMS])


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
async def task_page(request: Request, task_id: str, svc: ServiceDep):
    if svc.signed_in(request):
        svc.row(task_id, with_metrics=False)
    return svc.page(request, "task.html", task_id=task_id)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, svc: ServiceDep, next: str | None = None, token: str | None = None):
    if token is not None and svc.auth.token_ok(token):
        return _signed_in_redirect(svc, _next(next))
    return svc.render(request, "login.html", {"next": _next(next), "hint": svc.token_hint,
                                              "error": "that is not the service's token" if token else None},
                      status_code=401 if token else 200)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, svc: ServiceDep):
    form = await request.form()
    tok, nxt = form.get("token"), form.get("next")
    if isinstance(tok, str) and svc.auth.token_ok(tok):
        return _signed_in_redirect(svc, _next(nxt if isinstance(nxt, str) else None))
    return svc.render(request, "login.html", {"next": _next(nxt if isinstance(nxt, str) else None),
                                              "error": "that is not the service's token", "hint": svc.token_hint},
                      status_code=401)


@router.post("/logout")
async def logout():
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp
