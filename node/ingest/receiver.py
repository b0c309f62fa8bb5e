"""A receiver: one storage SCP with its own database engine, one per process.

Kept apart from the service so that a receiver process imports no pipeline (no torch).
"""

from __future__ import annotations

import signal
import threading

from sqlalchemy import Engine

from node.config import Settings
from node.edge.scp import StorageSCP
from node.ingest.archive import CatalogArchive
from node.ingest.commitments import CatalogReports
from node.ingest.dimse import DimseIntake
from node.ingest.intake import Intake
from node.ops.lifecycle import Ready, exit_child, stop_when_parent_exits, wait_for_stop
from node.ops.logs import configure_logging
from node.store.catalog import Catalog
from node.store.db.engine import make_engine
from node.store.storage import InstanceStore

RECEIVE_BUSY_TIMEOUT_SECONDS = 5.0
"""A locked database answers A700 after this, well within a sender's own timeout."""


class Receiver:
    """One storage SCP with its own database engine (one per process).

    Its commits are not flushed one by one (`make_engine(flush_commits=False)`): each instance
    file is, before it is acknowledged, and `node.ingest.recovery` re-records the files whose
    rows a power loss took back.
    """

    def __init__(self, settings: Settings, reuse_port: bool) -> None:
        self.engine: Engine = make_engine(
            settings.database.url, flush_commits=False, busy_timeout=RECEIVE_BUSY_TIMEOUT_SECONDS
        )
        self.catalog = Catalog(self.engine)
        self.store = InstanceStore(settings.storage.path)
        intake = Intake(self.store, self.catalog, settings.storage.min_free_mb)
        archive = CatalogArchive(self.engine, settings.storage.path)
        reports = CatalogReports(self.engine, settings)
        self.scp = StorageSCP(settings, DimseIntake(intake), archive, reports)
        self._reuse_port = reuse_port

    def start(self) -> None:
        self.scp.start(reuse_port=self._reuse_port)

    def stop(self, close_database: bool = True) -> None:
        """Stop listening; close the database connections unless the database has turned
        unwritable (closing the last SQLite connection writes a checkpoint)."""
        self.scp.stop()
        if close_database:
            self.engine.dispose()


def run_receiver_process(settings: Settings, ready: Ready) -> None:
    """Entry point of an extra receiver process: serve until SIGTERM."""
    configure_logging(settings.logging.level)
    receiver = Receiver(settings, reuse_port=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    stop_when_parent_exits(stopping)
    receiver.start()
    ready.set()
    wait_for_stop(stopping)
    receiver.stop()
    exit_child()
