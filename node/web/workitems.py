"""UPS-RS (PS3.18 11), the worklist of IHE AI Workflow for Imaging: a task requester (RIS,
PACS) creates a workitem naming the input study or series and the AI task (Scheduled Workitem
Code Sequence: a pipeline's name, scheme `99AINODE`); the node performs it
(`node.delivery.performer`), or another performer claims it; requesters and watchers follow it
by subscription, over a WebSocket channel of event reports.

Create, update, state changes and cancel requests need the `operator` role; reading,
searching, subscribing and the channel `reader`. A request that is not a valid workitem, or
not a valid change of its state, changes nothing and is answered 400, 404 or 409 with why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response, WebSocket
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.uid import generate_uid
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from node.config import Settings, check_ae_title
from node.ops.audit import WorkitemChanged, appender
from node.roles import Role
from node.store import workitems
from node.store.db.models import WorkitemState
from node.store.storage import InvalidUID, check_uid
from node.store.workitems import (
    FILTERED_WORKLIST,
    PRIORITIES,
    WORKLIST,
    NewWorkitem,
    WorkitemError,
    WorkitemQuery,
)
from node.web.auth import NotAuthenticated, Principal
from node.web.body import read_bounded
from node.web.context import Context, WebContext, requires
from node.web.dicom_json import dicom_json_response
from node.web.qido import keyword_of, paging, warning
from pipelines.codes import PRIVATE_SCHEME
from pipelines.registry import pipeline_names

log = logging.getLogger(__name__)

router = APIRouter()
MAX_BODY_BYTES = 1 << 20
MAX_RESULTS = 1000
CHANNEL_POLL_SECONDS = 0.2
READINESS = ("READY", "UNAVAILABLE", "INCOMPLETE")
REQUIRED = (
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "ScheduledProcedureStepStartDateTime",
    "ScheduledWorkitemCodeSequence",
    "InputInformationSequence",
    "InputReadinessState",
)
"""What a new workitem must carry (Type 1 of PS3.4 Table CC.2.5-3 that the node acts on)."""
CHANGES: dict[WorkitemState, Literal["claimed", "completed", "canceled"]] = {
    WorkitemState.IN_PROGRESS: "claimed",
    WorkitemState.COMPLETED: "completed",
    WorkitemState.CANCELED: "canceled",
}
"""The audit trail's word for each state a workitem is changed to."""
Operator = Annotated[Principal, Depends(requires(Role.OPERATOR))]
Reader = Annotated[Principal, Depends(requires(Role.READER))]


@router.post("/workitems", response_class=Response)
async def create_workitem(request: Request, context: Context, caller: Operator) -> Response:
    """Create Workitem (PS3.18 11.4): 201 with its URL; 409 when its UID exists."""
    dataset = await _body(request)
    new = checked(dataset, context.settings, request.query_params.get("workitem"))
    facts = WorkitemChanged(action="created", workitem=new.uid, pipeline=new.pipeline)
    audit = appender(caller.name, facts, new.study_instance_uid)
    await run_in_threadpool(_refusing, workitems.create, context.engine, new, None, audit)
    log.info("workitem %s created by %s: %s", new.uid, caller.name, new.pipeline)
    url = f"{context.base_url(request)}/workitems/{new.uid}"
    return Response(status_code=201, headers={"Location": url, "Content-Location": url})


@router.get("/workitems", response_class=Response)
async def search_workitems(request: Request, context: Context, caller: Reader) -> Response:
    """Search for Workitems (PS3.18 11.9): by any attribute (a sequence's by `Seq.Key`), with
    the matching of QIDO-RS; keys that are no attribute are not matched, and named in a
    Warning."""
    limit, offset = paging(request, MAX_RESULTS)
    query, ignored = _query(request.query_params.multi_items())
    found = await run_in_threadpool(workitems.search, context.engine, query, limit, offset)
    response = dicom_json_response(found)
    if ignored:
        names = ", ".join(sorted(ignored)[:10])
        response.headers["Warning"] = warning([f"not matched (unsupported keys): {names}"])
    return response


@router.get("/workitems/{uid}", response_class=Response)
async def retrieve_workitem(uid: str, context: Context, caller: Reader) -> Response:
    """Retrieve Workitem (PS3.18 11.5), without its Transaction UID."""
    dataset = await run_in_threadpool(_refusing, workitems.get, context.engine, _uid(uid))
    return dicom_json_response([dataset])


@router.post("/workitems/{uid}", response_class=Response)
async def update_workitem(
    uid: str, request: Request, context: Context, caller: Operator
) -> Response:
    """Update Workitem (PS3.18 11.6): attributes of a workitem not yet final; one IN
    PROGRESS under its Transaction UID (in the body)."""
    changes = await _body(request)
    fixed = {"SOPInstanceUID", "SOPClassUID", "ProcedureStepState"} & set(changes.dir())
    if fixed:
        raise HTTPException(400, detail=f"not changed by an update: {', '.join(sorted(fixed))}")
    transaction = str(changes.get("TransactionUID", "")) or None
    if "TransactionUID" in changes:
        del changes.TransactionUID
    await run_in_threadpool(
        _refusing, workitems.set_attributes, context.engine, _uid(uid), changes, transaction
    )
    return Response(status_code=200)


@router.put("/workitems/{uid}/state", response_class=Response)
@router.put("/workitems/{uid}/state/{performer}", response_class=Response)
async def change_state(
    uid: str, request: Request, context: Context, caller: Operator, performer: str | None = None
) -> Response:
    """Change Workitem State (PS3.18 11.7): claim with a new Transaction UID, then complete
    or cancel under it."""
    body = await _body(request)
    transaction = str(body.get("TransactionUID", "")).strip()
    state = str(body.get("ProcedureStepState", "")).strip()
    if not transaction or not state:
        raise HTTPException(400, detail="TransactionUID and ProcedureStepState are required")
    try:
        check_uid(transaction, "TransactionUID")
        to = WorkitemState(state)
    except (InvalidUID, ValueError) as exc:
        raise HTTPException(400, detail=f"not a state change: {str(exc)[:120]}") from exc
    who = _ae(performer) if performer else caller.name
    action = CHANGES.get(to)  # none for SCHEDULED, which the worklist refuses
    audit = appender(who, WorkitemChanged(action=action, workitem=uid)) if action else None
    await run_in_threadpool(
        _refusing,
        workitems.change_state,
        context.engine,
        _uid(uid),
        to,
        transaction,
        who,
        None,
        audit,
    )
    log.info("workitem %s: %s by %s", uid, to, who)
    return Response(status_code=200)


@router.post("/workitems/{uid}/cancelrequest", response_class=Response)
@router.post("/workitems/{uid}/cancelrequest/{requestor}", response_class=Response)
async def request_cancellation(
    uid: str, request: Request, context: Context, caller: Operator, requestor: str | None = None
) -> Response:
    """Request Cancellation (PS3.18 11.8): 202; a SCHEDULED workitem is canceled at once,
    one IN PROGRESS by its performer."""
    body = await _body(request, optional=True)
    reason = str(body.get("ReasonForCancellation", "")) or None
    who = _ae(requestor) if requestor else caller.name[:16]
    audit = appender(who, WorkitemChanged(action="cancel requested", workitem=uid))
    await run_in_threadpool(
        _refusing, workitems.request_cancel, context.engine, _uid(uid), who, reason, audit
    )
    return Response(status_code=202)


@router.post("/workitems/{uid}/subscribers/{ae_title}", response_class=Response)
async def subscribe(
    uid: str, ae_title: str, request: Request, context: Context, caller: Reader
) -> Response:
    """Subscribe (PS3.18 11.10) to a workitem or, by the well-known UID, to the worklist;
    201 with the channel's URL (the current state of each workitem followed comes first)."""
    target = _subscription_target(uid)
    lock = request.query_params.get("deletionlock", "false").lower() == "true"
    await run_in_threadpool(
        _refusing, workitems.subscribe, context.engine, _ae(ae_title), target, lock
    )
    channel = _channel_url(context, request, ae_title)
    return Response(status_code=201, headers={"Content-Location": channel})


@router.delete("/workitems/{uid}/subscribers/{ae_title}", response_class=Response)
async def unsubscribe(uid: str, ae_title: str, context: Context, caller: Reader) -> Response:
    """Unsubscribe (PS3.18 11.11); from the worklist, from every workitem as well."""
    target = _subscription_target(uid)
    ended = await run_in_threadpool(workitems.unsubscribe, context.engine, _ae(ae_title), target)
    if not ended:
        raise HTTPException(404, detail=f"{ae_title} has no such subscription")
    return Response(status_code=200)


@router.post("/workitems/{uid}/subscribers/{ae_title}/suspend", response_class=Response)
async def suspend(uid: str, ae_title: str, context: Context, caller: Reader) -> Response:
    """Suspend Global Subscription (PS3.18 11.12): the workitems followed stay followed."""
    if _subscription_target(uid) is not None:
        raise HTTPException(400, detail="only a worklist subscription is suspended")
    if not await run_in_threadpool(workitems.suspend, context.engine, _ae(ae_title)):
        raise HTTPException(404, detail=f"{ae_title} has no worklist subscription")
    return Response(status_code=200)


@router.websocket("/ws/subscribers/{ae_title}")
async def channel(websocket: WebSocket, ae_title: str) -> None:
    """The event channel of a subscriber (PS3.18 11.13): each event report as a DICOM JSON
    text message, in order; a reconnecting subscriber gets what it has not had."""
    context: WebContext = websocket.app.state.web
    host = websocket.headers.get("host")
    if not websocket.app.state.hosts.allows(host):  # the HTTP middleware sees no WebSocket
        log.warning("event channel refused: Host %r is not this node", host)
        await websocket.close(code=1008, reason="the Host header names no host of this node")
        return
    try:
        client = websocket.client.host if websocket.client else None
        caller = context.auth.authenticate(websocket.headers.get("authorization"), client)
    except NotAuthenticated:
        await websocket.close(code=1008, reason="a bearer token is required")
        return
    if not caller.may(Role.READER) or not _is_ae_title(ae_title):
        await websocket.close(code=1008, reason="not allowed")
        return
    await websocket.accept()
    engine = context.engine
    try:
        while True:
            reports = await run_in_threadpool(workitems.pending_reports, engine, ae_title)
            for report in reports:
                await websocket.send_text(json.dumps(report.report))
            if reports:
                await run_in_threadpool(workitems.delivered, engine, ae_title, reports[-1].id)
                continue
            try:  # wait for the next poll, or for the subscriber to leave
                message = await asyncio.wait_for(websocket.receive(), CHANNEL_POLL_SECONDS)
            except TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                return
    except WebSocketDisconnect:
        return


def checked(dataset: Dataset, settings: Settings, uid: str | None) -> NewWorkitem:
    """A new workitem as the node will keep it, or 400 with everything wrong with it."""
    problems = [f"{keyword} is missing" for keyword in REQUIRED if not dataset.get(keyword)]
    state = str(dataset.get("ProcedureStepState", "SCHEDULED"))
    if state != WorkitemState.SCHEDULED.value:
        problems.append(f"a new workitem is SCHEDULED, not {state[:20]}")
    if "TransactionUID" in dataset:
        problems.append("a new workitem carries no TransactionUID")
    if dataset.get("ScheduledProcedureStepPriority", "MEDIUM") not in PRIORITIES:
        problems.append(f"ScheduledProcedureStepPriority is one of {', '.join(PRIORITIES)}")
    if dataset.get("InputReadinessState", "READY") not in READINESS:
        problems.append(f"InputReadinessState is one of {', '.join(READINESS)}")
    pipeline = _task(dataset, settings, problems)
    study, series = _inputs(dataset, problems)
    destinations = _destinations(dataset, settings, problems)
    given = uid or str(dataset.get("SOPInstanceUID", "")) or generate_uid()
    try:
        given = check_uid(given, "the workitem's UID")
    except InvalidUID as exc:
        problems.append(str(exc))
    if problems:
        raise HTTPException(400, detail="not a valid workitem: " + "; ".join(problems))
    kept = Dataset()
    kept.update(dataset)
    kept.ScheduledProcedureStepPriority = dataset.ScheduledProcedureStepPriority
    kept.WorklistLabel = dataset.get("WorklistLabel") or settings.node.ae_title
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", "AdmittingDiagnosesDescription"):  # fmt: skip
        kept.setdefault(keyword, "")
    return NewWorkitem(given, pipeline, study, tuple(series), tuple(destinations), kept)


def _task(dataset: Dataset, settings: Settings, problems: list[str]) -> str:
    codes = dataset.get("ScheduledWorkitemCodeSequence") or []
    if len(codes) != 1:
        if codes:
            problems.append("ScheduledWorkitemCodeSequence holds one item")
        return ""
    code = codes[0]
    value, scheme = str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", ""))
    tasks = pipeline_names(settings.pipelines)
    if scheme != PRIVATE_SCHEME or value not in tasks:
        offered = ", ".join(sorted(tasks)) or "none"
        problems.append(
            f"unknown task ({value[:64]!r}, {scheme[:16]!r}): the tasks are the pipelines, "
            f"coding scheme {PRIVATE_SCHEME}: {offered}"
        )
    return value


def _inputs(dataset: Dataset, problems: list[str]) -> tuple[str, list[str]]:
    items = dataset.get("InputInformationSequence") or []
    studies = {str(item.get("StudyInstanceUID", "")) for item in items}
    if not items:
        return "", []
    if len(studies) != 1 or "" in studies:
        problems.append("InputInformationSequence names one study (StudyInstanceUID)")
        return "", []
    series = [str(item.SeriesInstanceUID) for item in items if item.get("SeriesInstanceUID")]
    try:
        study = check_uid(studies.pop(), "StudyInstanceUID")
        return study, [check_uid(uid, "SeriesInstanceUID") for uid in series]
    except InvalidUID as exc:
        problems.append(str(exc))
        return "", []


def _destinations(dataset: Dataset, settings: Settings, problems: list[str]) -> list[str]:
    names = {peer.ae_title: name for name, peer in settings.peers.items()}
    found = []
    for output in dataset.get("OutputDestinationSequence") or []:
        for storage in output.get("DICOMStorageSequence") or []:
            ae = str(storage.get("DestinationAE", "")).strip()
            if ae in names:
                found.append(names[ae])
            else:
                problems.append(f"output destination {ae[:16]!r} is not a configured peer")
    return found


async def _body(request: Request, optional: bool = False) -> Dataset:
    """The request's one dataset in DICOM JSON (400, 413 or 415 when it is not)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    too_large = f"a workitem is at most {MAX_BODY_BYTES >> 10} KiB"
    raw = await read_bounded(request, MAX_BODY_BYTES, too_large)
    if not raw and optional:
        return Dataset()
    if kind not in ("application/dicom+json", "application/json"):
        raise HTTPException(415, detail="send application/dicom+json")
    try:
        content: Any = json.loads(raw)
        if isinstance(content, list) and len(content) == 1:
            content = content[0]
        if not isinstance(content, dict):
            raise ValueError("not one dataset")
        return Dataset.from_json(content)
    except Exception as exc:  # whatever a malformed body provokes in the parser
        raise HTTPException(400, detail=f"not a DICOM JSON dataset: {str(exc)[:160]}") from exc


def _refusing(action: Any, *args: Any) -> Any:
    """Run a worklist change; its refusal as the HTTP answer that says why."""
    try:
        return action(*args)
    except WorkitemError as exc:
        raise HTTPException(exc.refusal.value, detail=str(exc)) from exc


def _uid(uid: str) -> str:
    try:
        return check_uid(uid, "the workitem's UID")
    except InvalidUID as exc:
        raise HTTPException(400, detail=str(exc)) from exc


def _ae(ae_title: str) -> str:
    try:
        return check_ae_title(ae_title)
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from exc


def _query(params: list[tuple[str, str]]) -> tuple[WorkitemQuery, set[str]]:
    """A search's states and attribute keys, and the parameters that are neither."""
    states: list[WorkitemState] = []
    keys: list[tuple[tuple[str, ...], str]] = []
    ignored: set[str] = set()
    for name, value in params:
        if name in ("limit", "offset", "includefield", "fuzzymatching"):
            continue
        path = tuple(_attribute(part) for part in name.split("."))
        if not all(path) or len(path) > 3:
            ignored.add(name)
        elif path == ("ProcedureStepState",):
            states.extend(_state(v) for v in value.split(",") if v.strip())
        else:
            keys.append((path, value.strip()))
    return WorkitemQuery(tuple(states), tuple(keys)), ignored


def _attribute(name: str) -> str:
    """A DICOM keyword, also when given as a tag (`00100020`); empty when it is neither."""
    found = keyword_of(name)
    return found if tag_for_keyword(found) is not None else ""


def _state(value: str) -> WorkitemState:
    try:
        return WorkitemState(value.strip())
    except ValueError as exc:
        known = ", ".join(state.value for state in WorkitemState)
        raise HTTPException(400, detail=f"ProcedureStepState is one of {known}") from exc


def _is_ae_title(ae_title: str) -> bool:
    try:
        check_ae_title(ae_title)
    except ValueError:
        return False
    return True


def _subscription_target(uid: str) -> str | None:
    if uid == FILTERED_WORKLIST:
        raise HTTPException(501, detail="filtered worklist subscriptions are not supported")
    return None if uid == WORKLIST else _uid(uid)


def _channel_url(context: WebContext, request: Request, ae_title: str) -> str:
    base = context.base_url(request)
    return re.sub(r"^http", "ws", base) + f"/ws/subscribers/{ae_title}"
