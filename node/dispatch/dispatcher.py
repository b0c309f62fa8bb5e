"""Dispatches: each (job, destination) is sent, retried with backoff when it fails, and
recorded. Created with the job's success (same transaction), so no result is ever lost
between the worker and the sender; destinations are independent of one another.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select, update

from node.config import DicomWebDestination, Peer, Settings
from node.db.models import Dispatch, Job, JobState, Series, utcnow
from node.dimse.scu import StoreResult, store
from node.dispatch.stow import stow
from node.queue import RetryPolicy
from node.results.encode import is_key_image
from node.routing.rules import Priority

log = logging.getLogger(__name__)

ORIGIN = "origin"
C_STORE_MEDIUM, C_STORE_HIGH = 0, 1  # the C-STORE request's Priority (PS3.7 9.1.1.1)
DUE = (JobState.QUEUED, JobState.RETRYING)
Sender = Callable[[Sequence[Path]], StoreResult]


@dataclass(frozen=True)
class DispatchView:
    """A dispatch as `ainode status --json` shows it (`dispatches` list)."""

    id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    status: str | None
    error: str | None
    objects: list[str]
    created_at: datetime
    finished_at: datetime | None


def list_dispatches(engine: Engine, limit: int = 200) -> list[DispatchView]:
    """Newest first."""
    with engine.connect() as conn:
        rows = conn.execute(select(Dispatch).order_by(Dispatch.id.desc()).limit(limit)).mappings()
        return [
            DispatchView(
                id=row["id"],
                job_id=row["job_id"],
                destination=row["destination"],
                state=row["state"],
                attempts=row["attempts"],
                status=row["status"],
                error=row["error"],
                objects=json.loads(row["objects"]),
                created_at=row["created_at"],
                finished_at=row["finished_at"],
            )
            for row in rows
        ]


@dataclass(frozen=True)
class Claim:
    """A dispatch taken for sending: what, where to, and its attempt count."""

    id: int
    destination: str
    files: list[Path]
    calling_ae: str | None
    priority: int
    attempts: int
    max_attempts: int


class Dispatcher:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        dispatch = settings.dispatch
        self.policy = RetryPolicy(
            dispatch.max_attempts, dispatch.retry_base_seconds, dispatch.retry_max_seconds
        )
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dispatch")

    def requeue_interrupted(self) -> int:
        """Dispatches left running by a stopped node go out again (UIDs are stable, so a
        resend replaces, never duplicates)."""
        with self._engine.begin() as conn:
            return conn.execute(
                update(Dispatch)
                .where(Dispatch.state == JobState.RUNNING)
                .values(state=JobState.RETRYING, run_after=utcnow())
            ).rowcount

    def run_due(self) -> int:
        """Send every dispatch that is due, destinations in parallel; returns how many ran."""
        claimed = self._claim_due()
        list(self._pool.map(self._send, claimed))
        return len(claimed)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _claim_due(self) -> list[Claim]:
        now = utcnow()
        claimed = []
        with self._engine.begin() as conn:
            due = conn.execute(
                select(
                    Dispatch.id,
                    Dispatch.destination,
                    Dispatch.objects,
                    Series.calling_ae,
                    Dispatch.priority,
                )
                .join(Job, Job.id == Dispatch.job_id)
                .join(Series, Series.id == Job.series_id)
                .where(Dispatch.state.in_(DUE), Dispatch.run_after <= now)
                .order_by(Dispatch.priority, Dispatch.run_after)
                .limit(16)
            ).all()
            for dispatch_id, destination, objects, calling_ae, priority in due:
                counts = conn.execute(
                    update(Dispatch)
                    .where(Dispatch.id == dispatch_id, Dispatch.state.in_(DUE))
                    .values(
                        state=JobState.RUNNING,
                        attempts=Dispatch.attempts + 1,
                        started_at=now,
                    )
                    .returning(Dispatch.attempts, Dispatch.max_attempts)
                ).first()
                if counts is not None:
                    paths = [Path(p) for p in json.loads(objects)]
                    claimed.append(
                        Claim(dispatch_id, destination, paths, calling_ae, priority, *counts)
                    )
        return claimed

    def _send(self, claim: Claim) -> None:
        dispatch_id, destination, attempts = claim.id, claim.destination, claim.attempts
        sender, problem = self._sender(destination, claim.calling_ae, claim.priority)
        if sender is None:
            self._finish(dispatch_id, JobState.FAILED, None, problem)
            log.warning("dispatch %d to %s failed: %s", dispatch_id, destination, problem)
            return
        try:
            outcome = sender(claim.files)
        except Exception as exc:  # a sender bug or an unreadable file: record, retry
            outcome = StoreResult(False, f"{type(exc).__name__}: {exc}")
        if outcome.ok:
            self._finish(dispatch_id, JobState.SUCCEEDED, outcome.detail, None)
            log.info("dispatch %d to %s: %s", dispatch_id, destination, outcome.detail)
            return
        if attempts >= claim.max_attempts:
            self._finish(dispatch_id, JobState.DEAD, None, outcome.detail)
            log.error(
                "dispatch %d to %s dead after %d attempts: %s",
                dispatch_id,
                destination,
                attempts,
                outcome.detail,
            )
            return
        delay = self.policy.delay(attempts)
        with self._engine.begin() as conn:
            conn.execute(
                update(Dispatch)
                .where(Dispatch.id == dispatch_id)
                .values(
                    state=JobState.RETRYING,
                    error=outcome.detail,
                    run_after=utcnow() + timedelta(seconds=delay),
                )
            )
        log.warning(
            "dispatch %d to %s failed (attempt %d, next in %.0f s): %s",
            dispatch_id,
            destination,
            attempts,
            delay,
            outcome.detail,
        )

    def _sender(
        self, destination: str, calling_ae: str | None, priority: int
    ) -> tuple[Sender | None, str]:
        settings = self._settings
        timeout = settings.dispatch.timeout_seconds
        if destination == ORIGIN:
            peer = settings.peer_by_ae_title(calling_ae or "")
            if peer is None:
                return None, f"origin {calling_ae!r} is not a configured peer: no address"
            return self._dimse(peer, timeout, priority), ""
        if destination in settings.peers:
            return self._dimse(settings.peers[destination], timeout, priority), ""
        if destination in settings.dicomweb:
            web: DicomWebDestination = settings.dicomweb[destination]
            return (lambda files: stow(web, _wanted(files, web.key_images), timeout)), ""
        return None, f"destination {destination!r} is not configured"

    def _dimse(self, peer: Peer, timeout: float, priority: int) -> Sender:
        ae_title = self._settings.node.ae_title
        dimse_priority = C_STORE_HIGH if priority == Priority.STAT else C_STORE_MEDIUM
        return lambda files: store(
            ae_title, peer, _wanted(files, peer.key_images), timeout, dimse_priority
        )

    def _finish(self, dispatch_id: int, state: str, status: str | None, error: str | None) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(Dispatch)
                .where(Dispatch.id == dispatch_id)
                .values(state=state, status=status, error=error, finished_at=utcnow())
            )


def _wanted(files: Sequence[Path], key_images: bool) -> list[Path]:
    """The result objects a destination receives: key images only where it asked for them."""
    return [path for path in files if key_images or not is_key_image(path)]
