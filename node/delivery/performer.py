"""The node as the performer of the UPS worklist (IHE AIW-I Task Performer): each workitem
asked of one of its pipelines is claimed once its input series are held and complete (the
study fetched first from `workitems.fetch_from` when the node lacks it), performed by the
ordinary jobs (one per input series, sent to the workitem's destinations), reported as the
jobs progress, and COMPLETED with the results in its Output Information Sequence, or CANCELED
with why (a job that failed, inputs that could not be fetched, a cancel request).

One loop in the coordinator; every change goes through `node.store.workitems`, so each has
its event report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, and_, or_, select

from node.config import Settings
from node.delivery.fetch.query import FetchQuery
from node.delivery.fetch.records import enqueue as enqueue_fetch
from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.ops.audit import WorkitemChanged, appender
from node.store import workitems
from node.store.db.models import (
    Fetch,
    Job,
    Series,
    SeriesState,
    Source,
    Study,
    WorkitemState,
    WorkState,
    utcnow,
)
from node.store.workitems import PRIORITIES, Audit, Performed, WorkitemError
from pipelines.codes import PRIVATE_SCHEME
from pipelines.registry import pipeline_names

log = logging.getLogger(__name__)

PRIORITY = dict(zip(PRIORITIES, (Priority.STAT, Priority.ROUTINE, Priority.LOW), strict=True))
ENDED = (WorkState.FAILED, WorkState.DEAD, WorkState.CANCELLED)


class Performer:
    """Performs the open workitems of the node's pipelines; `run_due` is its loop's step."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._ae = settings.node.ae_title
        self._jobs = JobQueue(engine)
        self._pipelines = pipeline_names(settings.pipelines)

    def run_due(self) -> int:
        """Advance every open workitem; how many changed."""
        changed = 0
        for item in workitems.performed_by(self._engine, self._ae, self._pipelines):
            try:
                step = self._start if item.state == WorkitemState.SCHEDULED else self._follow
                changed += step(item)
            except WorkitemError as exc:  # changed meanwhile (claimed, canceled): next round
                log.info("workitem %s: %s", item.uid, exc)
        return changed

    def _start(self, item: Performed) -> bool:
        """Claim a SCHEDULED workitem whose inputs are all here and complete."""
        if not item.ready:
            return False
        inputs = self._inputs(item)
        if inputs and all(state == SeriesState.COMPLETE for _, _, _, state in inputs):
            self._claim(item)
            self._queue_jobs(item, inputs)
            log.info("workitem %s claimed: %s on %d series", item.uid, item.pipeline, len(inputs))
            return True
        if inputs:
            return False  # still arriving
        return self._fetch(item)

    def _fetch(self, item: Performed) -> bool:
        """Ask `workitems.fetch_from` for the study; give the workitem up when that failed."""
        source = self._settings.workitems.fetch_from
        if source is None:
            return False  # it waits for the study to be sent
        if item.fetch_id is None:
            query = FetchQuery(study=item.study_instance_uid)
            fetch = enqueue_fetch(self._engine, source, query, self._settings.fetch.max_attempts)
            workitems.note_work(self._engine, item.uid, fetch=fetch)
            log.info(
                "workitem %s: fetching study %s from %s", item.uid, item.study_instance_uid, source
            )
            return True
        with self._engine.connect() as conn:
            fetched = conn.execute(
                select(Fetch.state, Fetch.error).where(Fetch.id == item.fetch_id)
            ).one_or_none()
        if fetched is None or fetched.state not in (*ENDED, WorkState.SUCCEEDED):
            return False
        # fetched, and still no input: the source does not hold it
        why = fetched.error or "it holds no such input"
        self._end(
            item, self._claim(item), WorkitemState.CANCELED, f"not fetched from {source}: {why}"
        )
        return True

    def _claim(self, item: Performed) -> str:
        """Take a SCHEDULED workitem (IN PROGRESS, this node its performer); its lock."""
        transaction = generate_uid()
        started = Dataset()
        performed = Dataset()
        performed.PerformedProcedureStepStartDateTime = _now()
        started.UnifiedProcedureStepPerformedProcedureSequence = [performed]
        workitems.change_state(
            self._engine,
            item.uid,
            WorkitemState.IN_PROGRESS,
            transaction,
            self._ae,
            started,
            self._audit(item, "claimed"),
        )
        return transaction

    def _follow(self, item: Performed) -> bool:
        """Report a claimed workitem's progress; complete or cancel it when its jobs end."""
        assert item.transaction_uid is not None
        if not item.jobs:  # claimed, then stopped before its jobs were queued
            self._queue_jobs(item, self._inputs(item))
            return True
        with self._engine.connect() as conn:
            jobs = conn.execute(
                select(Job.id, Job.state, Job.stage, Job.error, Job.result).where(
                    Job.id.in_(item.jobs)
                )
            ).all()
        if item.cancel_requested:
            for job in jobs:
                self._jobs.cancel(job.id)
            self._end(item, item.transaction_uid, WorkitemState.CANCELED, "canceled on request")
            return True
        ended = [job for job in jobs if job.state in ENDED]
        if ended:
            job = ended[0]
            reason = f"job {job.id} {job.state}: {(job.error or '').splitlines()[0][:200]}"
            self._end(item, item.transaction_uid, WorkitemState.CANCELED, reason)
            return True
        done = [job for job in jobs if job.state == WorkState.SUCCEEDED]
        if len(done) == len(jobs):
            root = self._settings.storage.path
            objects = [path for job in jobs for path in _results(job.result, root)]
            self._end(item, item.transaction_uid, WorkitemState.COMPLETED, None, objects)
            return True
        running = next((job for job in jobs if job.state == WorkState.RUNNING), None)
        stage = (running.stage or "running") if running else "queued"
        percent = int(100 * len(done) / len(jobs))
        return workitems.report_progress(
            self._engine, item.uid, percent, f"{item.pipeline}: {stage}"
        )

    def _inputs(self, item: Performed) -> list[tuple[int, int, str, SeriesState]]:
        """The input series held: (id, revision, UID, state); the study's CT series (not its
        localizers) when the workitem names none."""
        statement = (
            select(Series.id, Series.revision, Series.series_instance_uid, Series.state)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == item.study_instance_uid)
        )
        if item.series_instance_uids:
            statement = statement.where(Series.series_instance_uid.in_(item.series_instance_uids))
        else:
            statement = statement.where(
                and_(Series.modality == "CT", Series.source != Source.NODE),
                or_(Series.image_type.is_(None), Series.image_type.not_like("%LOCALIZER%")),
            )
        with self._engine.connect() as conn:
            rows = [tuple(row) for row in conn.execute(statement.order_by(Series.id))]
        if item.series_instance_uids and len(rows) < len(item.series_instance_uids):
            return []  # not all here yet
        return rows  # type: ignore[return-value]

    def _queue_jobs(self, item: Performed, inputs: list[tuple[int, int, str, SeriesState]]) -> None:
        priority = PRIORITY.get(item.priority, Priority.ROUTINE)
        ids = []
        for series_id, revision, series_uid, _ in inputs:
            request = JobRequest(
                series_uid, item.pipeline, tuple(item.destinations), priority,
                (f"workitem {item.uid}",),
            )  # fmt: skip
            created = self._jobs.enqueue(series_id, revision, [request])
            ids.extend(created or [self._existing_job(series_id, revision, item.pipeline)])
        workitems.note_work(self._engine, item.uid, jobs=ids)

    def _existing_job(self, series_id: int, revision: int, pipeline: str) -> int:
        """The job a rule already queued for the same series revision and pipeline."""
        with self._engine.connect() as conn:
            return int(
                conn.execute(
                    select(Job.id).where(
                        Job.series_id == series_id,
                        Job.revision == revision,
                        Job.pipeline == pipeline,
                    )
                ).scalar_one()
            )

    def _audit(self, item: Performed, action: Literal["claimed", "completed", "canceled"]) -> Audit:
        facts = WorkitemChanged(action=action, workitem=item.uid, pipeline=item.pipeline)
        return appender(self._ae, facts, item.study_instance_uid)

    def _end(
        self,
        item: Performed,
        transaction: str,
        state: WorkitemState,
        reason: str | None,
        objects: list[Path] | None = None,
    ) -> None:
        """COMPLETED with what was made, or CANCELED with why (PS3.4 CC.2.5.1.3.1)."""
        final = Dataset()
        performed = Dataset()
        scheduled = workitems.get(self._engine, item.uid)
        started = scheduled.get("UnifiedProcedureStepPerformedProcedureSequence") or [Dataset()]
        performed.PerformedProcedureStepStartDateTime = started[0].get(
            "PerformedProcedureStepStartDateTime"
        ) or _stamp(item)
        performed.PerformedProcedureStepEndDateTime = _now()
        performed.PerformedWorkitemCodeSequence = scheduled.get("ScheduledWorkitemCodeSequence", [])
        station = Dataset()
        station.CodeValue = self._ae
        station.CodingSchemeDesignator = PRIVATE_SCHEME
        station.CodeMeaning = f"ainode {self._ae}"
        performed.PerformedStationNameCodeSequence = [station]
        performed.ActualHumanPerformersSequence = []
        performed.OutputInformationSequence = _outputs(objects or [], self._ae)
        final.UnifiedProcedureStepPerformedProcedureSequence = [performed]
        if state == WorkitemState.CANCELED:
            final.ReasonForCancellation = (reason or "")[:1024]
            final.ProcedureStepCancellationDateTime = _now()
        audit = self._audit(item, "completed" if state == WorkitemState.COMPLETED else "canceled")
        workitems.change_state(self._engine, item.uid, state, transaction, self._ae, final, audit)
        log.log(
            logging.INFO if state == WorkitemState.COMPLETED else logging.WARNING,
            "workitem %s %s%s",
            item.uid,
            state,
            f": {reason}" if reason else "",
        )


def _results(summary: str | None, storage_root: Path) -> list[Path]:
    """A finished job's result files, where its summary says each is kept."""
    result = json.loads(summary or "{}")
    if result.get("files"):
        return [storage_root / path for path in result["files"]]
    return [Path(result.get("output", "")) / name for name in result.get("objects", [])]


def _outputs(objects: list[Path], ae_title: str) -> list[Dataset]:
    """One Output Information item per result series, naming its instances."""
    by_series: dict[tuple[str, str], list[Dataset]] = {}
    for path in objects:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, ValueError):
            continue
        reference = Dataset()
        reference.ReferencedSOPClassUID = header.SOPClassUID
        reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
        key = (str(header.StudyInstanceUID), str(header.SeriesInstanceUID))
        by_series.setdefault(key, []).append(reference)
    items = []
    for (study, series), references in by_series.items():
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID = study
        item.SeriesInstanceUID = series
        item.ReferencedSOPSequence = references
        item.RetrieveAETitle = ae_title
        items.append(item)
    return items


def _now() -> str:
    return utcnow().strftime("%Y%m%d%H%M%S")


def _stamp(item: Performed) -> str:
    return item.created_at.strftime("%Y%m%d%H%M%S")
