"""Logging to stderr. Log lines carry UIDs and AE titles, never patient names or IDs."""

from __future__ import annotations

import faulthandler
import logging
import re
import sys
import threading
import time
import warnings

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class OneLineFormatter(logging.Formatter):
    """Each message is one line: control characters in it (a peer's AE title, user name or
    path with a newline in it) are escaped, so that no peer can forge a log line. A traceback
    that follows the message keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escaped(record.message)
        return super().formatMessage(record)


def escaped(text: str) -> str:
    """`text` with control characters as Python escapes (`\\n`, `\\x1b`)."""
    return CONTROL.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # A fatal signal (SIGBUS from SQLite's shared memory when its files turn immutable,
    # SIGSEGV in a native library) leaves "Fatal Python error" and the stacks in the log
    # instead of a silent death.
    faulthandler.enable()
    # pynetdicom's own INFO/DEBUG output dumps whole datasets, patient data included, and its
    # ERRORs come with tracebacks of what a peer sent: the node logs each outcome itself.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached": a sweep still running when its
    # next turn comes is expected (coalesced); a job's own exception is still logged.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # INFO lines per object built
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Warnings about values quote the values: highdicom's about person names quotes the
    # patient's name, pydicom's about invalid values quote them (patient IDs among them).
    for library in ("highdicom", "pydicom"):
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{library}(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # it logs those warnings too


class Throttle:
    """Whether a repeated event is due to be logged: once a `window_seconds` per key, with
    how many were skipped since, so that a flood of them cannot flood the log. Memory is
    bounded: past `max_keys` keys it starts afresh."""

    def __init__(self, window_seconds: float = 60.0, max_keys: int = 1024) -> None:
        self._window = window_seconds
        self._max_keys = max_keys
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def due(self, key: str) -> int | None:
        """None: skip this one; else log it, with the count skipped since the last."""
        now = time.monotonic()
        with self._lock:
            logged_at, skipped = self._seen.get(key, (now - self._window, 0))
            if now - logged_at < self._window:
                self._seen[key] = (logged_at, skipped + 1)
                return None
            if len(self._seen) >= self._max_keys:
                self._seen.clear()
            self._seen[key] = (now, 0)
            return skipped
