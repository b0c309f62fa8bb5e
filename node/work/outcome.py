"""A job's success, written in one transaction: its result summary, the dispatches of its
result objects, the escalation a positive result asks for, and its embedding.

The worker hands over a typed `JobOutcome`; the dispatcher and `ainode similar` later read the
rows written here. Nothing else creates dispatches or embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel
from sqlalchemy import Connection, Engine, select, update

from node.config import NotificationTarget, NotifyOn, Settings, api_link
from node.flow.queue import ClaimedJob
from node.flow.routing.router import route_again
from node.ops.audit import JobEnded, record_quietly
from node.ops.metrics import JOBS
from node.store.db.models import Dispatch, Embedding, Job, Series, WorkState, utcnow
from node.store.db.upsert import insert_into, upsert
from node.store.leased import DUE, LeasedQueue, RetryPolicy, queued
from node.store.notifications import queue_notifications
from node.work.guard import GuardScore, score_profile

log = logging.getLogger(__name__)


class CodedConcept(BaseModel):
    value: str
    scheme: str
    meaning: str


class MeasuredValue(BaseModel):
    concept: CodedConcept
    value: float
    unit: str
    """The UCUM code."""


class SegmentSummary(BaseModel):
    """A mask of the result: its coded segment and how many voxels it holds."""

    label: str
    category: CodedConcept
    type: CodedConcept
    anatomic_region: CodedConcept | None = None
    color_rgb: tuple[int, int, int]
    voxels: int


class RegionSummary(BaseModel):
    name: str
    finding_site: CodedConcept
    segment: str | None = None
    measurements: list[MeasuredValue] = []


class FindingSummary(BaseModel):
    concept: CodedConcept
    probability: float
    present: bool
    normal: bool = False


class DetectionSummary(BaseModel):
    label: CodedConcept
    score: float
    box_min_mm: tuple[float, float, float]
    box_max_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    finding_site: CodedConcept | None = None
    segment: str | None = None
    measurements: list[MeasuredValue] = []


class ProfileSummary(BaseModel):
    """A value per slice (e.g. % high attenuation), in volume slice order."""

    name: str
    unit: str
    values: list[float]


class ResultSummary(BaseModel):
    """What a job records of its result (`result` in `ainode jobs list --json`): the
    pipeline's result without voxels, where it was written and what was encoded."""

    pipeline: str
    version: str
    positive: bool
    segments: list[SegmentSummary] = []
    regions: list[RegionSummary] = []
    findings: list[FindingSummary] = []
    detections: list[DetectionSummary] = []
    profiles: list[ProfileSummary] = []
    embedding_dim: int | None = None
    guard_distance: float | None = None
    """The series' distance to the site's reference (`node.work.guard`): about 1 is like it."""
    guard_threshold: float | None = None
    timings_s: dict[str, float] = {}
    batch: int = 1
    """How many series went through the network together with this one (its timings are
    the batch's)."""
    output: str = ""
    objects: list[str] = []
    files: list[str] = []
    """Where each of `objects` is kept, relative to the storage root: the node's store (a
    result is kept once), or `output` when the store did not take it."""
    dropped: list[str] = []


@dataclass(frozen=True)
class JobOutcome:
    """A finished job as the worker hands it over."""

    job_id: int
    owner: str
    summary: ResultSummary
    objects: Sequence[Path] = ()
    embedding: np.ndarray | None = None
    profile: np.ndarray | None = None


@dataclass(frozen=True)
class FinishedJob:
    """The job row's fields the outcome needs."""

    series_id: int
    revision: int
    pipeline: str
    destinations: list[str]
    priority: int
    priority_if_positive: int | None


class OutcomeRecorder:
    """Writes job successes; `dispatch_attempts` and `notify_attempts` are each new dispatch's
    and notification's `max_attempts`."""

    def __init__(
        self,
        engine: Engine,
        dispatch_attempts: int = 8,
        notifications: Mapping[str, NotificationTarget] | None = None,
        link: str | None = None,
        notify_attempts: int = 8,
        storage_root: Path | None = None,
    ) -> None:
        """`notifications`: the configured targets of `notify:`; `link`: where the node's
        HTTP server is, for the notifications' JSON; `storage_root`: the store, whose files
        dispatches name relative to it (a restored backup's still send)."""
        self._engine = engine
        self._storage_root = storage_root
        self._jobs = LeasedQueue(engine, Job, RetryPolicy())
        self._dispatch_attempts = dispatch_attempts
        self._notifications = notifications or {}
        self._notify_attempts = notify_attempts
        self._link = link

    @classmethod
    def of(cls, engine: Engine, settings: Settings) -> OutcomeRecorder:
        """The recorder a node's settings make, for its local and its remote workers alike."""
        return cls(
            engine,
            settings.dispatch.max_attempts,
            settings.notifications,
            api_link(settings),
            notify_attempts=settings.notify.max_attempts,
            storage_root=settings.storage.path,
        )

    def record(self, outcome: JobOutcome) -> bool:
        """Record the success and its consequences; False (nothing written) when the job was
        no longer the worker's (lease lost, cancelled)."""
        summary = outcome.summary
        with self._engine.begin() as conn:
            job = _finished_job(conn, outcome.job_id)
            if job is None:
                return False
            score = _guard_score(conn, job, outcome)
            if score is not None:
                summary = summary.model_copy(
                    update={"guard_distance": score.distance, "guard_threshold": score.threshold}
                )
            owned = self._jobs.succeed(
                conn, outcome.job_id, outcome.owner, result=summary.model_dump_json()
            )
            if not owned:
                return False
            priority = job.priority
            escalation = job.priority_if_positive
            if summary.positive and escalation is not None and escalation < priority:
                priority = escalation
                _escalate_study(conn, job.series_id, escalation)
                log.info(
                    "job %d: positive result; study raised to priority %d", outcome.job_id, priority
                )
            create_dispatches(
                conn,
                outcome.job_id,
                job.destinations,
                [_relative(path, self._storage_root) for path in outcome.objects],
                self._dispatch_attempts,
                priority,
            )
            if outcome.embedding is not None:
                store_embedding(
                    conn, job, summary.version, outcome.embedding, outcome.profile, score
                )
            if score is not None:
                route_again(conn, job.series_id, job.revision)  # rules may test the score
                if score.unlike:
                    log.warning(
                        "job %d: series unlike the site's reference (guard distance %.2f > %.2f)",
                        outcome.job_id,
                        score.distance,
                        score.threshold,
                    )
            queue_notifications(
                conn,
                outcome.job_id,
                self._notifications,
                {NotifyOn.DONE, NotifyOn.POSITIVE} if summary.positive else {NotifyOn.DONE},
                self._notify_attempts,
                version=summary.version,
                positive=summary.positive,
                findings=[finding.model_dump() for finding in summary.findings],
                detections=[detection.model_dump() for detection in summary.detections],
                link=self._link,
            )
        return True


def _guard_score(conn: Connection, job: FinishedJob, outcome: JobOutcome) -> GuardScore | None:
    """The input guard's score of the job's embedding profile (None without one, or without
    a reference for the job's pipeline)."""
    if outcome.embedding is None or outcome.profile is None:
        return None
    return score_profile(conn, job.pipeline, outcome.profile)


def _finished_job(conn: Connection, job_id: int) -> FinishedJob | None:
    """The job's row; None when it is gone (its study deleted while it ran)."""
    row = conn.execute(
        select(
            Job.series_id,
            Job.revision,
            Job.pipeline,
            Job.destinations,
            Job.priority,
            Job.priority_if_positive,
        ).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        return None
    return FinishedJob(
        row.series_id,
        row.revision,
        row.pipeline,
        row.destinations,
        row.priority,
        row.priority_if_positive,
    )


def _escalate_study(conn: Connection, series_id: int, priority: int) -> None:
    """Waiting jobs of the study of `series_id` run at `priority` (if more urgent)."""
    study = select(Series.study_id).where(Series.id == series_id).scalar_subquery()
    conn.execute(
        update(Job)
        .where(
            Job.series_id.in_(select(Series.id).where(Series.study_id == study)),
            Job.state.in_(DUE),
            Job.priority > priority,
        )
        .values(priority=priority)
    )


def _relative(path: Path, root: Path | None) -> Path:
    return path.relative_to(root) if root is not None and path.is_relative_to(root) else path


def create_dispatches(
    conn: Connection,
    job_id: int,
    destinations: Sequence[str],
    objects: Sequence[Path],
    max_attempts: int,
    priority: int,
) -> None:
    """Queue the sending of `objects` (absolute, or relative to the store) to each
    destination (again, if the job ran before)."""
    if not objects or not destinations:
        return
    now = utcnow()
    rows = [
        {
            "job_id": job_id,
            "destination": destination,
            "objects": [str(p) for p in objects],
            "priority": priority,
            **queued(max_attempts, now),
        }
        for destination in dict.fromkeys(destinations)
    ]
    insert = insert_into(conn, Dispatch).values(rows)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["job_id", "destination"],
            set_={
                "objects": insert.excluded.objects,
                "state": WorkState.QUEUED,
                "attempts": 0,
                "max_attempts": max_attempts,
                "priority": priority,
                "status": None,
                "sent": None,
                "error": None,
                "run_after": now,
                "finished_at": None,
                "lease_owner": None,
                "lease_expires_at": None,
            },
        )
    )


def store_embedding(
    conn: Connection,
    job: FinishedJob,
    model_version: str,
    vector: np.ndarray,
    profile: np.ndarray | None,
    score: GuardScore | None,
) -> None:
    """Keep the series' embedding from this pipeline (a later revision replaces it), with
    its profile and the input guard's score of it."""
    data = np.asarray(vector, dtype=np.float32)
    row = {
        "series_id": job.series_id,
        "revision": job.revision,
        "pipeline": job.pipeline,
        "model_version": model_version,
        "dimensions": int(data.size),
        "vector": data.tobytes(),
        "profile": None if profile is None else np.asarray(profile, np.float32).tobytes(),
        "guard_distance": None if score is None else score.distance,
        "created_at": utcnow(),
    }
    upsert(conn, Embedding, row, ["series_id", "pipeline"])


class Concluded(Protocol):
    """What the audit of a job's end reads of its result."""

    @property
    def version(self) -> str: ...
    @property
    def positive(self) -> bool: ...


def audit_job_end(
    engine: Engine,
    settings: Settings,
    owner: str,
    job: ClaimedJob,
    state: str,
    result: Concluded | None = None,
    study: str | None = None,
) -> None:
    """Count, audit and (for a failure or a dead job) notify how a job ended, whichever
    worker ran it."""
    JOBS.labels(job.pipeline, state).inc()
    if state in (WorkState.FAILED, WorkState.DEAD):
        _notify_failure(engine, settings, job.id, state)
    facts = JobEnded(
        job=job.id,
        pipeline=job.pipeline,
        series=[job.series_instance_uid],
        revision=job.revision,
        state=state,
        version=result.version if result is not None else None,
        positive=result.positive if result is not None else None,
    )
    record_quietly(engine, owner, facts, study)


def _notify_failure(engine: Engine, settings: Settings, job_id: int, state: str) -> None:
    try:
        with engine.begin() as conn:
            error = conn.execute(select(Job.error).where(Job.id == job_id)).scalar_one()
            queue_notifications(
                conn,
                job_id,
                settings.notifications,
                {NotifyOn.FAILED},
                settings.notify.max_attempts,
                state=state,
                error=error,
                link=api_link(settings),
            )
    except Exception as exc:  # the job's failure is recorded; its notice is not
        log.error("job %d: failure notification not queued: %s", job_id, exc)
