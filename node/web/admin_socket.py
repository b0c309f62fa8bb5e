"""The node's own CLI, answered over a Unix socket on this host.

The HTTP server also serves its app on `admin_socket_path(settings)`: a socket file of mode
0600, so only the node's OS user (and root) can connect, and each connection's peer is
checked again by its credentials (SO_PEERCRED). Such a caller may read the node's files and
database anyway, so it is an administrator without a token; it is named `local:<user>` in the
audit trail. The socket has no TLS: it never leaves the host.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import struct
from pathlib import Path

from node.roles import Role
from node.web.auth import Principal, granted

log = logging.getLogger(__name__)

PEER_UID = "ainode.local_uid"
"""Where a request on the admin socket carries its peer's uid (in the ASGI scope's state,
which only the server sets)."""


def bind_admin_socket(path: Path) -> socket.socket | None:
    """The listening socket at `path` (owner-only from the moment it exists); None, with a log
    line, when it cannot be made: the node serves without it and the CLI reads the database."""
    if len(os.fsencode(path)) >= 108:  # sun_path's size on Linux
        log.warning("no admin socket: %s is too long for a socket (set http.admin_socket)", path)
        return None
    if _answering(path):
        log.warning("no admin socket: another node answers on %s", path)
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.fchmod(sock.fileno(), 0o600)  # the file bind makes takes this mode: no window
    try:
        path.unlink(missing_ok=True)  # left by a node that was killed
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        log.warning("no admin socket at %s: %s", path, exc.strerror or exc)
        return None
    sock.listen(16)
    sock.set_inheritable(True)
    return sock


def _answering(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:  # none there, or left by a node that was killed
        return False
    finally:
        probe.close()
    return True


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket connection."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def may_administer(uid: int) -> bool:
    """The node's own user and root."""
    return uid in (os.getuid(), 0)


def local_principal(uid: int) -> Principal:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Principal(f"local:{user}", granted({Role.ADMIN}))
