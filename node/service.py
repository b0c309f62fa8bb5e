"""`ainode serve`: the receiver processes, the HTTP server, the coordinator's periodic work
and the workers (every role, or those named), clean start and stop.

Start-up migrates the database, clears temp files, closes associations left open by a crash
and, after an operating-system restart, re-records instances a power loss took from the
database (`node.ingest.recovery`). `node.receivers` processes share the DICOM port
(SO_REUSEPORT); the first one is this process, which also runs the periodic work and restarts
a receiver that dies. Started with some roles only (`ainode serve --role`), a process tree
runs those; of several trees with the coordinator role, one coordinates and the others stand
by (`node.flow.leadership`).
"""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.config import HttpSettings, Settings, admin_socket_path
from node.delivery.audit_export import AuditExporter
from node.delivery.dispatch.dispatcher import Dispatcher
from node.delivery.fetch.fetcher import Fetcher
from node.delivery.fetch.priors import PriorsQueue
from node.delivery.notify import Notifier
from node.delivery.performer import Performer
from node.flow.announce import AnnouncedJobs
from node.flow.completion import SeriesCompletionTracker, StudyCompletionTracker
from node.flow.leadership import COORDINATOR, Lease
from node.flow.queue import JobQueue
from node.flow.routing.router import JobSink, Router, RulesSource
from node.ingest.receiver import RECEIVE_BUSY_TIMEOUT_SECONDS, Receiver, run_receiver_process
from node.ingest.recovery import recover_after_restart, rerecord_unrecorded
from node.ops import systemd
from node.ops.audit import ApplicationEvent, record_quietly
from node.ops.lifecycle import wait_for_stop
from node.ops.processes import (
    RecordedProcess,
    association_holders,
    forget_processes,
    mark_alive,
    record_processes,
)
from node.roles import ServiceRole
from node.store.catalog import Catalog
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
from node.web.admin_socket import bind_admin_socket
from node.web.server import listen, run_http_process
from node.work.process import run_worker_process
from pipelines.registry import pipeline_names

log = logging.getLogger(__name__)


class NodeService:
    """Everything `ainode serve` runs, started and stopped in order."""

    def __init__(
        self, settings: Settings, roles: frozenset[ServiceRole] = frozenset(ServiceRole)
    ) -> None:
        self.settings = settings
        self.roles = roles
        self._spawn = multiprocessing.get_context("spawn")
        self._children: list[_Child] = []
        self._engine: Engine | None = None
        self._receiver: Receiver | None = None
        self._catalog: Catalog | None = None
        self._lease: Lease | None = None
        self._dispatcher: Dispatcher | None = None
        self._fetcher: Fetcher | None = None
        self._exporter: AuditExporter | None = None
        self._store: InstanceStore | None = None
        self._admin_socket: Path | None = None
        """The CLI's socket file, while this tree owns it."""
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
        self._store = InstanceStore(settings.storage.path)
        self._store.prepare()
        if ServiceRole.EDGE in self.roles:
            self._start_edge(engine, self._store)
        else:
            self._catalog = Catalog(engine)
        if ServiceRole.HTTP in self.roles and settings.http is not None:
            http_socket = listen(settings.http)
            admin_path = admin_socket_path(settings)
            admin_socket = bind_admin_socket(admin_path) if admin_path else None
            if admin_socket is not None:
                self._admin_socket = admin_path
            for index in range(settings.http.processes):  # all accepting on one socket
                name = f"http-{index}" if index else "http"
                self._start_child(name, run_http_process, (settings, http_socket, admin_socket))
            log.info("HTTP server on %s:%d", settings.http.host, settings.http.port)
            _warn_if_anonymous_beyond_loopback(settings.http)
        if ServiceRole.EDGE in self.roles:
            for index in range(1, settings.node.receivers):  # receiver 0 is this process
                self._start_child(f"receiver-{index}", run_receiver_process, (settings,))
        if ServiceRole.WORKER in self.roles:
            for index in range(settings.workers.count):
                self._start_child(f"worker-{index}", run_worker_process, (settings, index))
        record_quietly(engine, _operator(), ApplicationEvent(action="start"))
        self._schedule(engine)
        self._record_processes()
        self._scheduler.start()
        self._announce_when_ready()

    def _start_edge(self, engine: Engine, store: InstanceStore) -> None:
        """The first receiver, after the checks a start owes the stored instances: the
        associations an earlier run left open are closed, what a crash or power loss took
        from the database is recorded again."""
        settings = self.settings
        unclean = store.mark_running()
        if unclean:
            log.warning("the node did not stop cleanly last time: checking the stored files")
        several = settings.node.receivers > 1
        self._receiver = receiver = Receiver(settings, reuse_port=several)
        self._catalog = receiver.catalog
        stale = receiver.catalog.close_orphaned_associations(
            association_holders(settings.storage.path)
        )
        if stale:
            log.warning("closed %d associations left open by an earlier run", stale)
        recover_after_restart(engine, store, receiver.catalog, settings.node.ae_title, unclean)
        receiver.start()

    def _announce_when_ready(self) -> None:
        """Log "ready" once every child process serves (the HTTP server answers, receivers
        listen, workers have loaded their pipelines), and record who is ready."""
        if self._ready_children() != self._ready_recorded:
            self._record_processes()
        if not self._announced and len(self._ready_recorded) == len(self._children):
            self._announced = True
            roles = "" if self.roles >= frozenset(ServiceRole) else f" ({', '.join(self.roles)})"
            log.info("node %s ready%s", self.settings.node.ae_title, roles)
            systemd.notify("READY=1\nSTATUS=every process serves")

    def _schedule(self, engine: Engine) -> None:
        if ServiceRole.COORDINATOR in self.roles:
            self._coordinate(engine)
        add = self._add
        if self._children:
            add(self._supervise, "interval", seconds=1, id="supervise")
        add(self._guard_database, "interval", seconds=1, id="database-guard")
        add(self._heartbeat, "interval", seconds=HEARTBEAT_SECONDS, id="heartbeat")
        watchdog = systemd.watchdog_interval()
        if watchdog is not None:  # the scheduler runs: this process is alive
            add(systemd.notify, "interval", args=("WATCHDOG=1",), seconds=watchdog, id="watchdog")

    def _add(self, work: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        self._scheduler.add_job(self._unless_unwritable(work), *args, **kwargs)

    def _coordinate(self, engine: Engine) -> None:
        """The coordinator's periodic work, each round run only while this tree holds the
        coordinator's lease."""
        settings = self.settings
        holder = f"{socket.gethostname()}-{os.getpid()}"
        self._lease = lease = Lease(engine, COORDINATOR, holder, COORDINATOR_LEASE_SECONDS)
        self._scheduler.add_job(
            self._unless_unwritable(self._lead),
            "interval",
            seconds=COORDINATOR_LEASE_SECONDS / 3,
            id="leadership",
            next_run_time=utcnow(),
        )
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
            self._add(self._while_leading(lease, work), *args, **kwargs)

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
        add(dispatcher.run_due, "interval", seconds=settings.dispatch.poll_seconds, id="dispatch")
        add(dispatcher.queue.requeue_expired, "interval", seconds=60, id="dispatch-leases")
        notifier = Notifier(engine, settings)
        add(notifier.run_due, "interval", seconds=settings.notify.poll_seconds, id="notify")
        add(self._close_orphaned_associations, "interval", seconds=60, id="associations")
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

    def _close_orphaned_associations(self) -> None:
        """Close the associations of processes that died on another host (an edge pod gone
        for good): their series would wait for them for ever."""
        assert self._catalog is not None
        closed = self._catalog.close_orphaned_associations(
            association_holders(self.settings.storage.path)
        )
        if closed:
            log.warning("closed %d associations whose process is gone", closed)

    def _lead(self) -> None:
        """Take or renew the coordinator's lease; a database that cannot be reached makes this
        tree stand by (its rounds would fail too) until it can."""
        assert self._lease is not None
        was_active = self._lease.active
        try:
            active = self._lease.hold()
        except SQLAlchemyError as exc:
            if was_active:
                log.error("coordinator: standing by, the lease cannot be renewed: %s", exc)
            self._lease.active = False
            return
        if active and not was_active and self._dispatcher is not None:
            interrupted = self._dispatcher.requeue_interrupted()  # an earlier holder's sends
            if interrupted:
                log.warning("%d interrupted dispatches go out again", interrupted)
        if active != was_active:
            self._record_processes()

    @staticmethod
    def _while_leading(lease: Lease, work: Callable[..., object]) -> Callable[..., None]:
        def run(*args: object) -> None:
            if lease.active:
                work(*args)

        return run

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
        if self._lease is not None and self.fault is None:
            with contextlib.suppress(SQLAlchemyError):
                self._lease.release()  # the stand-by takes over at its next round
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
        if self._admin_socket is not None:
            self._admin_socket.unlink(missing_ok=True)
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
            if ServiceRole.EDGE in self.roles:
                self._store.mark_stopped()
            forget_processes(self.settings.storage.path, self.roles)
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
        assert self._catalog is not None
        for child in list(self._children):
            process = child.process
            if process.is_alive() or process.pid is None:
                continue
            closed = self._catalog.close_stale_associations([process.pid])
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
            if child.name.startswith(("receiver", "http")):
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
        assert self._catalog is not None and self._store is not None and self._engine
        window = self._crash_checks.pop(check_id, None)
        if window is None:
            return
        rerecord_unrecorded(
            self._engine, self._store, self._catalog, self.settings.node.ae_title, window
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
        coordinating = None if self._lease is None else self._lease.active
        main = RecordedProcess(
            name="main",
            pid=os.getpid(),
            ready=True,
            roles=sorted(self.roles),
            coordinating=coordinating,
            host=socket.gethostname(),
        )
        processes = [main]
        processes += [
            RecordedProcess(
                name=child.name, pid=child.process.pid, ready=child.name in self._ready_recorded
            )
            for child in self._children
            if child.process.pid is not None
        ]
        record_processes(self.settings.storage.path, self.roles, processes)

    def _heartbeat(self) -> None:
        """Tell `ainode health` this tree is alive (its process table is touched)."""
        mark_alive(self.settings.storage.path, self.roles)


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


COORDINATOR_LEASE_SECONDS = 15.0
"""How long the active coordinator holds its lease unrenewed (it renews every third of it): a
stand-by takes over this long after the active one stopped without a word."""
HEARTBEAT_SECONDS = 2.0
"""How often a process tree touches its process table (`ainode health` reads how long ago)."""
CRASH_CHECK_DELAY_SECONDS = 3 * RECEIVE_BUSY_TIMEOUT_SECONDS
"""After a receiver crashes, the files written while it lived are checked this much later:
by then every other receiver has recorded (or removed) what it wrote in that time."""
PRIVATE_UMASK = 0o027
"""Files the node writes (database, instances, results) are readable by its owner and group
only: they hold study descriptions, dates and images."""


def serve(settings: Settings, roles: frozenset[ServiceRole] = frozenset(ServiceRole)) -> None:
    """Run the node (every role, or those given) in the foreground until SIGTERM or SIGINT."""
    os.umask(PRIVATE_UMASK)  # inherited by the receiver and worker processes
    service = NodeService(settings, roles)

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
