"""The job queue: a job is one pipeline run for one series revision.

Routing enqueues jobs (idempotently: a revision gets each pipeline once); workers claim them
through the leased queue (`node.store.leased`), most urgent first; `node.work.outcome` records a
success. This module reads and writes the `jobs` table and nothing after it.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Engine, Row, select
from sqlalchemy.orm import Session

from node.flow.routing.engine import JobRequest
from node.store.db.models import Job, Series, WorkState, utcnow
from node.store.db.upsert import insert_into
from node.store.leased import LeasedQueue, RetryPolicy, queued


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
    state: WorkState
    priority: int
    attempts: int
    error: str | None
    destinations: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, object] | None
    stage: str | None = None

    def line(self) -> str:
        """One line for people, in `ainode status` and `ainode jobs list`."""
        error = f"  error: {self.error.splitlines()[0][:120]}" if self.error else ""
        return (
            f"job {self.id:>5}  {self.pipeline:<16} {self.state:<9} attempts {self.attempts}  "
            f"series {self.series_instance_uid} rev {self.revision}{error}"
        )


class JobQueue:
    def __init__(self, engine: Engine, policy: RetryPolicy | None = None) -> None:
        self._engine = engine
        self.leased = LeasedQueue(engine, Job, policy or RetryPolicy())
        self._insert = insert_into(engine, Job).on_conflict_do_nothing().returning(Job.id)

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
                        "destinations": request.destinations,
                        "rules": request.rules,
                        "notify": request.notify,
                        "priority": int(request.priority),
                        "priority_if_positive": (
                            None
                            if request.priority_if_positive is None
                            else int(request.priority_if_positive)
                        ),
                        **queued(self.leased.policy.max_attempts, now),
                    },
                ).first()
                if row is not None:
                    created.append(int(row[0]))
        return created

    def claim(
        self, owner: str, lease_seconds: float, pipelines: Collection[str] | None = None
    ) -> ClaimedJob | None:
        """Take the most urgent runnable job (of one of `pipelines`, where given), or None."""
        where = None if pipelines is None else Job.pipeline.in_(list(pipelines))
        claimed = self._claim(owner, lease_seconds, 1, where)
        return claimed[0] if claimed else None

    def claim_more(
        self, owner: str, lease_seconds: float, pipeline: str, limit: int
    ) -> list[ClaimedJob]:
        """Take up to `limit` more runnable jobs of `pipeline`, most urgent first (a batch)."""
        return self._claim(owner, lease_seconds, limit, Job.pipeline == pipeline)

    def _claim(
        self,
        owner: str,
        lease_seconds: float,
        limit: int,
        where: ColumnElement[bool] | None = None,
    ) -> list[ClaimedJob]:
        with self._engine.begin() as conn:
            leases = self.leased.claim(conn, owner, lease_seconds, limit, where)
            if not leases:
                return []
            rows = conn.execute(_CLAIMED.where(Job.id.in_([lease.id for lease in leases]))).all()
        found = {row.id: row for row in rows}
        return [_claimed(found[lease.id], lease.attempt) for lease in leases]

    def held(self, job_id: int, owner: str) -> ClaimedJob | None:
        """The job, while `owner` holds its lease (None otherwise)."""
        with self._engine.connect() as conn:
            row = conn.execute(
                _CLAIMED.where(
                    Job.id == job_id, Job.state == WorkState.RUNNING, Job.lease_owner == owner
                )
            ).first()
        return None if row is None else _claimed(row, row.attempts)

    def set_stage(self, job_id: int, owner: str, stage: str) -> None:
        """Note what the job does now (while `owner` holds it)."""
        with self._engine.begin() as conn:
            conn.execute(self.leased.owned(job_id, owner).values(stage=stage[:64]))

    def fail(self, job_id: int, owner: str, error: str, permanent: bool) -> WorkState | None:
        """Record a failure; returns the new state (failed, retrying or dead)."""
        return self.leased.fail(job_id, owner, error, permanent)

    def requeue_expired(self) -> int:
        """Jobs whose worker died (lease expired) go back to the queue, or die if out of tries."""
        return self.leased.requeue_expired()

    def retry(self, job_id: int) -> bool:
        """Run a finished job again, with a fresh set of attempts."""
        return self.leased.retry(job_id)

    def cancel(self, job_id: int) -> bool:
        """Cancel a job that has not finished; a running one loses its lease."""
        return self.leased.cancel(job_id)

    def list(self, state: str | None = None, limit: int = 1000) -> list[JobView]:
        return list_jobs(self._engine, state, limit)


_CLAIMED = select(
    Job.id,
    Job.series_id,
    Series.series_instance_uid,
    Job.revision,
    Job.pipeline,
    Job.destinations,
    Job.attempts,
).join(Series, Series.id == Job.series_id)
"""What a worker is told of a job it holds."""


def _claimed(row: Row[int, int, str, int, str, list[str], int], attempt: int) -> ClaimedJob:
    return ClaimedJob(
        row.id,
        row.series_id,
        row.series_instance_uid,
        row.revision,
        row.pipeline,
        tuple(row.destinations),
        attempt,
    )


def running_jobs(engine: Engine) -> dict[str, int]:
    """Each running job by the owner of its lease."""
    with engine.connect() as conn:
        running = conn.execute(
            select(Job.lease_owner, Job.id).where(Job.state == WorkState.RUNNING)
        ).all()
    return {str(owner): job_id for owner, job_id in running}


def list_jobs(engine: Engine, state: str | None = None, limit: int = 1000) -> list[JobView]:
    """Newest first."""
    statement = (
        select(Job, Series.series_instance_uid)
        .join(Series, Series.id == Job.series_id)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if state:
        statement = statement.where(Job.state == state)
    with Session(engine) as session:
        return [_view(job, series_uid) for job, series_uid in session.execute(statement)]


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
        destinations=job.destinations,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result=json.loads(job.result) if job.result else None,
        stage=job.stage,
    )
