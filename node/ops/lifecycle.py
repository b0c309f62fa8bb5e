"""Child processes (receivers, workers, the HTTP server) follow their parent: they stop when
it is gone, and tell it when they serve (`Ready`). Start-up failures a child cannot report
itself are found in the parent."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
from typing import NoReturn, Protocol

log = logging.getLogger(__name__)


class CannotListen(OSError):
    """A configured port cannot be bound, or its TLS files cannot be loaded."""


def stop_when_parent_exits(stopping: threading.Event) -> None:
    """Set `stopping` once the parent process is gone (killed with SIGKILL, it cannot pass on
    its stop; an orphan would go on working beside the processes of the next start)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        log.error("parent process %s exited; stopping", parent.pid)
        stopping.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Ready(Protocol):
    """How a child process tells its parent that it serves (a `multiprocessing.Event`)."""

    def set(self) -> None: ...


def wait_for_stop(stopping: threading.Event) -> None:
    """Block the main thread until `stopping` is set, waking every second: a signal the kernel
    delivers to another thread runs its Python handler only when the main thread wakes, so an
    untimed wait can leave a SIGTERM unanswered (seen: 30 s)."""
    while not stopping.wait(1.0):
        pass


def exit_child() -> NoReturn:
    """End a child process once its work has stopped, its log flushed, without the
    interpreter's teardown: the atexit callbacks walk registries (weakref finalizers) that
    daemon threads still running (pynetdicom's, the parent watch, a request's) may change,
    and printed `dictionary changed size during iteration` when the parent was killed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
