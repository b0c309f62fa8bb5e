"""The API's documentation at `/api/docs`: Swagger UI served by the node itself (the
`swagger-ui-py` package's files: a hospital network has no CDN), over `/api/openapi.json`,
which needs the same credentials as the API. The page signs in with the dashboard's token
(the browser tab's session storage)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from node.web.context import authenticated
from node.web.dashboard import STATIC

router = APIRouter(include_in_schema=False)

POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
"""Swagger UI's own files only; its components set inline styles."""
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "docs.js": "text/javascript",
}


def _swagger_static() -> Path:
    spec = find_spec("swagger_ui")
    assert spec is not None and spec.submodule_search_locations, "swagger-ui-py is installed"
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@router.get("/api/docs")
def page() -> FileResponse:
    return _file(STATIC / "docs.html", "text/html")


@router.get("/api/docs/assets/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, detail=f"no asset {name!r}")
    folder = STATIC if name == "docs.js" else _swagger_static()
    return _file(folder / name, ASSETS[name])


@router.get("/api/openapi.json", dependencies=[Depends(authenticated)])
def schema(request: Request) -> dict[str, Any]:
    openapi: dict[str, Any] = request.app.openapi()
    return openapi


def _file(path: Path, media_type: str) -> FileResponse:
    headers = {"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"}
    return FileResponse(path, media_type=media_type, headers=headers)
