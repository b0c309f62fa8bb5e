"""The CLI asking the running node on this host, over its admin socket
(`node.web.admin_socket`), for what it would otherwise read from the database itself: the
answer comes from a process that has its libraries loaded and its database open, so a
read-only command costs little more than starting Python. Standard library only."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path
from urllib.parse import urlencode

TIMEOUT_SECONDS = 5.0
"""How long a node that accepted the connection may take to answer before the CLI reads the
database itself (a stopped HTTP process must not hang the command that diagnoses it)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=TIMEOUT_SECONDS)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ask_node(
    path: Path | None, route: str, query: dict[str, str] | None = None, text: bool = False
) -> str | None:
    """The body of the node's 200 answer to `GET route` (plain text or JSON); None when no
    node answers there, or not with a 200: the caller then reads the database."""
    if path is None or not path.exists():
        return None
    target = f"{route}?{urlencode(query)}" if query else route
    connection = _UnixConnection(path)
    try:
        connection.request(
            "GET", target, headers={"Accept": "text/plain" if text else "application/json"}
        )
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return body.decode() if response.status == 200 else None
