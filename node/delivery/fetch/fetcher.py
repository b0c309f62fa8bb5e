"""Fetches run from the leased queue like dispatches: find the studies at the source, retrieve
each into the node's intake (or, by C-MOVE, into its own SCP), retry with backoff when the
source is down or delivers part of a study.

A study fetched as a prior is recorded as one (`studies.prior_of`) before its first instance
arrives, so routing never takes it for a new study.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pydicom.uid import UID
from sqlalchemy import Engine, select

from node.config import DicomWebDestination, Settings
from node.delivery.fetch.query import FetchQuery, choose
from node.delivery.fetch.records import enqueue
from node.delivery.fetch.sources import DicomWebSource, DimseSource, StudySource
from node.edge.retrieve import RetrieveFailed
from node.edge.status import Status
from node.ingest.intake import Delivery, Intake, Sender
from node.ops.audit import Fetched, record_quietly
from node.ops.metrics import FETCHES
from node.store.catalog import Catalog
from node.store.db.models import Fetch, Study, WorkState, utcnow
from node.store.db.upsert import insert_into
from node.store.leased import Lease, LeasedQueue, RetryPolicy
from node.store.storage import InstanceStore

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
"""Renewed as instances arrive: a fetch whose process died is retried this much later."""
PARALLEL = 2


class Fetcher:
    """Runs due fetches (the node's scheduler) or one fetch at once (`ainode fetch`)."""

    def __init__(
        self, engine: Engine, settings: Settings, owner: str | None = None, actor: str = "node"
    ) -> None:
        """`actor`: who asked, for the audit trail (the node itself, or a person at the CLI)."""
        self._engine = engine
        self._actor = actor
        self._settings = settings
        self.queue = LeasedQueue(engine, Fetch, RetryPolicy.of(settings.dispatch))
        self._owner = owner or f"fetcher-{os.getpid()}"
        store = InstanceStore(settings.storage.path)
        self._intake = Intake(store, Catalog(engine), settings.storage.min_free_mb)
        self._pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="fetch")

    def run_due(self) -> int:
        with self._engine.begin() as conn:
            leases = self.queue.claim(conn, self._owner, LEASE_SECONDS, limit=PARALLEL)
        list(self._pool.map(self.run, leases))
        return len(leases)

    def start(self, source: str, query: FetchQuery) -> Lease:
        """A new fetch, leased to this fetcher at once (to `run` now, as `ainode fetch` does)."""
        max_attempts = self._settings.dispatch.max_attempts
        fetch_id = enqueue(
            self._engine, source, query, max_attempts, claimed_by=self._owner,
            lease_seconds=LEASE_SECONDS,
        )  # fmt: skip
        return Lease(fetch_id, 1, max_attempts)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def run(self, lease: Lease, progress: Callable[[str, int], None] | None = None) -> WorkState:
        """Run one leased fetch; its resulting state."""
        source, state = self._run(lease, progress)
        FETCHES.labels(source, str(state)).inc()
        return state

    def _run(
        self, lease: Lease, progress: Callable[[str, int], None] | None
    ) -> tuple[str, WorkState]:
        with self._engine.connect() as conn:
            source_name, prior_of, text = conn.execute(
                select(Fetch.source, Fetch.prior_of, Fetch.query).where(Fetch.id == lease.id)
            ).one()
        query = FetchQuery.model_validate_json(text)
        renewer = _Renewer(self.queue, lease.id, self._owner)
        try:
            source = self._source(source_name)
            hits = choose(query, source.find(query))
            if not hits and prior_of is None:
                problem = f"no study at {source_name} matches {query.describe()}"
                return source_name, self._fail(lease, problem)
            studies, instances = [], 0
            for hit in hits:
                if prior_of is not None:
                    self._mark_prior(hit.study_uid, prior_of)
                instances += self._retrieve(source, hit.study_uid, progress, renewer)
                studies.append(hit.study_uid)
        except (RetrieveFailed, OSError, ValueError) as exc:
            return source_name, self._fail(lease, str(exc), retry=True)
        with self._engine.begin() as conn:
            if not self.queue.succeed(
                conn, lease.id, self._owner, studies=studies, instances=instances
            ):
                log.warning("fetch %d finished after losing its lease", lease.id)
        log.info(
            "fetch %d from %s: %d studies, %d instances", lease.id, source_name, len(studies),
            instances,
        )  # fmt: skip
        facts = Fetched(
            source=source_name,
            fetch=lease.id,
            query=query.describe(),
            studies=studies,
            instances=instances,
            prior_of=prior_of,
        )
        record_quietly(self._engine, self._actor, facts, prior_of)
        return source_name, WorkState.SUCCEEDED

    def _source(self, name: str) -> StudySource:
        settings = self._settings
        found = settings.source(name)
        timeout = settings.dispatch.timeout_seconds
        if found is None:
            raise ValueError(f"{name!r} is neither a peer nor a dicomweb server")
        if isinstance(found, DicomWebDestination):
            return DicomWebSource(name, found, timeout)
        return DimseSource(name, found, settings.node.ae_title, timeout)

    def _retrieve(
        self,
        source: StudySource,
        study_uid: str,
        progress: Callable[[str, int], None] | None,
        renewer: _Renewer,
    ) -> int:
        ae_title = self._settings.node.ae_title
        sender = Sender(uuid.uuid4().hex, source.name, ae_title, None, source.transport)
        delivery = Delivery(sender)
        whole = False

        def stored(dataset: bytes, syntax: UID) -> bool:
            return self._intake.accept(delivery, dataset, syntax).status == Status.SUCCESS

        def arrived(count: int) -> None:
            renewer.tick()
            if progress is not None:
                progress(study_uid, count)

        try:
            count = source.retrieve(study_uid, stored, arrived)
            whole = True
            return count
        finally:
            self._intake.close(delivery, released=whole)

    def _mark_prior(self, study_uid: str, prior_of: str) -> None:
        """The study's row, made before its instances arrive, says whose prior it is (a study
        the node already holds keeps what it was)."""
        with self._engine.begin() as conn:
            conn.execute(
                insert_into(conn, Study)
                .values(study_instance_uid=study_uid, first_received_at=utcnow(), prior_of=prior_of)
                .on_conflict_do_nothing()
            )

    def _fail(self, lease: Lease, error: str, retry: bool = False) -> WorkState:
        state = self.queue.fail(lease.id, self._owner, error, permanent=not retry)
        log.warning("fetch %d failed (%s): %s", lease.id, state, error)
        return state or WorkState.FAILED


class _Renewer:
    """Renews a fetch's lease while instances keep arriving (at most every 20 s)."""

    def __init__(self, queue: LeasedQueue, fetch_id: int, owner: str) -> None:
        self._queue, self._id, self._owner = queue, fetch_id, owner
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            if time.monotonic() - self._last < 20:
                return
            self._last = time.monotonic()
        self._queue.renew(self._id, self._owner, LEASE_SECONDS)
