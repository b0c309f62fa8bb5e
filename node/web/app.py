"""The HTTP application: DICOMweb under `/dicom-web`, the admin API under `/api/v1`, health;
one auth model for all."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from node.config import Settings
from node.ingest.intake import Intake
from node.ingest.receiver import RECEIVE_BUSY_TIMEOUT_SECONDS
from node.ops.implementation import IMPLEMENTATION_VERSION_NAME
from node.ops.logs import Throttle
from node.store.catalog import Catalog
from node.store.db.engine import make_engine
from node.store.storage import InstanceStore
from node.web import (
    api,
    capabilities,
    dashboard,
    docs,
    health,
    metrics,
    qido,
    rendered,
    rules,
    stow,
    wado,
    workers,
    workitems,
)
from node.web.auth import Authenticator
from node.web.context import WebContext
from node.web.protect import HostCheck, security_headers

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
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.web = WebContext(settings, engine, store, intake, Authenticator(settings.http.auth))
    for router in (
        capabilities.router, stow.router, qido.router, wado.router, rendered.router,
        workitems.router,
    ):  # fmt: skip
        app.include_router(router, prefix="/dicom-web")
    app.include_router(api.router)
    app.include_router(workers.router)
    app.include_router(rules.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.include_router(docs.router)
    app.state.hosts = HostCheck(settings.http)
    app.add_middleware(HeadAsGet)  # innermost: the log and the CORS answer see HEAD
    app.middleware("http")(_answer_and_log)
    app.add_middleware(  # JSON and XML only: DICOM files and images are compressed already
        GZipMiddleware,
        minimum_size=1024,
        compresslevel=5,
        exclude_content_types=(
            "multipart/related", "application/dicom", "application/octet-stream", "image/jpeg",
            "image/png", "text/event-stream",
        ),
    )  # fmt: skip
    if settings.http.cors_origins:  # outermost: refusals carry the CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.http.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Warning", "Content-Location", "ETag", "Last-Modified"],
            max_age=600,
        )
    return app


class HeadAsGet:
    """HEAD is GET without the body (RFC 9110 9.3.2), on every GET route: monitors and
    proxies probe with it. The route answers a GET; the server sends only the head, since it
    knows the request was a HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


async def _answer_and_log(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """One line per request: method, path (never the query: it may hold patient IDs), status.
    A Host that names no host of this node is refused before any route; every answer gets the
    security headers. A client gone mid-request is one line too; an unexpected error is a 500
    whose traceback is logged once (`ErrorLog`), never a second time by the server."""
    started = time.monotonic()
    host = request.headers.get("host")
    if not request.app.state.hosts.allows(host):
        log.warning(
            "%s %s refused: Host %r is not this node", request.method, request.url.path, host
        )
        detail = "the Host header names no host of this node (see http.allowed_hosts)"
        refusal = JSONResponse({"detail": detail}, 400)
        security_headers(refusal.headers, request.url.path, refusal.media_type)
        return refusal
    response: Response
    try:
        response = await call_next(request)
    except ClientDisconnect:
        log.warning("%s %s: the client went away mid-request", request.method, request.url.path)
        return Response(status_code=400)
    except Exception as exc:
        ERRORS.record(request, exc)
        response = JSONResponse({"detail": "internal error; the node's log has the details"}, 500)
    security_headers(response.headers, request.url.path, response.headers.get("content-type"))
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


class ErrorLog:
    """Unexpected errors: the first of a kind (exception type and route) a minute is logged
    with its traceback, the others counted in the next one logged."""

    def __init__(self) -> None:
        self._throttle = Throttle()

    def record(self, request: Request, exc: Exception) -> None:
        route = request.scope.get("route")
        where = getattr(route, "path", "an unmatched path")
        skipped = self._throttle.due(f"{type(exc).__name__} {where}")
        if skipped is None:
            return
        more = f" ({skipped} more like it since the last one logged)" if skipped else ""
        log.error("%s %s failed%s", request.method, where, more, exc_info=exc)


ERRORS = ErrorLog()
