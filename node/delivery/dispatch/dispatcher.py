"""Dispatches: each (job, destination) is sent, retried with backoff when it fails, and
recorded. Created with the job's success (same transaction), so no result is ever lost
between the worker and the sender; destinations are independent of one another.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import Engine, select

from node.config import Settings
from node.delivery.dispatch.senders import Delivery, send
from node.edge.scu import StoreResult
from node.ops.audit import Sent, record_quietly
from node.ops.metrics import DISPATCHES
from node.store.db.models import Dispatch, Job, Series, WorkState
from node.store.leased import Lease, LeasedQueue, RetryPolicy

log = logging.getLogger(__name__)

BATCH = 16
"""Dispatches claimed per round (sent in parallel, up to `SENDING_THREADS` at once)."""
SENDING_THREADS = 4


@dataclass(frozen=True)
class Claim:
    """A dispatch taken for sending: what, where to, and its lease."""

    lease: Lease
    destination: str
    files: list[Path]
    calling_ae: str | None
    priority: int


class Dispatcher:
    """Claims due dispatches from the leased queue and sends them; one per node."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self.queue = LeasedQueue(engine, Dispatch, RetryPolicy.of(settings.dispatch))
        self._owner = f"dispatcher-{os.getpid()}"
        # A lease long enough for one association per object at the network timeout.
        self._lease_seconds = max(60.0, settings.dispatch.timeout_seconds * 20)
        self._pool = ThreadPoolExecutor(max_workers=SENDING_THREADS, thread_name_prefix="dispatch")

    def requeue_interrupted(self) -> int:
        """Dispatches left running by a stopped node go out again (UIDs are stable, so a
        resend replaces, never duplicates)."""
        return self.queue.requeue_running()

    def run_due(self) -> int:
        """Send every dispatch that is due, destinations in parallel; returns how many ran."""
        claimed = self._claim_due()
        list(self._pool.map(self._send, claimed))
        return len(claimed)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _claim_due(self) -> list[Claim]:
        with self._engine.begin() as conn:
            leases = self.queue.claim(conn, self._owner, self._lease_seconds, limit=BATCH)
            if not leases:
                return []
            rows = conn.execute(
                select(
                    Dispatch.id,
                    Dispatch.destination,
                    Dispatch.objects,
                    Series.calling_ae,
                    Dispatch.priority,
                )
                .join(Job, Job.id == Dispatch.job_id)
                .join(Series, Series.id == Job.series_id)
                .where(Dispatch.id.in_([lease.id for lease in leases]))
            ).all()
        by_id = {row.id: row for row in rows}
        return [
            Claim(
                lease,
                by_id[lease.id].destination,
                [Path(p) for p in by_id[lease.id].objects],
                by_id[lease.id].calling_ae,
                by_id[lease.id].priority,
            )
            for lease in leases
        ]

    def _audit(self, claim: Claim, outcome: StoreResult) -> None:
        """A `sent` audit event: where to, and the SOP instances the destination took."""
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in claim.files]
        taken = [ds for ds in headers if str(ds.SOPInstanceUID) in outcome.stored]
        studies = sorted({str(ds.StudyInstanceUID) for ds in taken})
        facts = Sent(
            destination=claim.destination,
            dispatch=claim.lease.id,
            sop_instances=[str(ds.SOPInstanceUID) for ds in taken],
            status=outcome.detail,
        )
        study = studies[0] if len(studies) == 1 else None
        record_quietly(self._engine, self._settings.node.ae_title, facts, study)

    def _send(self, claim: Claim) -> None:
        dispatch_id, destination = claim.lease.id, claim.destination
        target = self._settings.destination(destination, claim.calling_ae)
        if isinstance(target, str):
            self.queue.fail(dispatch_id, self._owner, target, permanent=True)
            log.warning("dispatch %d to %s failed: %s", dispatch_id, destination, target)
            return
        delivery = Delivery(
            claim.files,
            claim.priority,
            self._settings.node.ae_title,
            self._settings.dispatch.timeout_seconds,
        )
        try:
            outcome = send(target, delivery)
        except Exception as exc:  # a sender bug or an unreadable file: record, retry
            outcome = StoreResult(False, f"{type(exc).__name__}: {exc}")
        if outcome.ok:
            with self._engine.begin() as conn:
                self.queue.succeed(
                    conn, dispatch_id, self._owner, status=outcome.detail, sent=outcome.stored
                )
            log.info("dispatch %d to %s: %s", dispatch_id, destination, outcome.detail)
            DISPATCHES.labels(destination, "succeeded").inc()
            self._audit(claim, outcome)
            return
        state = self.queue.fail(dispatch_id, self._owner, outcome.detail, permanent=False)
        DISPATCHES.labels(destination, str(state)).inc()
        if state == WorkState.DEAD:
            log.error(
                "dispatch %d to %s dead after %d attempts: %s",
                dispatch_id,
                destination,
                claim.lease.attempt,
                outcome.detail,
            )
        else:
            log.warning(
                "dispatch %d to %s failed (attempt %d of %d, %s): %s",
                dispatch_id,
                destination,
                claim.lease.attempt,
                claim.lease.max_attempts,
                state,
                outcome.detail,
            )
