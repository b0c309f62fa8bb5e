"""`ainode serve`: the receiver processes, the completion sweep, clean start and stop.

Start-up migrates the database, clears temp files and closes associations left open by a
crash. `node.receivers` processes share the DICOM port (SO_REUSEPORT); the first one is this
process, which also runs the periodic work and restarts a receiver that dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from multiprocessing.process import BaseProcess

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from node.catalog import Catalog
from node.completion import SeriesCompletionTracker
from node.config import Settings
from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.dimse.scp import StorageSCP
from node.logs import configure_logging
from node.storage import InstanceStore

log = logging.getLogger(__name__)


class Receiver:
    """One storage SCP with its own database engine (one per process)."""

    def __init__(self, settings: Settings, reuse_port: bool) -> None:
        self.engine: Engine = make_engine(settings.database.url)
        self.sessions = make_session_factory(self.engine)
        self.catalog = Catalog(self.engine)
        self.store = InstanceStore(settings.storage.path)
        self.scp = StorageSCP(settings, self.store, self.catalog)
        self._reuse_port = reuse_port

    def start(self) -> None:
        self.scp.start(reuse_port=self._reuse_port)

    def stop(self) -> None:
        self.scp.stop()
        self.engine.dispose()


class NodeService:
    """Everything `ainode serve` runs, started and stopped in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._spawn = multiprocessing.get_context("spawn")
        self._children: list[BaseProcess] = []
        self._receiver: Receiver | None = None
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5}
        )

    def start(self) -> None:
        settings = self.settings
        engine = make_engine(settings.database.url)
        upgrade(engine)
        engine.dispose()
        InstanceStore(settings.storage.path).prepare()
        several = settings.node.receivers > 1
        self._receiver = Receiver(settings, reuse_port=several)
        stale = self._receiver.catalog.close_stale_associations()
        if stale:
            log.warning("closed %d associations left open by an earlier run", stale)
        self._receiver.start()
        for _ in range(settings.node.receivers - 1):
            self._children.append(self._start_child())
        tracker = SeriesCompletionTracker(self._receiver.sessions, settings.completion)
        interval = settings.completion.check_interval_seconds
        self._scheduler.add_job(tracker.sweep, "interval", seconds=interval, id="completion")
        if several:
            self._scheduler.add_job(self._supervise, "interval", seconds=1, id="supervise")
        self._scheduler.start()
        log.info("node %s ready", settings.node.ae_title)

    def stop(self) -> None:
        log.info("stopping: refusing new associations")
        # Supervision first: it would take a receiver we stop for a crashed one and respawn it.
        self._scheduler.shutdown(wait=True)
        for child in self._children:
            if child.is_alive():
                child.terminate()  # SIGTERM: the child drains like this process
        if self._receiver is not None:
            self._receiver.stop()
        for child in self._children:
            child.join(timeout=15)
            if child.is_alive():
                log.error("receiver process %d did not stop; killing it", child.pid)
                child.kill()
                child.join()
        log.info("node stopped")

    def _start_child(self) -> BaseProcess:
        child = self._spawn.Process(
            target=run_receiver_process, args=(self.settings,), name="receiver", daemon=False
        )
        child.start()
        return child

    def _supervise(self) -> None:
        assert self._receiver is not None
        for index, child in enumerate(self._children):
            if child.is_alive() or child.pid is None:
                continue
            closed = self._receiver.catalog.close_stale_associations([child.pid])
            log.error(
                "receiver process %d exited with %s; %d associations closed; restarting",
                child.pid,
                child.exitcode,
                closed,
            )
            self._children[index] = self._start_child()


def run_receiver_process(settings: Settings) -> None:
    """Entry point of an extra receiver process: serve until SIGTERM."""
    configure_logging(settings.logging.level)
    receiver = Receiver(settings, reuse_port=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    receiver.start()
    stopping.wait()
    receiver.stop()


def serve(settings: Settings) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    service = NodeService(settings)
    stopping = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    service.start()
    try:
        stopping.wait()
    finally:
        service.stop()
