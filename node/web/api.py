"""The admin API (`/api/v1`): read what `ainode status` shows (reader), act on work
(operator). One service layer with the CLI (`node.admin.report`, the queues); 4xx answers carry a
JSON `detail`, never a traceback. The handlers are plain functions: FastAPI runs them in its
thread pool, where their database work belongs."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select

from node.admin.report import (
    DiskStatus,
    PipelineStatus,
    SeriesStatus,
    StatusReport,
    StudyStatus,
    disk_status,
    list_series,
    list_studies,
    node_status,
    pipeline_statuses,
)
from node.config import Role
from node.delivery.dispatch.records import list_dispatches
from node.delivery.fetch.query import FetchQuery
from node.delivery.fetch.records import enqueue, list_fetches
from node.delivery.notify import list_notifications
from node.flow.queue import JobQueue, list_jobs
from node.flow.routing.router import route_again
from node.ops.audit import Action, AdminAction, list_events, record
from node.ops.processes import ProcessStatus, process_statuses
from node.store.db.models import Dispatch, Job, Series, SeriesState, Source, WorkState
from node.store.leased import LeasedQueue, RetryPolicy
from node.web.auth import Principal
from node.web.context import Context, WebContext, authenticated, requires

router = APIRouter(prefix="/api/v1")
MAX_ROW_ID = 2**63 - 1
"""The largest row id the databases store: a larger one is a 422, not an overflow."""
Limit = Annotated[int | None, Query(ge=1, le=100_000)]
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
Reader = Depends(requires(Role.READER))
Operator = Annotated[Principal, Depends(requires(Role.OPERATOR))]


class Caller(BaseModel):
    name: str
    roles: list[Role]


@router.get("/whoami")
def whoami(principal: Annotated[Principal, Depends(authenticated)]) -> Caller:
    """Who the credential names, and its roles (with those they grant)."""
    return Caller(name=principal.name, roles=sorted(principal.roles))


@router.get("/status", dependencies=[Reader])
def status(context: Context) -> StatusReport:
    """Everything `ainode status --json` shows."""
    return node_status(context.settings, context.engine)


@router.get("/studies", dependencies=[Reader])
def studies(context: Context, limit: Limit = None, newest: bool = False) -> list[StudyStatus]:
    """Oldest first, or `newest` first; at most `limit`."""
    with context.engine.connect() as conn:
        return list_studies(conn, limit, newest)


@router.get("/series", dependencies=[Reader])
def series(context: Context, limit: Limit = None, newest: bool = False) -> list[SeriesStatus]:
    """Oldest first, or `newest` first; at most `limit`."""
    with context.engine.connect() as conn:
        return list_series(conn, limit, newest)


@router.get("/pipelines", dependencies=[Reader])
def pipelines(context: Context) -> list[PipelineStatus]:
    """Every pipeline with its version, available or why not (its model's files checked)."""
    return pipeline_statuses(context.settings)


@router.get("/processes", dependencies=[Reader])
def processes(context: Context) -> list[ProcessStatus]:
    """Receivers, workers and the HTTP server: pid, alive, the job a worker runs."""
    return process_statuses(context.settings.storage.path, context.engine)


@router.get("/disk", dependencies=[Reader])
def disk(context: Context) -> DiskStatus:
    storage = context.settings.storage
    return disk_status(storage.path, storage.min_free_mb)


@router.get("/jobs", dependencies=[Reader])
def jobs(context: Context, state: WorkState | None = None) -> list[Any]:
    return list_jobs(context.engine, state.value if state else None)


@router.get("/dispatches", dependencies=[Reader])
def dispatches(context: Context) -> list[Any]:
    return list_dispatches(context.engine)


@router.get("/fetches", dependencies=[Reader])
def fetches(context: Context) -> list[Any]:
    return list_fetches(context.engine)


@router.get("/notifications", dependencies=[Reader])
def notifications(context: Context) -> list[Any]:
    return list_notifications(context.engine)


class Done(BaseModel):
    id: int
    state: str
    by: str


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: RowId, context: Context, principal: Operator) -> Done:
    """Queue a job again with a fresh set of attempts (409 while it runs)."""
    before = _state(context, Job, job_id)
    if not JobQueue(context.engine).retry(job_id):
        raise HTTPException(409, detail=f"job {job_id} is running")
    return _done(context, principal, Action.RETRY_JOB, job_id, before, WorkState.QUEUED)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: RowId, context: Context, principal: Operator) -> Done:
    """Cancel a job that has not finished (409 when it has)."""
    before = _state(context, Job, job_id)
    if not JobQueue(context.engine).cancel(job_id):
        raise HTTPException(409, detail=f"job {job_id} has finished")
    return _done(context, principal, Action.CANCEL_JOB, job_id, before, WorkState.CANCELLED)


@router.post("/dispatches/{dispatch_id}/retry")
def resend(dispatch_id: RowId, context: Context, principal: Operator) -> Done:
    """Send a dispatch again with a fresh set of attempts (409 while it is being sent)."""
    before = _state(context, Dispatch, dispatch_id)
    queue = LeasedQueue(context.engine, Dispatch, RetryPolicy())
    if not queue.retry(dispatch_id):
        raise HTTPException(409, detail=f"dispatch {dispatch_id} is being sent")
    return _done(context, principal, Action.RESEND_DISPATCH, dispatch_id, before, WorkState.QUEUED)


@router.post("/series/{series_uid}/route")
def reroute(series_uid: str, context: Context, principal: Operator) -> Done:
    """Route the series' current revision again with the current rules at the router's next
    pass: jobs the rules now ask for are created; those that exist are not repeated."""
    with context.engine.begin() as conn:
        found = conn.execute(
            select(Series.id, Series.revision, Series.state, Series.source).where(
                Series.series_instance_uid == series_uid
            )
        ).one_or_none()
        if found is None:
            raise HTTPException(404, detail=f"no series {series_uid}")
        if found.state != SeriesState.COMPLETE or found.source == Source.NODE:
            raise HTTPException(409, detail=f"series {series_uid} is {found.state}, not routable")
        route_again(conn, found.id, found.revision)
    facts = AdminAction(action=Action.ROUTE_SERIES, series=[series_uid], revision=found.revision)
    record(context.engine, principal.name, facts)
    return Done(id=found.id, state="routing", by=principal.name)


@router.get("/audit", dependencies=[Depends(requires(Role.ADMIN))])
def audit(context: Context, since: datetime | None = None) -> list[Any]:
    """The audit trail, newest first (administrators only)."""
    return list_events(context.engine, since)


class FetchRequest(BaseModel):
    """`ainode fetch`'s options, as JSON."""

    model_config = ConfigDict(extra="forbid")

    source: str
    study: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    since: date | None = None


@router.post("/fetches", status_code=202)
def fetch(request: FetchRequest, context: Context, principal: Operator) -> Done:
    """Queue a fetch; the node runs it (its state: `GET /api/v1/fetches`)."""
    if context.settings.source(request.source) is None:
        raise _invalid("source", f"unknown source {request.source!r}")
    try:
        query = FetchQuery(**request.model_dump(exclude={"source"}))
    except ValidationError as exc:
        raise _invalid("study", "give one of study, accession or patient_id") from exc
    max_attempts = context.settings.fetch.max_attempts
    fetch_id = enqueue(context.engine, request.source, query, max_attempts)
    return _done(context, principal, Action.QUEUE_FETCH, fetch_id, None, WorkState.QUEUED)


def _invalid(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own (the schema every client reads for a 422)."""
    problem = {"loc": ["body", field], "msg": message, "type": "value_error"}
    return HTTPException(422, detail=[problem])


def _state(context: WebContext, table: type[Job] | type[Dispatch], row_id: int) -> WorkState:
    """The row's state; 404 when there is no such row."""
    with context.engine.connect() as conn:
        state = conn.execute(select(table.state).where(table.id == row_id)).scalar_one_or_none()
    if state is None:
        noun = "job" if table is Job else "dispatch"
        raise HTTPException(404, detail=f"no {noun} {row_id}")
    return state


def _done(
    context: WebContext,
    principal: Principal,
    action: Action,
    row_id: int,
    before: WorkState | None,
    after: WorkState,
) -> Done:
    """Record who did what in the audit trail; the answer names them too."""
    before_value = before.value if before else None
    facts = AdminAction(action=action, id=row_id, before=before_value, after=after.value)
    record(context.engine, principal.name, facts)
    return Done(id=row_id, state=after, by=principal.name)
