"""The HTTP application: DICOMweb under `/dicom-web`, the admin API under `/api/v1`, health;
one auth model for all."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from node.catalog import Catalog
from node.config import Settings
from node.db.engine import make_engine
from node.implementation import IMPLEMENTATION_VERSION_NAME
from node.ingest.intake import Intake
from node.receiver import RECEIVE_BUSY_TIMEOUT_SECONDS
from node.storage import InstanceStore
from node.web import api, dashboard, health, metrics, qido, rules, stow, wado
from node.web.auth import Authenticator
from node.web.context import WebContext

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> FastAPI:
    assert settings.http is not None
    engine = make_engine(
        settings.database.url, flush_commits=False, busy_timeout=RECEIVE_BUSY_TIMEOUT_SECONDS
    )
    store = InstanceStore(settings.storage.path)
    intake = Intake(store, Catalog(engine), settings.storage.min_free_mb)
    app = FastAPI(
        title="ainode",
        version=IMPLEMENTATION_VERSION_NAME,
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.web = WebContext(settings, engine, store, intake, Authenticator(settings.http.auth))
    for router in (stow.router, qido.router, wado.router):
        app.include_router(router, prefix="/dicom-web")
    app.include_router(api.router)
    app.include_router(rules.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.middleware("http")(_log_request)
    app.exception_handler(Exception)(_internal_error)
    return app


async def _log_request(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """One line per request: method, path (never the query: it may hold patient IDs), status."""
    started = time.monotonic()
    response = await call_next(request)
    level = logging.WARNING if response.status_code >= 400 else logging.DEBUG
    log.log(
        level,
        "%s %s -> %d (%.0f ms)",
        request.method,
        request.url.path,
        response.status_code,
        (time.monotonic() - started) * 1000,
    )
    return response


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error; the node's log has the details"}, 500)
