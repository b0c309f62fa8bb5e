"""The worker API (`/api/v1/worker`): a worker on another host, with only the node's URL and a
`worker` token, claims a job of a pipeline it runs, renews its lease, reads the series by
WADO-RS, uploads its result objects and records the outcome, or the failure. The lease is the
local workers' (`flow/queue`): a worker that stops renewing has its job run again elsewhere,
and only the lease's holder records a result, once.

A lease is held by the token's name and the worker's (`<token>/<worker>`): no caller renews,
fails or completes another's. An uploaded object must be a result (SR, SEG, Secondary
Capture) of the job's study that references the job's series; it goes into the store as a
local worker's results do.
"""

from __future__ import annotations

import logging
import uuid
from functools import cache
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from sqlalchemy import Connection, Engine, select
from starlette.concurrency import run_in_threadpool

from node.edge.status import Status
from node.flow.queue import ClaimedJob, JobQueue
from node.ingest.intake import Delivery, Sender
from node.ingest.part10 import read_part10
from node.roles import Role
from node.store.db.models import Instance, Series, Source, Study, WorkState
from node.store.leased import RetryPolicy
from node.store.remote_workers import Sightings
from node.web.api import RowId
from node.web.auth import Principal
from node.web.body import read_bounded
from node.web.context import Context, WebContext, requires
from node.work.guard import series_score
from node.work.outcome import JobOutcome, OutcomeRecorder, audit_job_end
from node.work.protocol import NAME, ClaimRequest, Ended, Failure, Result, Stored, Work
from node.work.siblings import other_reconstructions

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/worker")
Caller = Annotated[Principal, Depends(requires(Role.WORKER))]
WorkerName = Annotated[str, Query(pattern=NAME, description="the worker's name")]
MAX_OBJECT_BYTES = 256 << 20
"""The largest result object a worker uploads (a SEG of a 1,000-slice series, uncompressed)."""
MAX_RESULT_BYTES = 8 << 20
"""The largest result record (summary, embedding and profile in JSON)."""
RESULT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}
"""What a worker may upload: results, never images a study could take for acquired ones."""


@router.post("/claim", response_model=Work, responses={204: {"description": "no job"}})
def claim(body: ClaimRequest, context: Context, caller: Caller) -> Work | Response:
    """The most urgent runnable job of one of the worker's pipelines, leased to it; 204 when
    there is none."""
    owner = _owner(caller, body.worker)
    _sightings(context.engine).claimed(owner, body.pipelines, body.device)
    lease = context.settings.workers.lease_seconds
    job = _queue(context).claim(owner, lease, body.pipelines)
    if job is None:
        return Response(status_code=204)
    log.info(
        "job %d: %s on series %s rev %d claimed by %s (%s)",
        job.id,
        job.pipeline,
        job.series_instance_uid,
        job.revision,
        owner,
        body.device or "device not said",
    )
    return _work(context, job, lease)


@router.put("/jobs/{job_id}/lease", status_code=204)
def renew(job_id: RowId, worker: WorkerName, context: Context, caller: Caller) -> Response:
    """Extend the lease by `workers.lease_seconds`; 409 when it is no longer the worker's."""
    owner = _owner(caller, worker)
    lease = context.settings.workers.lease_seconds
    if not _queue(context).leased.renew(job_id, owner, lease):
        raise HTTPException(409, detail=f"job {job_id} is not leased to {owner}")
    _sightings(context.engine).renewed(owner)
    return Response(status_code=204)


@router.post("/jobs/{job_id}/failure")
def fail(
    job_id: RowId, worker: WorkerName, body: Failure, context: Context, caller: Caller
) -> Ended:
    """The job failed: retried later, or not (`permanent`); 409 when not the worker's."""
    owner = _owner(caller, worker)
    job = _held(context, job_id, owner)
    state = _queue(context).fail(job_id, owner, body.detail, body.permanent)
    if state is None:
        raise HTTPException(409, detail=f"job {job_id} is not leased to {owner}")
    log.warning("job %d failed on %s (%s): %s", job_id, owner, state, body.detail[:200])
    audit_job_end(context.engine, context.settings, owner, job, str(state))
    return Ended(state=str(state))


@router.put("/jobs/{job_id}/objects", status_code=201)
async def upload(
    job_id: RowId, worker: WorkerName, request: Request, context: Context, caller: Caller
) -> Stored:
    """One result object (`application/dicom`, a Part 10 file) into the store."""
    owner = _owner(caller, worker)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/dicom":
        raise HTTPException(415, detail="send one object as application/dicom")
    too_large = f"an object is at most {MAX_OBJECT_BYTES >> 20} MiB"
    data = await read_bounded(request, MAX_OBJECT_BYTES, too_large)
    return await run_in_threadpool(_store, context, job_id, owner, data)


@router.post("/jobs/{job_id}/result")
async def complete(
    job_id: RowId, worker: WorkerName, request: Request, context: Context, caller: Caller
) -> Ended:
    """Record the job's success with the objects uploaded for it (dispatched as a local
    worker's are); 409 when the lease is no longer the worker's, 422 for an object it did not
    upload."""
    owner = _owner(caller, worker)
    too_large = f"a result is at most {MAX_RESULT_BYTES >> 20} MiB"
    raw = await read_bounded(request, MAX_RESULT_BYTES, too_large)
    try:
        body = Result.model_validate_json(raw)
    except ValidationError as exc:  # answered as FastAPI answers a body it validated
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from exc
    return await run_in_threadpool(_record, context, job_id, owner, body)


def _record(context: WebContext, job_id: int, owner: str, body: Result) -> Ended:
    job = _held(context, job_id, owner)
    with context.engine.connect() as conn:
        study = _study_of(conn, job)
        found = dict(
            conn.execute(
                select(Instance.sop_instance_uid, Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(
                    Study.study_instance_uid == study,
                    Instance.sop_instance_uid.in_(body.objects),
                    Series.source == Source.NODE,
                )
            ).all()
        )
    missing = [uid for uid in body.objects if uid not in found]
    if missing:
        raise HTTPException(422, detail=f"not uploaded for job {job_id}: {', '.join(missing[:5])}")
    root = context.settings.storage.path
    paths = [root / found[uid] for uid in body.objects]
    summary = body.summary.model_copy(update={"files": [found[uid] for uid in body.objects]})
    outcome = JobOutcome(
        job_id, owner, summary, paths, _vector(body.embedding), _vector(body.profile)
    )
    if not OutcomeRecorder.of(context.engine, context.settings).record(outcome):
        raise HTTPException(409, detail=f"job {job_id} is not leased to {owner}")
    log.info("job %d succeeded on %s", job_id, owner)
    audit_job_end(context.engine, context.settings, owner, job, "succeeded", summary, study)
    return Ended(state=str(WorkState.SUCCEEDED))


def _store(context: WebContext, job_id: int, owner: str, data: bytes) -> Stored:
    job = _held(context, job_id, owner)
    with context.engine.connect() as conn:
        study, instances = _study_of(conn, job), _instances(conn, job)
    try:
        header = read_part10(data)
        dataset = dcmread(DicomBytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # whatever a malformed file provokes in the parsers
        raise HTTPException(400, detail=f"not a DICOM Part 10 file: {str(exc)[:200]}") from exc
    problem = _not_a_result_of(dataset, study, job, instances)
    if problem:
        raise HTTPException(422, detail=problem)
    ae_title = context.settings.node.ae_title
    delivery = Delivery(Sender(uuid.uuid4().hex, ae_title, ae_title, None, Source.NODE))
    try:
        answer = context.intake.accept(
            delivery, data[header.dataset_offset :], header.transfer_syntax
        )
    finally:
        context.intake.close(delivery, released=True)
    if answer.status != Status.SUCCESS or answer.meta is None:
        raise HTTPException(503, detail=f"not stored: {answer.reason}")
    path = context.store.path_of(answer.meta.key)
    relative = str(path.relative_to(context.settings.storage.path))
    return Stored(sop_instance_uid=str(dataset.SOPInstanceUID), file=relative)


def _not_a_result_of(dataset: Any, study: str, job: ClaimedJob, instances: list[str]) -> str:
    """Why the dataset is not a result object of the job, or the empty string."""
    sop_class = str(dataset.get("SOPClassUID", ""))
    if sop_class not in RESULT_CLASSES:
        return f"SOP class {sop_class[:64]!r} is not a result (SR, SEG or Secondary Capture)"
    if str(dataset.get("StudyInstanceUID", "")) != study:
        return f"not of the job's study {study}"
    if str(dataset.get("SeriesInstanceUID", "")) == job.series_instance_uid:
        return "in the job's own series: a result goes in a series of its own"
    referenced = _references(dataset)
    if job.series_instance_uid in referenced or referenced & set(instances):
        return ""
    return f"references nothing of the job's series {job.series_instance_uid}"


def _references(dataset: Any, depth: int = 0) -> set[str]:
    """Every series and SOP instance UID the dataset's sequences name (six levels deep)."""
    found: set[str] = set()
    if depth > 6:
        return found
    for element in dataset:
        if element.VR != "SQ":
            continue
        for item in element.value:
            for keyword in ("SeriesInstanceUID", "ReferencedSOPInstanceUID"):
                if keyword in item:
                    found.add(str(item.get(keyword)))
            found |= _references(item, depth + 1)
    return found


def _owner(caller: Principal, worker: str) -> str:
    """Who holds the leases the caller takes: its credential's name and the worker's."""
    owner = f"{caller.name}/{worker}"
    if len(owner) > 64:
        raise HTTPException(
            403, detail="the credential's and the worker's names exceed 64 characters"
        )
    return owner


@cache
def _sightings(engine: Engine) -> Sightings:
    return Sightings(engine)


def _queue(context: WebContext) -> JobQueue:
    return JobQueue(context.engine, RetryPolicy.of(context.settings.workers))


def _held(context: WebContext, job_id: int, owner: str) -> ClaimedJob:
    """The job, if `owner` holds its lease (409 otherwise)."""
    job = _queue(context).held(job_id, owner)
    if job is None:
        raise HTTPException(409, detail=f"job {job_id} is not leased to {owner}")
    return job


def _study_of(conn: Connection, job: ClaimedJob) -> str:
    return str(
        conn.execute(
            select(Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .where(Series.id == job.series_id)
        ).scalar_one()
    )


def _instances(conn: Connection, job: ClaimedJob) -> list[str]:
    """The SOP Instance UIDs of the job's series revision."""
    return list(
        conn.execute(
            select(Instance.sop_instance_uid).where(
                Instance.series_id == job.series_id, Instance.revision <= job.revision
            )
        ).scalars()
    )


def _work(context: WebContext, job: ClaimedJob, lease: float) -> Work:
    with context.engine.connect() as conn:
        guard = series_score(conn, job.series_id, job.revision)
        study, instances = _study_of(conn, job), _instances(conn, job)
    siblings = other_reconstructions(context.engine, context.settings.storage.path, job.series_id)
    return Work(
        job=job.id,
        attempt=job.attempt,
        pipeline=job.pipeline,
        study_instance_uid=study,
        series_instance_uid=job.series_instance_uid,
        revision=job.revision,
        instances=instances,
        lease_seconds=lease,
        station=context.settings.node.ae_title,
        guard=guard,
        siblings=siblings,
    )


def _vector(values: list[float] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float32)
