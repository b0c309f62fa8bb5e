"""The durable job queue: enqueue (idempotent), claim with a lease, renew, finish, retry.

A job is one pipeline run for one series revision. Workers claim atomically (PostgreSQL:
FOR UPDATE SKIP LOCKED; SQLite: the engine's BEGIN IMMEDIATE), hold a lease they renew, and
record the outcome. A job whose lease expired goes back to the queue. Failures retry with
exponential backoff and jitter up to `max_attempts`, then go `dead`; errors that a retry
cannot fix go straight to `failed`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from node.db.models import Job, JobState, Series, utcnow
from node.dispatch.records import create_dispatches
from node.embeddings import store_embedding
from node.routing.engine import JobRequest

log = logging.getLogger(__name__)

CLAIMABLE = (JobState.QUEUED, JobState.RETRYING)
FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_seconds: float = 5.0
    max_seconds: float = 600.0

    def delay(self, attempts: int) -> float:
        """Exponential backoff with ±25 % jitter, so failed jobs do not retry in lockstep."""
        raw = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        return raw * random.uniform(0.75, 1.25)


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    series_id: int
    series_instance_uid: str
    revision: int
    pipeline: str
    destinations: tuple[str, ...]
    attempt: int


@dataclass(frozen=True)
class JobView:
    """A job as `ainode jobs list` and `ainode status --json` show it."""

    id: int
    pipeline: str
    series_instance_uid: str
    revision: int
    state: str
    priority: int
    attempts: int
    error: str | None
    destinations: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, object] | None


class JobQueue:
    def __init__(self, engine: Engine, policy: RetryPolicy | None = None) -> None:
        self._engine = engine
        self.policy = policy or RetryPolicy()
        self._skip_locked = engine.dialect.name == "postgresql"
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert = dialect.insert(Job).on_conflict_do_nothing().returning(Job.id)

    def enqueue(self, series_id: int, revision: int, requests: list[JobRequest]) -> list[int]:
        """Create the jobs of a series revision; a (revision, pipeline) pair exists only once."""
        now = utcnow()
        created = []
        with self._engine.begin() as conn:
            for request in requests:
                row = conn.execute(
                    self._insert,
                    {
                        "series_id": series_id,
                        "revision": revision,
                        "pipeline": request.pipeline,
                        "destinations": json.dumps(list(request.destinations)),
                        "rules": json.dumps(list(request.rules)),
                        "priority": int(request.priority),
                        "priority_if_positive": (
                            None
                            if request.priority_if_positive is None
                            else int(request.priority_if_positive)
                        ),
                        "state": JobState.QUEUED,
                        "attempts": 0,
                        "max_attempts": self.policy.max_attempts,
                        "run_after": now,
                        "created_at": now,
                    },
                ).first()
                if row is not None:
                    created.append(int(row[0]))
        return created

    def claim(self, owner: str, lease_seconds: float) -> ClaimedJob | None:
        """Take the most urgent runnable job, or None."""
        now = utcnow()
        with self._engine.begin() as conn:
            candidate = (
                select(Job.id)
                .where(Job.state.in_(CLAIMABLE), Job.run_after <= now)
                .order_by(Job.priority, Job.id)
                .limit(1)
            )
            if self._skip_locked:
                candidate = candidate.with_for_update(skip_locked=True)
            job_id = conn.execute(candidate).scalar_one_or_none()
            if job_id is None:
                return None
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    state=JobState.RUNNING,
                    attempts=Job.attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    started_at=now,
                    error=None,
                )
            )
            row = conn.execute(
                select(
                    Job.series_id,
                    Series.series_instance_uid,
                    Job.revision,
                    Job.pipeline,
                    Job.destinations,
                    Job.attempts,
                )
                .join(Series, Series.id == Job.series_id)
                .where(Job.id == job_id)
            ).one()
        series_id, series_uid, revision, pipeline, destinations, attempts = row
        return ClaimedJob(
            job_id,
            series_id,
            series_uid,
            revision,
            pipeline,
            tuple(json.loads(destinations)),
            attempts,
        )

    def renew(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False if the job is no longer ours (expired, cancelled)."""
        with self._engine.begin() as conn:
            return bool(
                conn.execute(
                    self._owned(job_id, owner).values(
                        lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)
                    )
                ).rowcount
            )

    def succeed(
        self,
        job_id: int,
        owner: str,
        result: dict[str, object],
        objects: Sequence[Path] = (),
        dispatch_attempts: int = 8,
        embedding: np.ndarray | None = None,
    ) -> bool:
        """Record the result and, in the same transaction, queue sending `objects` to the
        job's destinations and store its embedding. A positive result of a job whose rules
        say `priority_if_positive` raises its dispatches and the study's waiting jobs to
        that priority. False when the job was no longer ours (lease lost)."""
        with self._engine.begin() as conn:
            owned = conn.execute(
                self._owned(job_id, owner).values(
                    state=JobState.SUCCEEDED,
                    result=json.dumps(result),
                    finished_at=utcnow(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
            if not owned:
                return False
            job = conn.execute(select(Job).where(Job.id == job_id)).mappings().one()
            priority = job["priority"]
            escalation = job["priority_if_positive"]
            if result.get("positive") and escalation is not None and escalation < priority:
                priority = escalation
                self._escalate_study(conn, job["series_id"], escalation)
                log.info("job %d: positive result; study raised to priority %d", job_id, priority)
            create_dispatches(
                conn, job_id, json.loads(job["destinations"]), objects, dispatch_attempts, priority
            )
            if embedding is not None:
                store_embedding(conn, job, result, embedding)
            return True

    def _escalate_study(self, conn: Connection, series_id: int, priority: int) -> None:
        """Waiting jobs of the study of `series_id` run at `priority` (if more urgent)."""
        study = select(Series.study_id).where(Series.id == series_id).scalar_subquery()
        conn.execute(
            update(Job)
            .where(
                Job.series_id.in_(select(Series.id).where(Series.study_id == study)),
                Job.state.in_((JobState.QUEUED, JobState.RETRYING)),
                Job.priority > priority,
            )
            .values(priority=priority)
        )

    def fail(self, job_id: int, owner: str, error: str, permanent: bool) -> str | None:
        """Record a failure; returns the new state (failed, retrying or dead)."""
        now = utcnow()
        with self._engine.begin() as conn:
            attempts, max_attempts = conn.execute(
                select(Job.attempts, Job.max_attempts).where(Job.id == job_id)
            ).one()
            if permanent:
                state, run_after = JobState.FAILED, now
            elif attempts >= max_attempts:
                state, run_after = JobState.DEAD, now
            else:
                state = JobState.RETRYING
                run_after = now + timedelta(seconds=self.policy.delay(attempts))
            changed = conn.execute(
                self._owned(job_id, owner).values(
                    state=state,
                    error=error[:4000],
                    run_after=run_after,
                    finished_at=now if state != JobState.RETRYING else None,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
        return state if changed else None

    def requeue_expired(self) -> int:
        """Jobs whose worker died (lease expired) go back to the queue, or die if out of tries."""
        now = utcnow()
        with self._engine.begin() as conn:
            expired = (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now)
            dead = conn.execute(
                update(Job)
                .where(expired, Job.attempts >= Job.max_attempts)
                .values(
                    state=JobState.DEAD,
                    error="worker lost (lease expired) on the last attempt",
                    finished_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
            requeued = conn.execute(
                update(Job)
                .where(expired)
                .values(
                    state=JobState.RETRYING,
                    error="worker lost (lease expired)",
                    run_after=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
        return dead + requeued

    def retry(self, job_id: int) -> bool:
        """Run a finished job again, with a fresh set of attempts."""
        with self._engine.begin() as conn:
            return bool(
                conn.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state != JobState.RUNNING)
                    .values(
                        state=JobState.QUEUED,
                        attempts=0,
                        run_after=utcnow(),
                        finished_at=None,
                    )
                ).rowcount
            )

    def cancel(self, job_id: int) -> bool:
        """Cancel a job that has not finished; a running one loses its lease."""
        with self._engine.begin() as conn:
            return bool(
                conn.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.not_in(FINISHED))
                    .values(
                        state=JobState.CANCELLED,
                        finished_at=utcnow(),
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                ).rowcount
            )

    def list(self, state: str | None = None, limit: int = 1000) -> list[JobView]:
        statement = (
            select(Job, Series.series_instance_uid)
            .join(Series, Series.id == Job.series_id)
            .order_by(Job.id.desc())
            .limit(limit)
        )
        if state:
            statement = statement.where(Job.state == state)
        with Session(self._engine) as session:
            return [_view(job, series_uid) for job, series_uid in session.execute(statement)]

    @staticmethod
    def _owned(job_id: int, owner: str):  # type: ignore[no-untyped-def]
        return update(Job).where(
            Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner
        )


def _view(job: Job, series_uid: str) -> JobView:
    return JobView(
        id=job.id,
        pipeline=job.pipeline,
        series_instance_uid=series_uid,
        revision=job.revision,
        state=job.state,
        priority=job.priority,
        attempts=job.attempts,
        error=job.error,
        destinations=json.loads(job.destinations),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result=json.loads(job.result) if job.result else None,
    )
