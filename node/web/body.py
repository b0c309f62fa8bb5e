"""A request body read whole, bounded: 413 before a byte is read when the declared length is
over the limit, and as soon as what arrived is over it (a chunked body declares none)."""

from __future__ import annotations

from fastapi import HTTPException, Request


async def read_bounded(request: Request, limit: int, too_large: str) -> bytes:
    """The body, at most `limit` bytes; `too_large` is the 413's detail."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, detail=too_large)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, detail=too_large)
    return bytes(data)
