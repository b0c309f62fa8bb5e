"""Jobs announced as workitems (`workitems.announce`): each job the routing rules start is
also a UPS workitem, IN PROGRESS with the node as its performer, so a worklist subscriber
sees every AI task the node runs; the performer loop reports and completes it like a
requested one."""

from __future__ import annotations

import logging

from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from node.flow.routing.engine import JobRequest
from node.flow.routing.router import JobSink
from node.ops.audit import WorkitemChanged, appender
from node.store import workitems
from node.store.db.models import Job, Series, Study, utcnow
from node.store.workitems import PRIORITIES, NewWorkitem, WorkitemError
from pipelines.codes import PRIVATE_SCHEME

log = logging.getLogger(__name__)


class AnnouncedJobs:
    """A `JobSink` that announces each job it creates as a workitem."""

    def __init__(self, queue: JobSink, engine: Engine, ae_title: str) -> None:
        self._queue = queue
        self._engine = engine
        self._ae = ae_title

    def enqueue(self, series_id: int, revision: int, requests: list[JobRequest]) -> list[int]:
        created = self._queue.enqueue(series_id, revision, requests)
        for job_id in created:
            try:
                self._announce(job_id)
            except WorkitemError as exc:  # announced before a crash: it exists
                log.info("job %d: %s", job_id, exc)
        return created

    def _announce(self, job_id: int) -> None:
        with self._engine.connect() as conn:
            job = conn.execute(
                select(
                    Job.pipeline,
                    Job.priority,
                    Job.destinations,
                    Series.series_instance_uid,
                    Study.study_instance_uid,
                    Study.patient_name,
                    Study.patient_id,
                )
                .join(Series, Series.id == Job.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Job.id == job_id)
            ).one()
        uid = generate_uid(entropy_srcs=[self._ae, "job-workitem", str(job_id)])
        dataset = Dataset()
        dataset.PatientName = job.patient_name or ""
        dataset.PatientID = job.patient_id or ""
        dataset.ScheduledProcedureStepPriority = PRIORITIES[min(job.priority, 2)]
        dataset.ProcedureStepLabel = job.pipeline
        dataset.WorklistLabel = self._ae
        dataset.ScheduledProcedureStepStartDateTime = utcnow().strftime("%Y%m%d%H%M%S")
        task = Dataset()
        task.CodeValue = job.pipeline
        task.CodingSchemeDesignator = PRIVATE_SCHEME
        task.CodeMeaning = f"ainode pipeline {job.pipeline}"
        dataset.ScheduledWorkitemCodeSequence = [task]
        source = Dataset()
        source.TypeOfInstances = "DICOM"
        source.StudyInstanceUID = job.study_instance_uid
        source.SeriesInstanceUID = job.series_instance_uid
        source.RetrieveAETitle = self._ae
        dataset.InputInformationSequence = [source]
        dataset.InputReadinessState = "READY"
        new = NewWorkitem(
            uid,
            job.pipeline,
            job.study_instance_uid,
            (job.series_instance_uid,),
            tuple(job.destinations),
            dataset,
        )
        facts = WorkitemChanged(action="created", workitem=uid, pipeline=job.pipeline)
        audit = appender(self._ae, facts, job.study_instance_uid)
        workitems.create(self._engine, new, claim=(self._ae, generate_uid()), audit=audit)
        workitems.note_work(self._engine, uid, jobs=[job_id])
