"""Dispatches: each (job, destination) is sent, retried with backoff when it fails, and
recorded. Created with the job's success (same transaction), so no result is ever lost
between the worker and the sender; destinations are independent of one another.

A destination asked for storage commitment (`peers.NAME.commitment`) is sent the results and
then the request; the dispatch waits for the report (`node.store.commitments` records it)
and is delivered only when every instance is committed. A report of failures, or none
within `dispatch.commitment_timeout_seconds`, spends an attempt: sent again, or dead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import Connection, Engine, select

from node.config import NoDestination, NotifyOn, Peer, Settings, api_link
from node.delivery.dispatch.senders import Delivery, ask_to_commit, send
from node.edge.scu import StoreResult
from node.ops.audit import Sent, record_quietly
from node.ops.metrics import COMMITMENTS, DISPATCHES
from node.store.db.models import CommitmentState, Dispatch, Job, Series, WorkState, utcnow
from node.store.leased import Held, Lease, LeasedQueue, LeasedWorkLoop, RetryPolicy
from node.store.notifications import queue_notifications

log = logging.getLogger(__name__)

BATCH = 16
"""Dispatches claimed per round (sent in parallel, up to `SENDING_THREADS` at once)."""
SENDING_THREADS = 4


@dataclass(frozen=True)
class Outgoing:
    """A dispatch taken for sending: what, and where to."""

    job_id: int
    destination: str
    files: list[Path]
    calling_ae: str | None
    priority: int


class Dispatcher(LeasedWorkLoop[Outgoing]):
    """Claims due dispatches from the leased queue and sends them; one per node."""

    kind = "dispatch"

    def __init__(self, engine: Engine, settings: Settings) -> None:
        super().__init__(
            engine,
            LeasedQueue(engine, Dispatch, RetryPolicy.of(settings.dispatch)),
            owner=f"dispatcher-{os.getpid()}",
            # A lease long enough for one association per object at the network timeout.
            lease_seconds=max(60.0, settings.dispatch.timeout_seconds * 20),
            batch=BATCH,
            threads=SENDING_THREADS,
        )
        self._settings = settings

    def requeue_interrupted(self) -> int:
        """Dispatches left running by a stopped node go out again (UIDs are stable, so a
        resend replaces, never duplicates)."""
        return self.queue.requeue_running()

    def run_due(self) -> int:
        """Give up the commitments that failed or timed out, then send what is due."""
        self._settle_commitments()
        return super().run_due()

    def load(self, conn: Connection, leases: list[Lease]) -> list[Held[Outgoing]]:
        rows = conn.execute(
            select(
                Dispatch.id,
                Dispatch.job_id,
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
            Held(
                lease,
                Outgoing(
                    by_id[lease.id].job_id,
                    by_id[lease.id].destination,
                    [self._settings.storage.path / p for p in by_id[lease.id].objects],
                    by_id[lease.id].calling_ae,
                    by_id[lease.id].priority,
                ),
            )
            for lease in leases
        ]

    def handle(self, held: Held[Outgoing]) -> None:
        lease, outgoing = held.lease, held.row
        destination = outgoing.destination
        target = self._settings.destination(destination, outgoing.calling_ae)
        if isinstance(target, NoDestination):
            self.fail(lease, target.reason, permanent=True)
            log.warning("dispatch %d to %s failed: %s", lease.id, destination, target.reason)
            return
        delivery = Delivery(
            outgoing.files,
            outgoing.priority,
            self._settings.node.ae_title,
            self._settings.dispatch.timeout_seconds,
        )
        try:
            outcome = send(target, delivery)
        except Exception as exc:  # a sender bug or an unreadable file: record, retry
            outcome = StoreResult(False, f"{type(exc).__name__}: {exc}")
        if not outcome.ok:
            state = self.fail(lease, outcome.detail, permanent=False)
            DISPATCHES.labels(destination, str(state)).inc()
            self._failed(
                lease.id, outgoing.job_id, destination, state, lease.attempt, outcome.detail
            )
            return
        log.info("dispatch %d to %s: %s", lease.id, destination, outcome.detail)
        DISPATCHES.labels(destination, "succeeded").inc()
        self._audit(lease, outgoing, outcome)
        if isinstance(target, Peer) and target.commitment:
            self._ask_commitment(lease, outgoing, target, delivery, outcome)
        else:
            self.succeed(lease, status=outcome.detail, sent=outcome.stored)

    def _ask_commitment(
        self,
        lease: Lease,
        outgoing: Outgoing,
        peer: Peer,
        delivery: Delivery,
        outcome: StoreResult,
    ) -> None:
        """Sent: the dispatch waits for the report of a request recorded before it is made
        (the peer may report at once), or spends its attempt when the peer refuses it."""
        uid = generate_uid()
        until = utcnow() + timedelta(seconds=self._settings.dispatch.commitment_timeout_seconds)
        with self._engine.begin() as conn:
            waits = self.queue.wait(
                conn,
                lease.id,
                self.owner,
                until,
                status=outcome.detail,
                sent=outcome.stored,
                commitment=CommitmentState.PENDING,
                transaction_uid=uid,
            )
        if not waits:
            log.warning("dispatch %d sent after losing its lease", lease.id)
            return
        refused = ask_to_commit(peer, delivery, uid, outcome.stored)
        if refused is None:
            log.info("dispatch %d to %s: storage commitment asked", lease.id, outgoing.destination)
            return
        state = self.queue.give_up_waiting(lease.id, refused, commitment=CommitmentState.FAILED)
        if state is not None:
            DISPATCHES.labels(outgoing.destination, str(state)).inc()
            self._failed(
                lease.id, outgoing.job_id, outgoing.destination, state, lease.attempt, refused
            )

    def _settle_commitments(self) -> None:
        """Each waiting dispatch whose report named failures, or that had none in time, is
        sent again later, or is dead (and alerts) after its last attempt."""
        overdue = self.queue.overdue(
            Dispatch.destination,
            Dispatch.commitment,
            Dispatch.error,
            Dispatch.attempts,
            Dispatch.job_id,
        )
        for row in overdue:
            reported = row.commitment == CommitmentState.FAILED
            error = (
                row.error
                if reported and row.error
                else f"no storage commitment report from {row.destination} within "
                f"{self._settings.dispatch.commitment_timeout_seconds:g} s"
            )
            state = self.queue.give_up_waiting(row.id, error, commitment=CommitmentState.FAILED)
            if state is None:
                continue  # answered or cancelled meanwhile
            if not reported:
                COMMITMENTS.labels(row.destination, "unreported").inc()
            DISPATCHES.labels(row.destination, str(state)).inc()
            self._failed(row.id, row.job_id, row.destination, state, row.attempts, error)

    def _failed(
        self,
        dispatch_id: int,
        job_id: int,
        destination: str,
        state: WorkState | None,
        attempt: int,
        error: str,
    ) -> None:
        """Log a failed attempt; a dead dispatch alerts."""
        if state == WorkState.DEAD:
            log.error(
                "dispatch %d to %s dead after %d attempts: %s",
                dispatch_id,
                destination,
                attempt,
                error,
            )
            self._alert(dispatch_id, job_id, destination, error)
        else:
            log.warning(
                "dispatch %d to %s failed (attempt %d, %s): %s",
                dispatch_id,
                destination,
                attempt,
                state,
                error,
            )

    def _alert(self, dispatch_id: int, job_id: int, destination: str, error: str) -> None:
        """Tell the job's `undelivered` notification targets (the metric counts it too)."""
        settings = self._settings
        try:
            with self._engine.begin() as conn:
                queue_notifications(
                    conn,
                    job_id,
                    settings.notifications,
                    {NotifyOn.UNDELIVERED},
                    settings.notify.max_attempts,
                    destination=destination,
                    dispatch=dispatch_id,
                    error=error,
                    link=api_link(settings),
                )
        except Exception as exc:  # the dispatch is recorded dead; its alert is not
            log.error("dispatch %d: undelivered notification not queued: %s", dispatch_id, exc)

    def _audit(self, lease: Lease, outgoing: Outgoing, outcome: StoreResult) -> None:
        """A `sent` audit event: where to, and the SOP instances the destination took."""
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in outgoing.files]
        taken = [ds for ds in headers if str(ds.SOPInstanceUID) in outcome.stored]
        studies = sorted({str(ds.StudyInstanceUID) for ds in taken})
        facts = Sent(
            destination=outgoing.destination,
            dispatch=lease.id,
            sop_instances=[str(ds.SOPInstanceUID) for ds in taken],
            status=outcome.detail,
        )
        study = studies[0] if len(studies) == 1 else None
        record_quietly(self._engine, self._settings.node.ae_title, facts, study)
