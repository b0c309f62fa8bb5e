"""`/healthz` (the HTTP process answers) and `/readyz` (the node can take and process
studies): database reachable, storage writable and above its watermark, the DICOM port
accepting, the node's processes alive, the routing rules valid."""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from node.routing.rules import RulesError, load_rules
from node.web.context import Context, WebContext
from pipelines.registry import pipeline_names

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
    """The parent's child processes that are alive (those it spawned: not multiprocessing's
    resource tracker), against what the config asks for."""
    settings = context.settings
    expected = settings.node.receivers - 1 + settings.workers.count + 1
    parent = str(os.getppid())
    alive = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            spawned = b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        alive += fields[1] == parent and fields[0] not in ("Z", "X") and spawned
    detail = f"{alive} of {expected} processes (receivers, workers, HTTP)"
    return Check(alive >= expected, detail)


def _rules(context: WebContext) -> Check:
    settings = context.settings
    rules_file = settings.routing.rules_file
    if rules_file is None:
        return Check(True, "no rules file: series are stored, not processed")
    names = set(pipeline_names(settings.pipelines))
    try:
        rules = load_rules(
            rules_file, names, settings.destination_names(), set(settings.notifications)
        )
    except RulesError as exc:
        return Check(False, str(exc).splitlines()[0])
    return Check(True, f"{len(rules.rules)} rules")
