"""What `ainode status` and the HTTP API show: studies, series with state and counts, jobs,
dispatches, fetches, open associations, rules, pipelines, disk."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, Result, func, or_, select

from node.config import Settings
from node.delivery.dispatch.records import DispatchView, list_dispatches
from node.delivery.fetch.records import FetchView, list_fetches
from node.delivery.notify import NotificationView, list_notifications
from node.flow.queue import JobView, list_jobs, running_jobs
from node.flow.routing import admin
from node.ops.processes import ProcessStatus, process_statuses
from node.store.catalog import distance_of
from node.store.db.models import Association, Embedding, GuardReference, Series, Study
from node.store.remote_workers import RemoteWorkerStatus, list_remote_workers
from node.store.storage import InstanceStore
from pipelines.registry import availability

M = TypeVar("M", bound=BaseModel)


class SeriesStatus(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    state: str
    revision: int
    instances: int
    modality: str | None
    series_description: str | None
    convolution_kernel: str | None
    calling_ae: str | None
    called_ae: str | None
    source: str
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    routed: bool = False
    """The routing rules have been applied to this revision (jobs made, or none matched)."""
    guard_distance: float | None = None
    """Its distance to the site's reference series (`node.work.guard`) at this revision."""


class StudyStatus(BaseModel):
    study_instance_uid: str
    study_description: str | None
    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    """What an operator looks a study up by (the API shows them to the `phi` role only)."""
    prior_of: str | None = None
    """Fetched as a prior of this study."""
    series: int
    instances: int
    last_received_at: datetime


class AssociationStatus(BaseModel):
    id: str
    calling_ae: str
    called_ae: str
    opened_at: datetime


class RulesStatus(BaseModel):
    file: str | None
    error: str | None
    rules: int = 0
    modified_at: datetime | None = None
    """When the file last changed: the router (re)loads it at its next pass after that."""


class PipelineStatus(BaseModel):
    name: str
    version: str
    available: bool
    problem: str | None


class DiskStatus(BaseModel):
    """The store's filesystem against `storage.min_free_mb`: below it the node refuses
    associations and answers C-STORE with A700."""

    path: str
    free_mb: float
    min_free_mb: float
    accepting: bool


class GuardStatus(BaseModel):
    """An embedding pipeline's input-guard reference and what it has scored."""

    pipeline: str
    reference_series: int
    threshold: float
    fitted_at: datetime
    scored: int
    unlike: int
    """Scored series beyond the threshold."""


class StatusReport(BaseModel):
    """The JSON of `ainode status --json`."""

    studies: list[StudyStatus]
    series: list[SeriesStatus]
    open_associations: list[AssociationStatus]
    jobs: list[JobView] = []
    rules: RulesStatus | None = None
    pipelines: list[PipelineStatus] = []
    dispatches: list[DispatchView] = []
    fetches: list[FetchView] = []
    notifications: list[NotificationView] = []
    disk: DiskStatus | None = None
    processes: list[ProcessStatus] = []
    remote_workers: list[RemoteWorkerStatus] = []
    guards: list[GuardStatus] = []


def disk_status(storage: Path, min_free_mb: float) -> DiskStatus:
    free_mb = InstanceStore(storage).free_mb()
    return DiskStatus(
        path=str(storage),
        free_mb=round(free_mb, 1),
        min_free_mb=min_free_mb,
        accepting=free_mb >= min_free_mb,
    )


SERIES_COLUMNS = (
    Series.series_instance_uid,
    Study.study_instance_uid,
    Series.state,
    Series.revision,
    Series.instance_count.label("instances"),
    Series.modality,
    Series.series_description,
    Series.convolution_kernel,
    Series.calling_ae,
    Series.called_ae,
    Series.source,
    Series.first_received_at,
    Series.last_received_at,
    Series.completed_at,
    (Series.routed_revision >= Series.revision).label("routed"),
    distance_of(Series.id, Series.revision).label("guard_distance"),
)
"""What a series shows, read as columns: no ORM objects (10,000 series in tens of ms)."""


def build_report(engine: Engine) -> StatusReport:
    """Studies, series and open associations, read in one transaction (one snapshot)."""
    with engine.connect() as conn:
        return StatusReport(
            studies=list_studies(conn),
            series=list_series(conn),
            open_associations=[
                AssociationStatus.model_validate(row, from_attributes=True)
                for row in conn.execute(
                    select(
                        Association.id,
                        Association.calling_ae,
                        Association.called_ae,
                        Association.opened_at,
                    ).where(Association.closed_at.is_(None))
                )
            ],
        )


def list_series(
    conn: Connection, limit: int | None = None, newest: bool = False
) -> list[SeriesStatus]:
    """Oldest first (newest first with `newest`), at most `limit`."""
    order = (Series.first_received_at, Series.id)
    result = conn.execute(
        select(*SERIES_COLUMNS)
        .join(Study, Series.study_id == Study.id)
        .order_by(*(column.desc() for column in order) if newest else order)
        .limit(limit)
    )
    return _validated(result, SeriesStatus)


def list_studies(
    conn: Connection, limit: int | None = None, newest: bool = False, find: str | None = None
) -> list[StudyStatus]:
    """Oldest first (newest first with `newest`), at most `limit`, with their series and
    instance counts; with `find`, those whose patient ID or accession number it is."""
    order = (Study.first_received_at, Study.id)
    statement = (
        select(
            Study.study_instance_uid,
            Study.study_description,
            Study.patient_name,
            Study.patient_id,
            Study.accession_number,
            Study.study_date,
            Study.prior_of,
            func.count(Series.id).label("series"),
            func.coalesce(func.sum(Series.instance_count), 0).label("instances"),
            func.coalesce(func.max(Series.last_received_at), Study.first_received_at).label(
                "last_received_at"
            ),
        )
        .outerjoin(Series, Series.study_id == Study.id)
        .group_by(Study.id)
        .order_by(*(column.desc() for column in order) if newest else order)
        .limit(limit)
    )
    if find is not None:
        statement = statement.where(or_(Study.patient_id == find, Study.accession_number == find))
    return _validated(conn.execute(statement), StudyStatus)


def _validated(result: Result[*tuple[Any, ...]], model: type[M]) -> list[M]:
    """Each row as `model` (zipped with the column names once: a mapping per row costs more
    than the query at 10,000 rows)."""
    keys = list(result.keys())
    return [model.model_validate(dict(zip(keys, row, strict=True))) for row in result]


def guard_statuses(conn: Connection) -> list[GuardStatus]:
    scored = (
        select(
            Embedding.pipeline,
            func.count(Embedding.guard_distance).label("scored"),
            func.count(Embedding.id)
            .filter(Embedding.guard_distance > GuardReference.threshold)
            .label("unlike"),
        )
        .join(GuardReference, GuardReference.pipeline == Embedding.pipeline)
        .group_by(Embedding.pipeline)
        .subquery()
    )
    rows = conn.execute(
        select(
            GuardReference.pipeline,
            GuardReference.series,
            GuardReference.threshold,
            GuardReference.fitted_at,
            func.coalesce(scored.c.scored, 0),
            func.coalesce(scored.c.unlike, 0),
        ).outerjoin(scored, scored.c.pipeline == GuardReference.pipeline)
    ).all()
    return [
        GuardStatus(
            pipeline=pipeline,
            reference_series=len(series),
            threshold=threshold,
            fitted_at=fitted_at,
            scored=count,
            unlike=unlike,
        )
        for pipeline, series, threshold, fitted_at, count, unlike in rows
    ]


def node_status(settings: Settings, engine: Engine) -> StatusReport:
    """Everything `ainode status` and `GET /api/v1/status` show, one service for both."""
    report = build_report(engine)
    report.jobs = list_jobs(engine)
    report.pipelines = pipeline_statuses(settings)
    report.rules = rules_status(settings)
    report.dispatches = list_dispatches(engine)
    report.fetches = list_fetches(engine)
    report.notifications = list_notifications(engine)
    report.disk = disk_status(settings.storage.path, settings.storage.min_free_mb)
    report.processes = process_statuses(settings.storage.path, running_jobs(engine))
    report.remote_workers = list_remote_workers(engine)
    with engine.connect() as conn:
        report.guards = guard_statuses(conn)
    return report


def rules_status(settings: Settings) -> RulesStatus:
    """The rules file checked against this node (the last good rules route while it is not
    valid)."""
    path = settings.routing.rules_file
    if path is None:
        return RulesStatus(file=None, error=None)
    checked = admin.check(settings)
    error = "\n".join(problem.render() for problem in checked.problems)
    try:
        modified_at: datetime | None = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:
        modified_at = None
    return RulesStatus(
        file=str(path), error=error or None, rules=checked.rules, modified_at=modified_at
    )


def render_text(report: StatusReport) -> str:
    """A plain table for people."""
    lines = [f"{len(report.studies)} studies, {len(report.series)} series"]
    for study in report.studies:
        prior = f"  prior of {study.prior_of}" if study.prior_of else ""
        lines.append(
            f"study {study.study_instance_uid}  {study.study_description or ''}".rstrip()
            + f"  ({study.series} series, {study.instances} instances){prior}"
        )
        for s in report.series:
            if s.study_instance_uid != study.study_instance_uid:
                continue
            guard = "" if s.guard_distance is None else f"  guard {s.guard_distance:.2f}"
            lines.append(
                f"  series {s.series_instance_uid}  {s.modality or '-':<3} "
                f"{s.state:<9} rev {s.revision}  {s.instances:>5} instances  "
                f"from {s.calling_ae or '-'}{guard}  {s.series_description or ''}".rstrip()
            )
    lines.extend(job.line() for job in report.jobs)
    for d in report.dispatches:
        problem = f"  error: {d.error.splitlines()[0][:120]}" if d.error else ""
        commitment = f"  commitment {d.commitment}" if d.commitment else ""
        lines.append(
            f"dispatch {d.id:>5}  job {d.job_id} -> {d.destination:<12} {d.state:<9} "
            f"attempts {d.attempts}  {d.status or ''}{commitment}{problem}".rstrip()
        )
    for f in report.fetches:
        problem = f"  error: {f.error.splitlines()[0][:120]}" if f.error else ""
        what = f"priors of {f.prior_of}" if f.prior_of else ", ".join(sorted(f.query))
        lines.append(
            f"fetch {f.id:>5}  {f.source:<12} {f.state:<9} attempts {f.attempts}  {what}: "
            f"{len(f.studies)} studies, {f.instances} instances{problem}"
        )
    for n in report.notifications:
        problem = f"  error: {n.error.splitlines()[0][:120]}" if n.error else ""
        lines.append(
            f"notification {n.id:>5}  job {n.job_id} {n.event:<8} -> {n.target:<12} {n.state:<9} "
            f"attempts {n.attempts}  {n.status or ''}{problem}".rstrip()
        )
    for pipeline in report.pipelines:
        state = "ready" if pipeline.available else f"UNAVAILABLE: {pipeline.problem}"
        lines.append(f"pipeline {pipeline.name} {pipeline.version}  {state}")
    for w in report.remote_workers:
        doing = f"job {w.job}" if w.job is not None else "idle"
        lines.append(
            f"remote worker {w.owner}  {', '.join(w.pipelines)} on {w.device or '?'}  {doing}, "
            f"seen {w.seen_at:%Y-%m-%d %H:%M:%S}"
        )
    for g in report.guards:
        lines.append(
            f"guard {g.pipeline}: reference of {g.reference_series} series "
            f"(fitted {g.fitted_at:%Y-%m-%d %H:%M}), threshold {g.threshold}: "
            f"{g.unlike} of {g.scored} scored series unlike it"
        )
    disk = report.disk
    if disk is not None and not disk.accepting:
        lines.append(
            f"disk: {disk.free_mb:.0f} MB free on {disk.path}, below storage.min_free_mb "
            f"({disk.min_free_mb:.0f}): associations are refused"
        )
    if report.rules is not None and report.rules.error:
        lines.append(
            f"routing rules INVALID (the node keeps the last good ones):\n{report.rules.error}"
        )
    if report.open_associations:
        lines.append(f"{len(report.open_associations)} open associations")
        for a in report.open_associations:
            lines.append(f"  {a.id}  {a.calling_ae} -> {a.called_ae}  since {a.opened_at:%H:%M:%S}")
    return "\n".join(lines)


def pipeline_statuses(settings: Settings) -> list[PipelineStatus]:
    """Every pipeline the node has, available or why not (no torch imported)."""
    return [
        PipelineStatus(
            name=name,
            version=found.version,
            available=found.problem is None,
            problem=found.problem,
        )
        for name, found in availability(settings.pipelines).items()
    ]
