"""`/healthz` (the HTTP process answers) and `/readyz` (the node can take and process
studies): database reachable, storage writable and above its watermark, the DICOM port
accepting, the node's processes alive, the routing rules valid."""

from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from node.flow.queue import running_jobs
from node.flow.routing import admin
from node.ops.processes import process_statuses
from node.web.context import Context, WebContext

router = APIRouter()


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@router.get("/healthz")
async def alive() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def ready(context: Context) -> JSONResponse:
    checks = await run_in_threadpool(readiness, context)
    ok = all(check.ok for check in checks.values())
    body = {
        "status": "ready" if ok else "not ready",
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


def readiness(context: WebContext) -> dict[str, Check]:
    return {
        "database": _database(context),
        "storage": _storage(context),
        "dimse": _dimse(context),
        "processes": _processes(context),
        "rules": _rules(context),
    }


def _database(context: WebContext) -> Check:
    try:
        with context.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means not ready
        return Check(False, f"unreachable: {type(exc).__name__}")
    return Check(True, context.engine.dialect.name)


def _storage(context: WebContext) -> Check:
    root = context.store.root
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".ready-"):
            pass
    except OSError as exc:
        return Check(False, f"{root} not writable: {exc.strerror}")
    problem = context.intake.problem()
    if problem is not None:
        return Check(False, problem)
    return Check(True, f"{context.store.free_mb():.0f} MB free")


def _dimse(context: WebContext) -> Check:
    node = context.settings.node
    host = "127.0.0.1" if node.host in ("0.0.0.0", "::", "") else node.host
    try:
        with socket.create_connection((host, node.port), timeout=1):
            pass
    except OSError as exc:
        return Check(False, f"{host}:{node.port} does not accept: {exc.strerror or exc}")
    return Check(True, f"{host}:{node.port}")


def _processes(context: WebContext) -> Check:
    """Every process the node records (receivers, workers, HTTP) alive and serving, as many
    as the config asks for."""
    settings = context.settings
    expected = settings.node.receivers + settings.workers.count + 1
    processes = process_statuses(settings.storage.path, running_jobs(context.engine))
    up = sum(process.alive and process.ready for process in processes)
    dead = [process.name for process in processes if not process.alive]
    starting = [process.name for process in processes if process.alive and not process.ready]
    detail = f"{up} of {expected} processes up"
    if starting:
        detail += f"; starting: {', '.join(starting)}"
    if dead:
        detail += f"; down: {', '.join(dead)}"
    return Check(up >= expected and not dead, detail)


def _rules(context: WebContext) -> Check:
    if context.settings.routing.rules_file is None:
        return Check(True, "no rules file: series are stored, not processed")
    checked = admin.check(context.settings)
    if not checked.valid:
        return Check(False, checked.problems[0].render())
    return Check(True, f"{checked.rules} rules")
