"""Telling systemd how the node is (sd_notify(3) over `$NOTIFY_SOCKET`, for `Type=notify`):
ready once every process serves, stopping when asked to, and watchdog pings from the main
process's scheduler when the unit sets `WatchdogSec` (`$WATCHDOG_USEC`): a main process that
hangs is restarted. Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not under it or it cannot hear."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot tell systemd %s: %s", state.partition("=")[0], exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """How often to ping systemd's watchdog (a third of `WatchdogSec`), or None when it
    expects no pings from this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return usec / 3e6
