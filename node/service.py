"""`ainode serve`: the receiver processes, the HTTP server, the completion sweep, clean start
and stop.

Start-up migrates the database, clears temp files, closes associations left open by a crash
and, after an operating-system restart, re-records instances a power loss took from the
database (`node.ingest.recovery`). `node.receivers` processes share the DICOM port
(SO_REUSEPORT); the first one is this process, which also runs the periodic work and restarts
a receiver that dies.
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from node.config import HttpSettings, Settings
from node.delivery.audit_export import AuditExporter
from node.delivery.dispatch.dispatcher import Dispatcher
from node.delivery.fetch.fetcher import Fetcher
from node.delivery.fetch.priors import PriorsQueue
from node.delivery.notify import Notifier
from node.delivery.performer import Performer
from node.flow.announce import AnnouncedJobs
from node.flow.completion import SeriesCompletionTracker, StudyCompletionTracker
from node.flow.queue import JobQueue
from node.flow.routing.router import JobSink, Router, RulesSource
from node.ingest.receiver import RECEIVE_BUSY_TIMEOUT_SECONDS, Receiver, run_receiver_process
from node.ingest.recovery import recover_after_restart, rerecord_unrecorded
from node.ops import systemd
from node.ops.audit import ApplicationEvent, record_quietly
from node.ops.lifecycle import wait_for_stop
from node.ops.processes import RecordedProcess, record_processes
from node.store.db.engine import (
    DatabaseNotWritable,
    check_writable,
    make_engine,
    make_session_factory,
)
from node.store.db.migrate import upgrade
from node.store.db.models import utcnow
from node.store.leased import RetryPolicy
from node.store.retention import RetentionSweeper
from node.store.storage import InstanceStore
from node.web.server import listen, run_http_process
from node.work.process import run_worker_process
from pipelines.registry import pipeline_names

log = logging.getLogger(__name__)


class NodeService:
    """Everything `ainode serve` runs, started and stopped in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._spawn = multiprocessing.get_context("spawn")
        self._children: list[_Child] = []
        self._engine: Engine | None = None
        self._receiver: Receiver | None = None
        self._dispatcher: Dispatcher | None = None
        self._fetcher: Fetcher | None = None
        self._exporter: AuditExporter | None = None
        self._store: InstanceStore | None = None
        self.stopping = threading.Event()
        self.fault: DatabaseNotWritable | None = None
        """Why the node stopped itself (its database file turned unwritable), if it did."""
        self._crash_checks: dict[str, tuple[float, float]] = {}
        self._announced = False
        """Whether "ready" was logged: once every child serves, not before."""
        self._ready_recorded: set[str] = set()
        """The children the process table last written says are ready."""
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5}
        )

    def start(self) -> None:
        settings = self.settings
        self._engine = engine = make_engine(settings.database.url)
        check_writable(engine.url)
        upgrade(engine)
        self._store = store = InstanceStore(settings.storage.path)
        store.prepare()
        unclean = store.mark_running()
        if unclean:
            log.warning("the node did not stop cleanly last time: checking the stored files")
        several = settings.node.receivers > 1
        self._receiver = receiver = Receiver(settings, reuse_port=several)
        stale = receiver.catalog.close_stale_associations()
        if stale:
            log.warning("closed %d associations left open by an earlier run", stale)
        recover_after_restart(engine, store, receiver.catalog, settings.node.ae_title, unclean)
        receiver.start()
        if settings.http is not None:
            http_socket = listen(settings.http)
            self._start_child("http", run_http_process, (settings, http_socket))
            log.info("HTTP server on %s:%d", settings.http.host, settings.http.port)
            _warn_if_anonymous_beyond_loopback(settings.http)
        for index in range(1, settings.node.receivers):  # receiver 0 is this process
            self._start_child(f"receiver-{index}", run_receiver_process, (settings,))
        for index in range(settings.workers.count):
            self._start_child(f"worker-{index}", run_worker_process, (settings, index))
        self._record_processes()
        record_quietly(engine, _operator(), ApplicationEvent(action="start"))
        self._schedule(engine)
        self._scheduler.start()
        self._announce_when_ready()

    def _announce_when_ready(self) -> None:
        """Log "ready" once every child process serves (the HTTP server answers, receivers
        listen, workers have loaded their pipelines), and record who is ready."""
        if self._ready_children() != self._ready_recorded:
            self._record_processes()
        if not self._announced and len(self._ready_recorded) == len(self._children):
            self._announced = True
            log.info("node %s ready", self.settings.node.ae_title)
            systemd.notify("READY=1\nSTATUS=every process serves")

    def _schedule(self, engine: Engine) -> None:
        settings = self.settings
        queue = JobQueue(engine, RetryPolicy.of(settings.workers))
        rules = RulesSource(
            settings.routing.rules_file,
            pipeline_names(settings.pipelines),
            settings.destination_names(),
            set(settings.notifications),
        )
        rules.current()
        if settings.routing.rules_file is None:
            log.warning("no routing.rules_file: series are stored, not processed")
        for doubt in settings.doubts():
            log.warning("%s", doubt)
        priors = PriorsQueue(engine, settings.fetch.max_attempts)
        jobs: JobSink = queue
        if settings.workitems.announce:
            jobs = AnnouncedJobs(queue, engine, settings.node.ae_title)
        router = Router(engine, settings.storage.path, rules, jobs, priors)
        sessions = make_session_factory(engine)
        series_tracker = SeriesCompletionTracker(sessions, settings.completion)
        study_tracker = StudyCompletionTracker(sessions, settings.completion)

        def complete_and_route() -> None:
            series_tracker.sweep()
            router.route_pending()

        def complete_studies() -> None:
            router.studies_completed(study_tracker.sweep())

        interval = settings.completion.check_interval_seconds

        def add(work: Callable[..., object], *args: Any, **kwargs: Any) -> None:
            self._scheduler.add_job(self._unless_unwritable(work), *args, **kwargs)

        add(complete_and_route, "interval", seconds=interval, id="completion")
        add(complete_studies, "interval", seconds=1, id="studies")
        add(
            queue.requeue_expired,
            "interval",
            seconds=settings.workers.lease_seconds / 3,
            id="leases",
        )
        retention = settings.storage.retention_days
        if retention is not None:
            sweeper = RetentionSweeper(engine, settings.storage.path, retention)
            add(sweeper.sweep, "interval", hours=1, id="retention", next_run_time=utcnow())
        self._dispatcher = dispatcher = Dispatcher(engine, settings)
        interrupted = dispatcher.requeue_interrupted()
        if interrupted:
            log.warning("%d dispatches interrupted by an earlier stop go out again", interrupted)
        add(dispatcher.run_due, "interval", seconds=settings.dispatch.poll_seconds, id="dispatch")
        add(dispatcher.queue.requeue_expired, "interval", seconds=60, id="dispatch-leases")
        notifier = Notifier(engine, settings)
        add(notifier.run_due, "interval", seconds=settings.notify.poll_seconds, id="notify")
        add(notifier.queue.requeue_expired, "interval", seconds=60, id="notify-leases")
        self._fetcher = fetcher = Fetcher(engine, settings)
        add(fetcher.run_due, "interval", seconds=settings.fetch.poll_seconds, id="fetch")
        add(fetcher.queue.requeue_expired, "interval", seconds=30, id="fetch-leases")
        performer = Performer(engine, settings)
        add(performer.run_due, "interval", seconds=settings.workitems.poll_seconds, id="workitems")
        syslog = settings.audit.syslog
        if syslog is not None:
            self._exporter = exporter = AuditExporter(engine, settings)
            add(exporter.run_due, "interval", seconds=syslog.poll_seconds, id="audit-export")
        if self._children:
            add(self._supervise, "interval", seconds=1, id="supervise")
        add(self._guard_database, "interval", seconds=1, id="database-guard")
        watchdog = systemd.watchdog_interval()
        if watchdog is not None:  # the scheduler runs: this process is alive
            add(systemd.notify, "interval", args=("WATCHDOG=1",), seconds=watchdog, id="watchdog")

    def _unless_unwritable(self, work: Callable[..., object]) -> Callable[..., None]:
        """`work`, which stops the node instead of failing when the database has turned
        unwritable."""

        def run(*args: object) -> None:
            try:
                work(*args)
            except DatabaseNotWritable as exc:
                self._stop_for(exc)

        return run

    def _stop_for(self, fault: DatabaseNotWritable) -> None:
        if self.fault is None:
            log.error("%s: stopping the node before a write fails", fault)
            self.fault = fault
            self.stopping.set()

    def _guard_database(self) -> None:
        """Stop the node, cleanly, as soon as its SQLite files cannot be written (made
        immutable or read-only): writing through SQLite's shared memory then would kill the
        process with SIGBUS, mid-association."""
        assert self._engine is not None
        try:
            check_writable(self._engine.url)
        except DatabaseNotWritable as exc:
            self._stop_for(exc)

    def stop(self) -> None:
        log.info("stopping: refusing new associations")
        systemd.notify("STOPPING=1")
        # Supervision first: it would take a child we stop for a crashed one and respawn it.
        self._scheduler.shutdown(wait=True)
        if self._dispatcher is not None:
            self._dispatcher.close()
        if self._fetcher is not None:
            self._fetcher.close()
        processes = [child.process for child in self._children]
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: receivers drain, workers finish their job
        if self._receiver is not None:
            self._receiver.stop(close_database=self.fault is None)
        for process in processes:
            process.join(timeout=self.settings.workers.lease_seconds)
            if process.is_alive():
                log.error("process %d did not stop; killing it", process.pid)
                process.kill()
                process.join()
        if self.fault is not None:
            log.info("node stopped; its database is left as it is")
            return
        if self._engine is not None:
            self._run_pending_crash_checks()
            record_quietly(self._engine, _operator(), ApplicationEvent(action="stop"))
            if self._exporter is not None:
                self._exporter.run_due()  # the stop too, while the collector listens
                self._exporter.close()
            self._engine.dispose()
        if self._store is not None:
            self._store.mark_stopped()
        log.info("node stopped")

    def _start_child(
        self, name: str, target: Callable[..., None], args: tuple[object, ...]
    ) -> None:
        ready = self._spawn.Event()
        process = self._spawn.Process(target=target, args=(*args, ready), name=name, daemon=False)
        started_at = time.time()
        process.start()
        self._children.append(_Child(name, target, args, process, started_at, ready))

    def _supervise(self) -> None:
        assert self._receiver is not None
        for child in list(self._children):
            process = child.process
            if process.is_alive() or process.pid is None:
                continue
            closed = self._receiver.catalog.close_stale_associations([process.pid])
            temp = self._store.clear_temp_files_of(process.pid) if self._store else 0
            log.error(
                "%s process %d exited with %s; %d associations closed, %d temp files removed; "
                "restarting",
                child.name,
                process.pid,
                process.exitcode,
                closed,
                temp,
            )
            self._children.remove(child)
            self._start_child(child.name, child.target, child.args)
            self._record_processes()
            if child.name.startswith("receiver") or child.name == "http":
                self._check_after_crash(child)
        self._announce_when_ready()

    def _check_after_crash(self, child: _Child) -> None:
        """Re-record, once the other receivers' commits are surely done, the files the
        crashed receiver or HTTP server wrote but did not record (never acknowledged, but
        whole); a stop before then runs the check at once."""
        check_id = f"crash-check-{child.process.pid}"
        self._crash_checks[check_id] = (child.started_at, time.time())
        self._scheduler.add_job(
            self._run_crash_check,
            "date",
            run_date=datetime.fromtimestamp(time.time() + CRASH_CHECK_DELAY_SECONDS, UTC),
            args=(check_id,),
            id=check_id,
        )

    def _run_crash_check(self, check_id: str) -> None:
        assert self._receiver is not None and self._store is not None and self._engine
        window = self._crash_checks.pop(check_id, None)
        if window is None:
            return
        rerecord_unrecorded(
            self._engine, self._store, self._receiver.catalog, self.settings.node.ae_title, window
        )

    def _run_pending_crash_checks(self) -> None:
        """At a stop, the crash checks still waiting: every child has stopped, so every
        commit they would wait for is done."""
        for check_id in list(self._crash_checks):
            self._run_crash_check(check_id)

    def _ready_children(self) -> set[str]:
        return {child.name for child in self._children if child.ready.is_set()}

    def _record_processes(self) -> None:
        self._ready_recorded = self._ready_children()
        processes = [RecordedProcess(name="main", pid=os.getpid(), ready=True)]
        processes += [
            RecordedProcess(
                name=child.name, pid=child.process.pid, ready=child.name in self._ready_recorded
            )
            for child in self._children
            if child.process.pid is not None
        ]
        record_processes(self.settings.storage.path, processes)


def _warn_if_anonymous_beyond_loopback(http: HttpSettings) -> None:
    if not http.auth.anonymous:
        return
    try:
        loopback = ipaddress.ip_address(http.host).is_loopback
    except ValueError:
        loopback = http.host == "localhost"
    if not loopback:
        roles = ", ".join(http.auth.anonymous)
        log.warning(
            "http: serving %s beyond loopback; callers without a token may %s from this "
            "machine only",
            http.host,
            roles,
        )


@dataclass(frozen=True)
class _Child:
    """A child process, and how to start its successor."""

    name: str
    target: Callable[..., None]
    args: tuple[object, ...]
    process: BaseProcess
    started_at: float
    ready: Event
    """Set by the child once it serves."""


CRASH_CHECK_DELAY_SECONDS = 3 * RECEIVE_BUSY_TIMEOUT_SECONDS
"""After a receiver crashes, the files written while it lived are checked this much later:
by then every other receiver has recorded (or removed) what it wrote in that time."""
PRIVATE_UMASK = 0o027
"""Files the node writes (database, instances, results) are readable by its owner and group
only: they hold study descriptions, dates and images."""


def serve(settings: Settings) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    os.umask(PRIVATE_UMASK)  # inherited by the receiver and worker processes
    service = NodeService(settings)

    def _request_stop(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        service.stopping.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    service.start()
    try:
        wait_for_stop(service.stopping)
    finally:
        service.stop()
    if service.fault is not None:
        # Not a return: finalizers would close SQLite connections, and closing the last one
        # writes a checkpoint through the shared memory that now faults.
        log.error("stopped: %s", service.fault)
        logging.shutdown()
        os._exit(1)


def _operator() -> str:
    """Who started the node: the account it runs as."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
