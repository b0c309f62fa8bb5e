"""What every HTTP request passes through before a route sees it, and every response after:
the Host check that defeats DNS rebinding, and the security headers.

A browser on a page of `evil.example` that the attacker's DNS points at the node sends
`Host: evil.example`: such a request is refused, so no page of another site can read what the
node serves. A Host that is an IP address cannot be rebound and is always accepted; names are
accepted when they are the node's (`http.public_url`, `http.allowed_hosts`, the listen address,
the machine's own names, `localhost` for a loopback server).
"""

from __future__ import annotations

import ipaddress
import socket

from starlette.datastructures import MutableHeaders

from node.config import HttpSettings

NO_STORE = "no-store"
"""Answers that hold patient data are never kept by a browser or proxy cache."""
POLICY = "frame-ancestors 'none'; base-uri 'none'"
"""Every answer: no page may frame the node's (clickjacking)."""


class HostCheck:
    """Whether a request's Host header names this node."""

    def __init__(self, http: HttpSettings) -> None:
        names = {name.lower() for name in http.allowed_hosts}
        if http.public_url is not None:
            names.add(_hostname(http.public_url.split("://", 1)[1].split("/", 1)[0]))
        names.add(http.host.lower())
        if _is_loopback(http.host):
            names.add("localhost")
        else:
            names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
        self.names = frozenset(names)

    def allows(self, host_header: str | None) -> bool:
        if not host_header:
            return False  # HTTP/1.1 requires it (RFC 9112 3.2)
        host = _hostname(host_header)
        return host in self.names or _is_ip(host)


def security_headers(headers: MutableHeaders, path: str, content_type: str | None) -> None:
    """Add the headers every answer carries, unless its route set its own."""
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Content-Security-Policy", POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    if path.startswith(("/api/", "/dicom-web")) and "Cache-Control" not in headers:
        kind = (content_type or "").split(";", 1)[0].strip().lower()
        headers["Cache-Control"] = NO_STORE if "json" in kind or "xml" in kind else "private"


def _hostname(host_header: str) -> str:
    """The name or address of `host[:port]` or `[v6]:port`, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
