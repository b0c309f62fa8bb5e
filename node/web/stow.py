"""STOW-RS (PS3.18 10.5): instances posted as multipart/related, streamed part by part into
the same intake as C-STORE. A request counts like an association: its instances are recorded
under it, and its clean end is the release signal series completion waits for.

The answer is the Store Instances Response: 200 when every instance was stored, 202 when some
were, 409 when none was; a body that is not a multipart/related message of DICOM parts gets a
4xx and stores nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import uuid
from dataclasses import dataclass
from functools import cache, partial
from typing import Annotated

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydicom import Dataset
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool

from node.edge.status import Status
from node.ingest.intake import Answer, Delivery, Sender
from node.ingest.metadata import InstanceMetadata
from node.ingest.part10 import read_part10
from node.ops.metrics import INSTANCES
from node.roles import Role
from node.store.db.models import Source
from node.store.storage import FileRegion
from node.web.auth import Principal
from node.web.context import Context, WebContext, requires, retrieve_url
from node.web.dicom_json import dicom_json_response, dicom_xml_response, wants_xml
from node.web.multipart import BadBody, Part, PartReader, media_type

log = logging.getLogger(__name__)

router = APIRouter()
DICOM = "application/dicom"
IN_FLIGHT = 4


@dataclass(frozen=True)
class PartOutcome:
    """One part's status and the UIDs the response names (never the instance itself: a
    request's outcomes must not hold its bytes)."""

    status: Status
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""

    @classmethod
    def of(cls, answer: Answer, sop_class_uid: str, sop_instance_uid: str) -> PartOutcome:
        meta = answer.meta
        if meta is None:
            return cls(answer.status, sop_class_uid, sop_instance_uid)
        key = meta.key
        return cls(
            answer.status, meta.sop_class_uid, key.sop_instance_uid, key.study_uid, key.series_uid
        )


@router.post("/studies", response_class=Response)
@router.post("/studies/{study}", response_class=Response)
async def store_instances(
    request: Request,
    principal: Annotated[Principal, Depends(requires(Role.SENDER))],
    context: Context,
    study: str | None = None,
) -> Response:
    boundary = _boundary(request.headers.get("content-type"))
    limit = context.http.max_request_mb << 20
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, detail=f"the body exceeds http.max_request_mb ({limit >> 20})")
    sender = Sender(
        uuid.uuid4().hex,
        principal.name,
        context.settings.node.ae_title,
        request.client.host if request.client else None,
        Source.DICOMWEB,
    )
    delivery = Delivery(sender)
    reader = PartReader(boundary, context.settings.node.max_instance_mb << 20, context.store.spool)
    storing = _Storing(context, delivery, study)
    received, whole = 0, False
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(
                    413, detail=f"the body exceeds http.max_request_mb ({limit >> 20})"
                )
            for part in reader.feed(chunk):
                await storing.add(part)
        reader.finish()
        whole = True
    except BadBody as exc:
        log.warning("%s from %s: %s", sender.label, sender.calling_ae, exc)
        raise HTTPException(400, detail=f"{exc}; the whole instances before it were kept") from exc
    finally:
        reader.close()
        outcomes = await storing.finish()
        await run_in_threadpool(context.intake.close, delivery, whole)
    if not outcomes:
        raise HTTPException(400, detail="the body holds no part")
    return _response(outcomes, context.base_url(request), request.headers.get("accept"))


@cache
def _limiter() -> CapacityLimiter:
    """Stores at once in this process, whatever the number of requests (more only contend)."""
    return CapacityLimiter(IN_FLIGHT)


class _Storing:
    """Parts stored while the next ones arrive: up to `IN_FLIGHT` at once, in threads (fsync
    and the database wait there), so one client's request is stored as fast as several
    associations; `IN_FLIGHT` in the whole process too. The first part is stored alone: it
    records the request."""

    def __init__(self, context: WebContext, delivery: Delivery, study: str | None) -> None:
        self._store = partial(_store_part, context, delivery, study=study)
        self._tasks: list[asyncio.Future[PartOutcome]] = []

    async def add(self, part: Part) -> None:
        task = asyncio.ensure_future(to_thread.run_sync(self._store, part, limiter=_limiter()))
        self._tasks.append(task)
        if len(self._tasks) == 1:
            await asyncio.wait([task])
        running = [t for t in self._tasks if not t.done()]
        if len(running) >= IN_FLIGHT:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    async def finish(self) -> list[PartOutcome]:
        """Every part's outcome, in the order of the parts (after all have finished)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return [task.result() for task in self._tasks]


def _boundary(content_type: str | None) -> str:
    kind, params = media_type(content_type)
    if kind != "multipart/related":
        raise HTTPException(
            415, detail='send multipart/related; type="application/dicom" (PS3.18 10.5)'
        )
    part_type = params.get("type", DICOM).lower()
    if part_type != DICOM:
        raise HTTPException(
            415, detail=f"parts of type {part_type} are not accepted: only application/dicom"
        )
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPException(400, detail="the Content-Type names no boundary")
    return boundary


def _store_part(
    context: WebContext, delivery: Delivery, part: Part, study: str | None
) -> PartOutcome:
    """Read, check and store one part (in a worker thread); its spool is closed after."""
    with part.file:
        kind = media_type(part.content_type or DICOM)[0]
        if kind != DICOM:
            return _refused(Status.CANNOT_UNDERSTAND, f"a part of type {kind}, not {DICOM}")
        if part.oversize:
            limit = context.settings.node.max_instance_mb
            return _refused(Status.OUT_OF_RESOURCES, f"larger than node.max_instance_mb ({limit})")
        if part.spool_error is not None:
            return _refused(Status.OUT_OF_RESOURCES, f"cannot be spooled: {part.spool_error}")
        if not part.size:
            return _refused(Status.CANNOT_UNDERSTAND, "an empty part")
        part.file.flush()
        mapped = mmap.mmap(part.file.fileno(), 0, access=mmap.ACCESS_READ)
        return _store_mapped(context, delivery, part, memoryview(mapped), study)


def _store_mapped(
    context: WebContext, delivery: Delivery, part: Part, data: memoryview, study: str | None
) -> PartOutcome:
    """Store a spooled part, read through `data` (a map of its file: the pages read are the
    headers, the dataset is copied file to file by the kernel)."""
    try:
        header = read_part10(data)
    except ValueError as exc:
        return _refused(Status.CANNOT_UNDERSTAND, str(exc))

    def check(meta: InstanceMetadata) -> Answer | None:
        return _contradiction(meta, header.sop_class_uid, header.sop_instance_uid, study)

    offset = header.dataset_offset
    spooled = FileRegion(part.file.fileno(), offset, part.size - offset)
    answer = context.intake.accept(delivery, data[offset:], header.transfer_syntax, check, spooled)
    return PartOutcome.of(answer, header.sop_class_uid, header.sop_instance_uid)


def _contradiction(
    meta: InstanceMetadata, meta_class: str, meta_instance: str, study: str | None
) -> Answer | None:
    """Why a readable instance is refused: another study than the URL's, a SOP class that is
    not a storage class, or a file meta group that names another instance."""
    if study is not None and meta.key.study_uid != study:
        return Answer(Status.STUDY_MISMATCH, f"of study {meta.key.study_uid}, not {study}")
    sop_class = UID(meta.sop_class_uid)
    if sop_class.type != "SOP Class" or not sop_class.keyword.endswith("Storage"):
        return Answer(Status.SOP_CLASS_NOT_SUPPORTED, f"{sop_class} is not a storage SOP class")
    if (meta_class and meta_class != meta.sop_class_uid) or (
        meta_instance and meta_instance != meta.key.sop_instance_uid
    ):
        return Answer(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "the file meta information names another SOP class or instance than the dataset",
        )
    return None


def _refused(status: Status, reason: str) -> PartOutcome:
    """A part refused before the intake sees it (not DICOM, too large)."""
    log.warning("STOW-RS part refused: %s", reason)
    INSTANCES.labels(Source.DICOMWEB.value, status.name.lower()).inc()
    return PartOutcome(status)


def _response(outcomes: list[PartOutcome], base_url: str, accept: str | None) -> Response:
    stored = [o for o in outcomes if o.status == Status.SUCCESS]
    failed = [o for o in outcomes if o.status != Status.SUCCESS]
    report = Dataset()
    studies = {o.study_uid for o in stored}
    if len(studies) == 1:
        report.RetrieveURL = retrieve_url(base_url, studies.pop())
    report.ReferencedSOPSequence = [_referenced(o, base_url) for o in stored]
    if failed:
        report.FailedSOPSequence = [_failed(o) for o in failed]
    status = 200 if not failed else 202 if stored else 409
    if wants_xml(accept):
        return dicom_xml_response(report, status)
    return dicom_json_response(report, status)


def _referenced(outcome: PartOutcome, base_url: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    item.RetrieveURL = retrieve_url(
        base_url, outcome.study_uid, outcome.series_uid, outcome.sop_instance_uid
    )
    return item


def _failed(outcome: PartOutcome) -> Dataset:
    item = Dataset()
    if outcome.sop_class_uid:
        item.ReferencedSOPClassUID = outcome.sop_class_uid
    if outcome.sop_instance_uid:
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    item.FailureReason = int(outcome.status)
    return item
