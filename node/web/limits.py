"""uvicorn's HTTP protocol with the limits a hostile network needs, which uvicorn lacks: a
bounded request head (431) that must arrive whole within a deadline (408), a body that may
neither stall nor trickle (the connection is closed: the route sees the client gone), and a
cap on open connections (503), each refusal logged in one line a minute per kind.

Slowloris, header floods and a STOW-RS that sends one byte every ten seconds (holding its
series open) cost a file descriptor for seconds, not for ever.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from node.ops.logs import Throttle
from node.web.admin_socket import PEER_UID, may_administer, peer_uid

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
"""How often a request in progress is checked against its deadlines."""


@dataclass(frozen=True)
class HttpLimits:
    max_head_bytes: int
    head_seconds: float
    body_idle_seconds: float
    min_bytes_per_second: float
    """After `body_idle_seconds`, a body must have arrived at least this fast on average."""
    max_connections: int


REFUSALS = Throttle()


def guarded_protocol(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn runs (`Config(http=...)`), bound to `limits`."""

    class Bound(GuardedHttpProtocol):
        pass

    Bound.limits = limits
    return Bound


class GuardedHttpProtocol(HttpToolsProtocol):
    limits: HttpLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_started = time.monotonic()
        self._head_complete = False
        self._body_started = 0.0
        self._body_bytes = 0
        self._last_body = 0.0
        self._refused = False
        self._ticker: asyncio.TimerHandle | None = None
        self._local_uid: int | None = None
        self._forbidden = False
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:  # the admin socket
            self._local_uid = peer_uid(sock)
            self._forbidden = not may_administer(self._local_uid)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Service Unavailable", "open connections at http.max_connections")
            return
        self._tick_later()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_ticking()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._forbidden:  # answered once its request is in: closing on unread bytes resets
            self._refuse(403, "Forbidden", f"admin socket: uid {self._local_uid} refused")
            return
        if not self._head_complete:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._head_complete and self._head_bytes > self.limits.max_head_bytes:
            limit = self.limits.max_head_bytes >> 10
            self._refuse(431, "Request Header Fields Too Large", f"head over {limit} KiB")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._local_uid is not None:
            self.scope["state"][PEER_UID] = self._local_uid
        if self._head_complete:  # the next request on a kept-alive connection
            self._head_complete = False
            self._head_bytes = 0
            self._head_started = time.monotonic()
            self._tick_later()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._head_complete = True
        self._body_started = self._last_body = time.monotonic()
        self._body_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._last_body = time.monotonic()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_ticking()
        super().on_message_complete()

    def _tick_later(self) -> None:
        if self._ticker is None:
            self._ticker = self.loop.call_later(TICK_SECONDS, self._tick)

    def _stop_ticking(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _tick(self) -> None:
        self._ticker = None
        if self.transport.is_closing():
            return
        problem = self._overdue(time.monotonic())
        if problem is None:
            self._tick_later()
        elif not self._head_complete:
            self._refuse(408, "Request Timeout", problem)
        else:  # mid-body: the route sees the client gone
            self._note(problem)
            self.transport.close()

    def _overdue(self, now: float) -> str | None:
        limits = self.limits
        if not self._head_complete:
            if now - self._head_started > limits.head_seconds:
                return f"request head not whole within {limits.head_seconds:g} s"
            return None
        if self.flow.read_paused:  # the node is not reading: not the client's delay
            self._last_body = now
            return None
        if now - self._last_body > limits.body_idle_seconds:
            return f"no body byte for {limits.body_idle_seconds:g} s"
        elapsed = now - self._body_started
        floor = limits.min_bytes_per_second * (elapsed - limits.body_idle_seconds)
        if floor > 0 and self._body_bytes < floor:
            rate = self._body_bytes / elapsed / 1024
            return f"body at {rate:.2f} KiB/s, below node.min_transfer_kbps"
        return None

    def _refuse(self, status: int, reason: str, problem: str) -> None:
        self._refused = True
        self._stop_ticking()
        self._note(problem)
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        self.transport.close()

    def _note(self, problem: str) -> None:
        where = self.client[0] if self.client else "?"
        skipped = REFUSALS.due(problem.split(" ", 1)[0] + where)
        if skipped is not None:
            more = f" ({skipped} more like it since)" if skipped else ""
            log.warning("http connection from %s closed: %s%s", where, problem, more)
