"""What an operator changes in the node's work, one service behind the CLI and the HTTP API:
retry or cancel a job, send a dispatch again, route a series again, queue a fetch. Each checks
the row, changes it, records who did it in the audit trail, and says what changed; refusals are
`NotFound` (no such row) and `Conflict` (not in a state that allows it), which the CLI answers
with exit 1 and the API with 404 and 409."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select

from node.config import Settings
from node.delivery.fetch.query import FetchQuery
from node.delivery.fetch.records import enqueue
from node.flow.queue import JobQueue
from node.flow.routing.router import route_again
from node.ops.audit import Action, AdminAction, record
from node.store.db.models import Dispatch, Job, Series, SeriesState, Source, WorkState
from node.store.leased import LeasedQueue, RetryPolicy


class NotFound(LookupError):
    """No such job, dispatch or series."""


class Conflict(RuntimeError):
    """The row is not in a state the action applies to (a running job cannot be retried)."""


@dataclass(frozen=True)
class Changed:
    """What an action did: the row, its state before and after, and who asked."""

    id: int
    before: WorkState | None
    after: WorkState | str
    by: str


def retry_job(
    engine: Engine, actor: str, job_id: int, policy: RetryPolicy | None = None
) -> Changed:
    """Queue a job again with a fresh set of `policy`'s attempts (`workers:`)."""
    before = _state(engine, Job, job_id)
    if not JobQueue(engine, policy).retry(job_id):
        raise Conflict(f"job {job_id} is running")
    return _recorded(engine, actor, Action.RETRY_JOB, job_id, before, WorkState.QUEUED)


def cancel_job(engine: Engine, actor: str, job_id: int) -> Changed:
    """Cancel a job that has not finished (a running one loses its lease)."""
    before = _state(engine, Job, job_id)
    if not JobQueue(engine).cancel(job_id):
        raise Conflict(f"job {job_id} has finished")
    return _recorded(engine, actor, Action.CANCEL_JOB, job_id, before, WorkState.CANCELLED)


def resend_dispatch(
    engine: Engine, actor: str, dispatch_id: int, policy: RetryPolicy | None = None
) -> Changed:
    """Send a dispatch again with a fresh set of `policy`'s attempts (`dispatch:`)."""
    before = _state(engine, Dispatch, dispatch_id)
    if not LeasedQueue(engine, Dispatch, policy or RetryPolicy()).retry(dispatch_id):
        raise Conflict(f"dispatch {dispatch_id} is being sent")
    return _recorded(engine, actor, Action.RESEND_DISPATCH, dispatch_id, before, WorkState.QUEUED)


def route_series(engine: Engine, actor: str, series_uid: str) -> Changed:
    """Route the series' current revision again with the current rules at the router's next
    pass: jobs the rules now ask for are created; those that exist are not repeated."""
    with engine.begin() as conn:
        found = conn.execute(
            select(Series.id, Series.revision, Series.state, Series.source).where(
                Series.series_instance_uid == series_uid
            )
        ).one_or_none()
        if found is None:
            raise NotFound(f"no series {series_uid}")
        if found.state != SeriesState.COMPLETE or found.source == Source.NODE:
            raise Conflict(f"series {series_uid} is {found.state}, not routable")
        route_again(conn, found.id, found.revision)
    facts = AdminAction(action=Action.ROUTE_SERIES, series=[series_uid], revision=found.revision)
    record(engine, actor, facts)
    return Changed(found.id, None, "routing", actor)


def queue_fetch(
    engine: Engine, settings: Settings, actor: str, source: str, query: FetchQuery
) -> Changed:
    """Queue a fetch from a configured source; the node's fetcher runs it."""
    if settings.source(source) is None:
        raise NotFound(f"unknown source {source!r}")
    fetch_id = enqueue(engine, source, query, settings.fetch.max_attempts)
    return _recorded(engine, actor, Action.QUEUE_FETCH, fetch_id, None, WorkState.QUEUED)


def _state(engine: Engine, table: type[Job] | type[Dispatch], row_id: int) -> WorkState:
    with engine.connect() as conn:
        state = conn.execute(select(table.state).where(table.id == row_id)).scalar_one_or_none()
    if state is None:
        raise NotFound(f"no {'job' if table is Job else 'dispatch'} {row_id}")
    return state


def _recorded(
    engine: Engine,
    actor: str,
    action: Action,
    row_id: int,
    before: WorkState | None,
    after: WorkState,
) -> Changed:
    before_value = before.value if before else None
    facts = AdminAction(action=action, id=row_id, before=before_value, after=after.value)
    record(engine, actor, facts)
    return Changed(row_id, before, after, actor)
