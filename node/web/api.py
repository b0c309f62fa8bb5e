"""The admin API (`/api/v1`): read what `ainode status` shows (reader), act on work
(operator). One service layer with the CLI (`node.admin.report`, the queues); 4xx answers carry a
JSON `detail`, never a traceback. The handlers are plain functions: FastAPI runs them in its
thread pool, where their database work belongs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from node.admin import actions
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
    render_text,
)
from node.delivery.dispatch.records import list_dispatches
from node.delivery.fetch.query import FetchQuery
from node.delivery.fetch.records import list_fetches
from node.delivery.notify import list_notifications
from node.flow.queue import list_jobs, running_jobs
from node.ops.audit import PatientRecordRead, list_events, record_quietly
from node.ops.processes import ProcessStatus, process_statuses
from node.roles import Role
from node.store.db.models import WorkState
from node.store.leased import RetryPolicy
from node.store.remote_workers import RemoteWorkerStatus, list_remote_workers
from node.web.auth import Principal
from node.web.context import Context, authenticated, requires
from node.web.multipart import accepted

router = APIRouter(prefix="/api/v1")
MAX_ROW_ID = 2**63 - 1
"""The largest row id the databases store: a larger one is a 422, not an overflow."""
Limit = Annotated[int | None, Query(ge=1, le=100_000)]
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
Reader = Depends(requires(Role.READER))
Viewer = Annotated[Principal, Depends(requires(Role.READER))]
Operator = Annotated[Principal, Depends(requires(Role.OPERATOR))]
PATIENT_FIELDS = ("patient_name", "patient_id", "accession_number", "study_date")
"""What a caller without the `phi` role does not see of a study."""


class Caller(BaseModel):
    name: str
    roles: list[Role]


@router.get("/whoami")
def whoami(principal: Annotated[Principal, Depends(authenticated)]) -> Caller:
    """Who the credential names, and its roles (with those they grant)."""
    return Caller(name=principal.name, roles=sorted(principal.roles))


@router.get("/status", response_model=StatusReport)
def status(request: Request, context: Context, principal: Viewer) -> Any:
    """Everything `ainode status --json` shows (patient identifiers to the `phi` role); as
    `ainode status` prints it for `Accept: text/plain`."""
    report = node_status(context.settings, context.engine)
    report.studies = shown(context, principal, "/api/v1/status", report.studies)
    return _as_text(render_text(report)) if _wants_text(request) else report


Find = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="a patient ID or accession number"),
]


@router.get("/studies")
def studies(
    context: Context,
    principal: Viewer,
    limit: Limit = None,
    newest: bool = False,
    find: Find = None,
) -> list[StudyStatus]:
    """Oldest first, or `newest` first; at most `limit`; with `find`, the studies of that
    patient ID or accession number (the `phi` role: 403 for others). Patient identifiers
    go to the `phi` role only."""
    if find is not None and not principal.may(Role.PHI):
        raise HTTPException(403, detail="finding studies by patient needs the phi role")
    with context.engine.connect() as conn:
        found = list_studies(conn, limit, newest, find)
    if find is None:
        return shown(context, principal, "/api/v1/studies", found)
    return shown(context, principal, "/api/v1/studies?find", found, lookup=find)


def shown(
    context: Context,
    principal: Principal,
    route: str,
    studies: list[StudyStatus],
    lookup: str = "",
) -> list[StudyStatus]:
    """The studies with their patient identifiers for a caller with the `phi` role (the view
    is an audit event, once a minute per caller, route and `lookup`), without them for the
    others."""
    if not principal.may(Role.PHI):
        return [s.model_copy(update=dict.fromkeys(PATIENT_FIELDS)) for s in studies]
    if studies and context.patient_views.due(f"{principal.name} {route} {lookup}") is not None:
        facts = PatientRecordRead(route=route, studies=len(studies))
        record_quietly(context.engine, principal.name, facts)
    return studies


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
    return process_statuses(context.settings.storage.path, running_jobs(context.engine))


@router.get("/workers", dependencies=[Reader])
def remote_workers(context: Context) -> list[RemoteWorkerStatus]:
    """The workers on other hosts: their pipelines, device, when last seen, the job they run."""
    return list_remote_workers(context.engine)


@router.get("/disk", dependencies=[Reader])
def disk(context: Context) -> DiskStatus:
    storage = context.settings.storage
    return disk_status(storage.path, storage.min_free_mb)


@router.get("/jobs", dependencies=[Reader], response_model=list[Any])
def jobs(request: Request, context: Context, state: WorkState | None = None) -> Any:
    """Jobs, newest first; as `ainode jobs list` prints them for `Accept: text/plain`."""
    listed = list_jobs(context.engine, state.value if state else None)
    return _as_text(*(job.line() for job in listed)) if _wants_text(request) else listed


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
    policy = RetryPolicy.of(context.settings.workers)
    return _answer(lambda: actions.retry_job(context.engine, principal.name, job_id, policy))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: RowId, context: Context, principal: Operator) -> Done:
    """Cancel a job that has not finished (409 when it has)."""
    return _answer(lambda: actions.cancel_job(context.engine, principal.name, job_id))


@router.post("/dispatches/{dispatch_id}/retry")
def resend(dispatch_id: RowId, context: Context, principal: Operator) -> Done:
    """Send a dispatch again with a fresh set of attempts (409 while it is being sent)."""
    policy = RetryPolicy.of(context.settings.dispatch)
    return _answer(
        lambda: actions.resend_dispatch(context.engine, principal.name, dispatch_id, policy)
    )


@router.post("/series/{series_uid}/route")
def reroute(series_uid: str, context: Context, principal: Operator) -> Done:
    """Route the series' current revision again with the current rules at the router's next
    pass: jobs the rules now ask for are created; those that exist are not repeated."""
    return _answer(lambda: actions.route_series(context.engine, principal.name, series_uid))


@router.get("/audit", dependencies=[Depends(requires(Role.ADMIN))], response_model=list[Any])
def audit(request: Request, context: Context, since: datetime | None = None) -> Any:
    """The audit trail, newest first (administrators only); as `ainode audit list` prints it
    for `Accept: text/plain`."""
    events = list_events(context.engine, since)
    return _as_text(*(event.line() for event in events)) if _wants_text(request) else events


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
    changed = actions.queue_fetch(
        context.engine, context.settings, principal.name, request.source, query
    )
    return Done(id=changed.id, state=changed.after, by=changed.by)


def _wants_text(request: Request) -> bool:
    """The caller prefers plain text (the CLI over the admin socket), JSON otherwise."""
    [(first, _), *_] = accepted(request.headers.get("accept"), "application/json")
    return first == "text/plain"


def _as_text(*lines: str) -> PlainTextResponse:
    return PlainTextResponse("".join(f"{line}\n" for line in lines))


def _invalid(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own (the schema every client reads for a 422)."""
    problem = {"loc": ["body", field], "msg": message, "type": "value_error"}
    return HTTPException(422, detail=[problem])


def _answer(action: Callable[[], actions.Changed]) -> Done:
    """Run an admin action: 404 for a row that does not exist, 409 for one in the wrong state."""
    try:
        changed = action()
    except actions.NotFound as exc:
        raise HTTPException(404, detail=str(exc)) from exc
    except actions.Conflict as exc:
        raise HTTPException(409, detail=str(exc)) from exc
    return Done(id=changed.id, state=changed.after, by=changed.by)
