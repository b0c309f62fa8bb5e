"""The dashboard at `/`: one static page over the admin API, no front-end build. It signs in
with a bearer token (kept in the browser tab's session storage) and writes every value with
`textContent`, never as HTML: series descriptions and AE titles come from peers."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).with_name("static")
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Only the node's own script and style run; the page cannot be framed."""

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return _file("dashboard.html", "text/html")


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, detail=f"no asset {name!r}")
    return _file(name, ASSETS[name])


def _file(name: str, media_type: str) -> FileResponse:
    headers = {
        "Content-Security-Policy": POLICY,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return FileResponse(STATIC / name, media_type=media_type, headers=headers)
