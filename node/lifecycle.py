"""Child processes (receivers, workers) follow their parent: they stop when it is gone."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import threading

log = logging.getLogger(__name__)


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
