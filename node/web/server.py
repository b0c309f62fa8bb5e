"""The HTTP server in a process of its own (uvicorn), so that a slow upload or a large
retrieval never stalls DIMSE receiving. The parent binds the port (a port in use stops the
start with a clear line) and hands the socket to the child, and to its successor after a crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import threading
from functools import partial
from typing import Any

import uvicorn

from node.config import HttpSettings, Settings
from node.ops.lifecycle import CannotListen, Ready, exit_child, stop_when_parent_exits
from node.ops.logs import configure_logging
from node.web.limits import HttpLimits, guarded_protocol


def listen(http: HttpSettings) -> socket.socket:
    """The server's listening socket; CannotListen when the port or the TLS files fail."""
    if http.tls is not None:
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(http.tls.cert_file, http.tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise CannotListen(f"http.tls: cannot load the certificate or key: {exc}") from exc
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((http.host, http.port))
    except OSError as exc:
        sock.close()
        raise CannotListen(
            f"http: cannot listen on {http.host}:{http.port}: {exc.strerror or exc}"
        ) from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn serving the node's port, and its admin socket without TLS (the CLI on this
    host: `node.web.admin_socket`)."""

    def __init__(self, config: uvicorn.Config, admin: socket.socket | None) -> None:
        super().__init__(config)
        self.admin = admin

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.admin is None or not self.started:
            return
        protocol_class: Any = self.config.http_protocol_class  # GuardedHttpProtocol
        protocol = partial(
            protocol_class,
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_server(protocol, sock=self.admin))


def run_http_process(
    settings: Settings, sock: socket.socket, admin: socket.socket | None, ready: Ready
) -> None:
    """Entry point of the HTTP process: serve until SIGTERM or the parent is gone; `ready`
    is set once uvicorn serves."""
    from node.web.app import build_app

    configure_logging(settings.logging.level)
    http = settings.http
    assert http is not None
    os.nice(http.nice)  # image intake first when the CPU is short (an unprivileged call)
    config = uvicorn.Config(
        build_app(settings),
        log_config=None,
        access_log=False,  # request lines are logged without their query (patient IDs)
        lifespan="off",
        ssl_certfile=str(http.tls.cert_file) if http.tls else None,
        ssl_keyfile=str(http.tls.key_file) if http.tls else None,
        timeout_graceful_shutdown=10,
        server_header=False,
        http=guarded_protocol(
            HttpLimits(
                max_head_bytes=http.max_header_kb << 10,
                head_seconds=http.header_timeout_seconds,
                body_idle_seconds=http.body_idle_seconds,
                min_bytes_per_second=settings.node.min_transfer_kbps * 1024,
                max_connections=http.max_connections,
            )
        ),
        proxy_headers=bool(http.trusted_proxies),
        forwarded_allow_ips=http.trusted_proxies or None,
    )
    server = _Server(config, admin)
    stopping = threading.Event()
    stop_when_parent_exits(stopping)

    def stop_with_parent() -> None:
        stopping.wait()
        server.should_exit = True

    def tell_when_serving() -> None:
        while not (server.started or stopping.wait(0.05)):
            pass
        if server.started:
            ready.set()

    threading.Thread(target=stop_with_parent, name="parent-stop", daemon=True).start()
    threading.Thread(target=tell_when_serving, name="ready", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    server.run(sockets=[sock])
    exit_child()
