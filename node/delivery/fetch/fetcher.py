"""Fetches run from the leased queue like dispatches: find the studies at the source, retrieve
each into the node's intake (or, by C-MOVE, into its own SCP), retry with backoff when the
source is down or delivers part of a study.

A study fetched as a prior is recorded as one (`studies.prior_of`) before its first instance
arrives, so routing never takes it for a new study.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID
from sqlalchemy import Connection, Engine, select

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
from node.store.leased import Held, Lease, LeasedQueue, LeasedWorkLoop, RetryPolicy, renewing
from node.store.storage import InstanceStore

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
"""Renewed while the fetch runs: a fetch whose process died is retried this much later."""
PARALLEL = 2


@dataclass(frozen=True)
class Wanted:
    """A fetch taken for running: from where, what, and whose prior it is."""

    source: str
    query: FetchQuery
    prior_of: str | None


class Fetcher(LeasedWorkLoop[Wanted]):
    """Runs due fetches (the node's scheduler) or one fetch at once (`ainode fetch`)."""

    kind = "fetch"

    def __init__(
        self, engine: Engine, settings: Settings, owner: str | None = None, actor: str = "node"
    ) -> None:
        """`actor`: who asked, for the audit trail (the node itself, or a person at the CLI)."""
        super().__init__(
            engine,
            LeasedQueue(engine, Fetch, RetryPolicy.of(settings.fetch)),
            owner=owner or f"fetcher-{os.getpid()}",
            lease_seconds=LEASE_SECONDS,
            batch=PARALLEL,
            threads=PARALLEL,
        )
        self._actor = actor
        self._settings = settings
        store = InstanceStore(settings.storage.path)
        self._intake = Intake(store, Catalog(engine), settings.storage.min_free_mb)

    def start(self, source: str, query: FetchQuery) -> Lease:
        """A new fetch, leased to this fetcher at once (to `run` now, as `ainode fetch` does)."""
        max_attempts = self._settings.fetch.max_attempts
        fetch_id = enqueue(
            self._engine, source, query, max_attempts, claimed_by=self.owner,
            lease_seconds=LEASE_SECONDS,
        )  # fmt: skip
        return Lease(fetch_id, 1, max_attempts)

    def load(self, conn: Connection, leases: list[Lease]) -> list[Held[Wanted]]:
        rows = conn.execute(
            select(Fetch.id, Fetch.source, Fetch.prior_of, Fetch.query).where(
                Fetch.id.in_([lease.id for lease in leases])
            )
        ).all()
        wanted = {
            row.id: Wanted(row.source, FetchQuery.model_validate_json(row.query), row.prior_of)
            for row in rows
        }
        return [Held(lease, wanted[lease.id]) for lease in leases]

    def handle(self, held: Held[Wanted]) -> None:
        self._run(held, None)

    def run(self, lease: Lease, progress: Callable[[str, int], None] | None = None) -> WorkState:
        """Run one leased fetch now; its resulting state."""
        with self._engine.connect() as conn:
            (held,) = self.load(conn, [lease])
        return self._run(held, progress)

    def _run(self, held: Held[Wanted], progress: Callable[[str, int], None] | None) -> WorkState:
        wanted = held.row
        with renewing(self.queue, [held.lease.id], self.owner, LEASE_SECONDS, self.kind):
            state = self._fetch(held.lease, wanted, progress)
        FETCHES.labels(wanted.source, str(state)).inc()
        return state

    def _fetch(
        self, lease: Lease, wanted: Wanted, progress: Callable[[str, int], None] | None
    ) -> WorkState:
        source_name, query, prior_of = wanted.source, wanted.query, wanted.prior_of
        try:
            source = self._source(source_name)
            hits = choose(query, source.find(query))
            if not hits and prior_of is None:
                return self._fail(lease, f"no study at {source_name} matches {query.describe()}")
            studies, instances = [], 0
            for hit in hits:
                if prior_of is not None:
                    self._mark_prior(hit.study_uid, prior_of)
                instances += self._retrieve(source, hit.study_uid, progress)
                studies.append(hit.study_uid)
        except (RetrieveFailed, OSError, ValueError) as exc:
            return self._fail(lease, str(exc), retry=True)
        self.succeed(lease, studies=studies, instances=instances)
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
        return WorkState.SUCCEEDED

    def _source(self, name: str) -> StudySource:
        settings = self._settings
        found = settings.source(name)
        timeout = settings.fetch.timeout_seconds
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
    ) -> int:
        ae_title = self._settings.node.ae_title
        sender = Sender(uuid.uuid4().hex, source.name, ae_title, None, source.transport)
        delivery = Delivery(sender)
        whole = False

        def stored(dataset: bytes, syntax: UID) -> bool:
            return self._intake.accept(delivery, dataset, syntax).status == Status.SUCCESS

        def arrived(count: int) -> None:
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
        state = self.fail(lease, error, permanent=not retry)
        log.warning("fetch %d failed (%s): %s", lease.id, state, error)
        return state or WorkState.FAILED
