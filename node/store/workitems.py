"""The UPS worklist as the catalog keeps it (PS3.4 Annex CC): workitems and their state
machine (SCHEDULED -> IN PROGRESS -> COMPLETED | CANCELED, locked by the claimer's Transaction
UID), cancel requests, subscriptions, and the event reports each subscriber's channel reads in
order. Whoever changes a workitem (the HTTP door, the node performing it) goes through here, so
every change has its event."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom import Dataset
from sqlalchemy import Connection, Engine, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from node.store.db.models import (
    Workitem,
    WorkitemChannel,
    WorkitemEvent,
    WorkitemState,
    WorkitemSubscription,
    utcnow,
)

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
"""The UPS Push SOP Class: the SOP class of every workitem."""
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
"""The UPS Event SOP Class, under which event reports are sent."""
WORKLIST = "1.2.840.10008.5.1.4.34.5"
"""The well-known UID that names the whole worklist in a (global) subscription."""
FILTERED_WORKLIST = "1.2.840.10008.5.1.4.34.5.1"
Audit = Callable[[Connection], None]
"""Appends an audit event in the transaction of the change it describes."""
FINAL = (WorkitemState.COMPLETED, WorkitemState.CANCELED)
PRIORITIES = ("HIGH", "MEDIUM", "LOW")
"""Scheduled Procedure Step Priority, most urgent first (as jobs: stat, routine, low)."""
READINESS_TAG, PRIORITY_TAG = "00404041", "00741200"
"""Input Readiness State and Scheduled Procedure Step Priority, as DICOM JSON keys them."""


class EventType(enum.IntEnum):
    """Event Type IDs of UPS event reports (PS3.4 CC.2.4.2)."""

    STATE_REPORT = 1
    CANCEL_REQUESTED = 2
    PROGRESS_REPORT = 3
    SCP_STATUS_CHANGE = 4
    ASSIGNED = 5


class Refusal(enum.Enum):
    """Why a request cannot be done: the HTTP door answers 400, 404 or 409."""

    INVALID = 400
    NOT_FOUND = 404
    CONFLICT = 409


class WorkitemError(Exception):
    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True)
class NewWorkitem:
    """A workitem to create, checked: what the node acts on, and the dataset to keep."""

    uid: str
    pipeline: str
    study_instance_uid: str
    series_instance_uids: tuple[str, ...]
    destinations: tuple[str, ...]
    dataset: Dataset


def create(
    engine: Engine,
    new: NewWorkitem,
    claim: tuple[str, str] | None = None,
    audit: Audit | None = None,
) -> None:
    """Keep a new workitem, SCHEDULED, or with `claim` (performer, Transaction UID) IN
    PROGRESS already (a task the node announces as it starts it); CONFLICT when one with its
    UID exists. `audit` appends its audit event in the same transaction."""
    state = WorkitemState.SCHEDULED if claim is None else WorkitemState.IN_PROGRESS
    dataset = new.dataset
    dataset.SOPClassUID = UPS_PUSH
    dataset.SOPInstanceUID = new.uid
    dataset.ProcedureStepState = state.value
    try:
        with engine.begin() as conn:
            _insert_workitem(conn, new, dataset, state, claim)
            _report_state(conn, new.uid, dataset)
            _append(conn, audit)
    except IntegrityError as exc:  # its UID is taken (the table's unique constraint)
        raise WorkitemError(Refusal.CONFLICT, f"workitem {new.uid} exists") from exc


def _insert_workitem(
    conn: Connection,
    new: NewWorkitem,
    dataset: Dataset,
    state: WorkitemState,
    claim: tuple[str, str] | None,
) -> None:
    now = utcnow()
    conn.execute(
        insert(Workitem).values(
            sop_instance_uid=new.uid,
            state=state,
            performer=None if claim is None else claim[0],
            transaction_uid=None if claim is None else claim[1],
            pipeline=new.pipeline,
            study_instance_uid=new.study_instance_uid,
            series_instance_uids=list(new.series_instance_uids),
            destinations=list(new.destinations),
            jobs=[],
            cancel_requested=False,
            dataset=_json(dataset),
            created_at=now,
            updated_at=now,
        )
    )


def get(engine: Engine, uid: str) -> Dataset:
    """The workitem as a requester sees it (never its Transaction UID)."""
    with engine.connect() as conn:
        text = conn.execute(
            select(Workitem.dataset).where(Workitem.sop_instance_uid == uid)
        ).scalar_one_or_none()
    if text is None:
        raise WorkitemError(Refusal.NOT_FOUND, f"no workitem {uid}")
    return Dataset.from_json(text)


@dataclass(frozen=True)
class WorkitemQuery:
    """A search: states, and attribute paths (keywords, a sequence's items by a dot) with the
    value each must match (PS3.4 C.2.2.2: empty is universal, `*` and `?` wildcards, a
    backslash list of UIDs, a date or date-time range `from-to`)."""

    states: tuple[WorkitemState, ...] = ()
    keys: tuple[tuple[tuple[str, ...], str], ...] = ()


SEARCH_BATCH = 500


def search(engine: Engine, query: WorkitemQuery, limit: int, offset: int) -> list[Dataset]:
    """The matching workitems, oldest first. State, SOP Instance UID, the input study and
    the task are matched by the database; other keys on each workitem it selects."""
    statement = select(Workitem.id, Workitem.dataset).order_by(Workitem.id)
    if query.states:
        statement = statement.where(Workitem.state.in_(list(query.states)))
    others = []
    for path, value in query.keys:
        column = _COLUMNS.get(path)
        if column is not None and value and not _is_pattern(value):
            statement = statement.where(column.in_(value.split("\\")))
        else:
            others.append((path, value))
    found: list[Dataset] = []
    skipped, after = 0, 0
    with engine.connect() as conn:
        while len(found) < limit:
            rows = conn.execute(statement.where(Workitem.id > after).limit(SEARCH_BATCH)).all()
            if not rows:
                break
            after = rows[-1].id
            for row in rows:
                dataset = Dataset.from_json(row.dataset)
                if not all(_matches(dataset, path, value) for path, value in others):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                found.append(dataset)
                if len(found) == limit:
                    break
    return found


_COLUMNS: dict[tuple[str, ...], Any] = {
    ("SOPInstanceUID",): Workitem.sop_instance_uid,
    ("InputInformationSequence", "StudyInstanceUID"): Workitem.study_instance_uid,
    ("ScheduledWorkitemCodeSequence", "CodeValue"): Workitem.pipeline,
}
"""Keys the database matches (single values and UID lists)."""


def _is_pattern(value: str) -> bool:
    return "*" in value or "?" in value


def _matches(dataset: Dataset, path: tuple[str, ...], pattern: str) -> bool:
    """Whether an attribute on `path` has a value matching `pattern` (any item of a
    sequence on the way); an empty pattern matches anything, even no attribute."""
    if not pattern:
        return True
    keyword, rest = path[0], path[1:]
    if keyword not in dataset:
        return False
    element = dataset[keyword]
    if element.VR == "SQ":
        return bool(rest) and any(_matches(item, rest, pattern) for item in element.value)
    values = element.value if element.VM > 1 else [element.value]
    return any(_value_matches(str(value), pattern, element.VR) for value in values)


def _value_matches(value: str, pattern: str, vr: str) -> bool:
    if vr in ("DA", "DT", "TM") and "-" in pattern:
        low, _, high = pattern.partition("-")
        return (not low or value >= low) and (not high or value[: len(high)] <= high)
    if vr == "UI":
        return value in pattern.split("\\")
    if _is_pattern(pattern):
        flags = re.IGNORECASE if vr == "PN" else 0
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return re.fullmatch(regex, value, flags) is not None
    return value.lower() == pattern.lower() if vr == "PN" else value == pattern


def change_state(
    engine: Engine,
    uid: str,
    to: WorkitemState,
    transaction_uid: str,
    performer: str,
    final: Dataset | None = None,
    audit: Audit | None = None,
) -> None:
    """Claim a SCHEDULED workitem (IN PROGRESS, locked by `transaction_uid`), or complete or
    cancel one IN PROGRESS under the same lock (`final`'s attributes added: outputs, reason);
    CONFLICT for any other change (PS3.4 CC.2.1.2). `audit` appends its audit event in the
    same transaction."""
    with engine.begin() as conn:
        row = _locked(conn, uid)
        state = row["state"]
        if state in FINAL:
            raise WorkitemError(Refusal.CONFLICT, f"workitem {uid} is {state}: it changes no more")
        if to == WorkitemState.SCHEDULED:
            raise WorkitemError(Refusal.INVALID, "a workitem never goes back to SCHEDULED")
        if to == WorkitemState.IN_PROGRESS:
            if state != WorkitemState.SCHEDULED:
                raise WorkitemError(Refusal.CONFLICT, f"workitem {uid} is IN PROGRESS already")
        elif state == WorkitemState.SCHEDULED:
            raise WorkitemError(
                Refusal.CONFLICT,
                f"workitem {uid} is SCHEDULED: claim it first (IN PROGRESS), or request its "
                "cancellation",
            )
        elif transaction_uid != row["transaction_uid"]:
            raise WorkitemError(
                Refusal.CONFLICT, f"the Transaction UID is not the one workitem {uid} is locked by"
            )
        dataset = Dataset.from_json(row["dataset"])
        if final is not None:
            dataset.update(final)
        dataset.ProcedureStepState = to.value
        values: dict[str, Any] = {"state": to, "dataset": _json(dataset)}
        if to == WorkitemState.IN_PROGRESS:
            values |= {"transaction_uid": transaction_uid, "performer": performer}
        _save(conn, uid, values)
        _report_state(conn, uid, dataset)
        _append(conn, audit)


def set_attributes(engine: Engine, uid: str, changes: Dataset, transaction_uid: str | None) -> None:
    """Set attributes of a workitem not yet final: a SCHEDULED one by anyone, one IN PROGRESS
    only under its lock. A change of progress is reported."""
    with engine.begin() as conn:
        row = _locked(conn, uid)
        if row["state"] in FINAL:
            raise WorkitemError(Refusal.CONFLICT, f"workitem {uid} is {row['state']}: final")
        if row["state"] == WorkitemState.IN_PROGRESS and transaction_uid != row["transaction_uid"]:
            raise WorkitemError(
                Refusal.CONFLICT, f"workitem {uid} is IN PROGRESS: its Transaction UID is needed"
            )
        dataset = Dataset.from_json(row["dataset"])
        dataset.update(changes)
        _save(conn, uid, {"dataset": _json(dataset)})
        if "ProcedureStepProgressInformationSequence" in changes:
            _report_progress(conn, uid, changes)


def report_progress(engine: Engine, uid: str, percent: int, description: str) -> bool:
    """The performer's progress (reported once per change); False when it was reported."""
    label = f"{percent} {description}"[:64]
    with engine.begin() as conn:
        row = _locked(conn, uid)
        if row["progress"] == label or row["state"] != WorkitemState.IN_PROGRESS:
            return False
        progress = Dataset()
        item = Dataset()
        item.ProcedureStepProgress = percent
        item.ProcedureStepProgressDescription = description[:64]
        progress.ProcedureStepProgressInformationSequence = [item]
        dataset = Dataset.from_json(row["dataset"])
        dataset.update(progress)
        _save(conn, uid, {"dataset": _json(dataset), "progress": label})
        _report_progress(conn, uid, progress)
    return True


def request_cancel(
    engine: Engine, uid: str, requestor: str, reason: str | None, audit: Audit | None = None
) -> WorkitemState:
    """Ask for a workitem's cancellation: a SCHEDULED one is CANCELED at once, one IN
    PROGRESS is flagged for its performer (and the request reported); its state after.
    `audit` appends its audit event in the same transaction."""
    with engine.begin() as conn:
        row = _locked(conn, uid)
        if row["state"] in FINAL:
            raise WorkitemError(Refusal.CONFLICT, f"workitem {uid} is {row['state']} already")
        _append(conn, audit)
        dataset = Dataset.from_json(row["dataset"])
        if reason:
            dataset.ReasonForCancellation = reason[:1024]
        if row["state"] == WorkitemState.SCHEDULED:
            dataset.ProcedureStepState = WorkitemState.CANCELED.value
            dataset.ProcedureStepCancellationDateTime = utcnow().strftime("%Y%m%d%H%M%S")
            _save(conn, uid, {"state": WorkitemState.CANCELED, "dataset": _json(dataset)})
            _report_state(conn, uid, dataset)
            return WorkitemState.CANCELED
        _save(conn, uid, {"cancel_requested": True, "dataset": _json(dataset)})
        event = Dataset()
        event.RequestingAE = requestor[:16]
        if reason:
            event.ReasonForCancellation = reason[:1024]
        _report(conn, uid, EventType.CANCEL_REQUESTED, event)
        return WorkitemState.IN_PROGRESS


def subscribe(engine: Engine, ae_title: str, uid: str | None, deletion_lock: bool) -> None:
    """Subscribe `ae_title` to one workitem, or (None) to the worklist; it is sent the
    current state of each workitem it now follows, then every change."""
    with engine.begin() as conn:
        if uid is not None:
            _locked(conn, uid)
        since = conn.execute(select(func.coalesce(func.max(WorkitemEvent.id), 0))).scalar_one()
        existing = _subscription(ae_title, uid)
        conn.execute(delete(WorkitemSubscription).where(existing))
        conn.execute(
            insert(WorkitemSubscription).values(
                ae_title=ae_title,
                workitem_uid=uid,
                deletion_lock=deletion_lock,
                since_event=since,
                created_at=utcnow(),
            )
        )
        followed = select(Workitem.sop_instance_uid, Workitem.dataset)
        followed = (
            followed.where(Workitem.sop_instance_uid == uid)
            if uid is not None
            else followed.where(Workitem.state.not_in(FINAL)).order_by(Workitem.id)
        )
        for workitem_uid, text in conn.execute(followed).all():
            _report_state(conn, workitem_uid, Dataset.from_json(text), for_ae=ae_title)


def unsubscribe(engine: Engine, ae_title: str, uid: str | None) -> bool:
    """End a subscription (from the worklist: every one of the AE's); False if none."""
    with engine.begin() as conn:
        which = (
            WorkitemSubscription.ae_title == ae_title
            if uid is None
            else _subscription(ae_title, uid)
        )
        return bool(conn.execute(delete(WorkitemSubscription).where(which)).rowcount)


def suspend(engine: Engine, ae_title: str) -> bool:
    """Suspend a worklist subscription: the AE keeps following the workitems it followed
    through it, and no new one; False when it has none."""
    with engine.begin() as conn:
        worklist = (
            conn.execute(select(WorkitemSubscription).where(_subscription(ae_title, None)))
            .mappings()
            .first()
        )
        if worklist is None:
            return False
        followed = set(
            conn.execute(
                select(WorkitemSubscription.workitem_uid).where(
                    WorkitemSubscription.ae_title == ae_title
                )
            ).scalars()
        )
        open_items = conn.execute(
            select(Workitem.sop_instance_uid).where(Workitem.state.not_in(FINAL))
        ).scalars()
        for uid in open_items:
            if uid not in followed:
                conn.execute(
                    insert(WorkitemSubscription).values(
                        ae_title=ae_title,
                        workitem_uid=uid,
                        deletion_lock=worklist["deletion_lock"],
                        since_event=worklist["since_event"],
                        created_at=utcnow(),
                    )
                )
        conn.execute(delete(WorkitemSubscription).where(_subscription(ae_title, None)))
        return True


def subscribed(engine: Engine, ae_title: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(
            select(exists().where(WorkitemSubscription.ae_title == ae_title))
        ).scalar_one()


@dataclass(frozen=True)
class Delivery:
    """An event report for a channel: its position and its DICOM JSON."""

    id: int
    report: dict[str, Any]


def pending_reports(engine: Engine, ae_title: str, limit: int = 100) -> list[Delivery]:
    """The event reports `ae_title`'s channel has not sent yet, in order."""
    with engine.connect() as conn:
        delivered = conn.execute(
            select(WorkitemChannel.delivered).where(WorkitemChannel.ae_title == ae_title)
        ).scalar_one_or_none()
        follows = exists().where(
            WorkitemSubscription.ae_title == ae_title,
            WorkitemEvent.id > WorkitemSubscription.since_event,
            or_(
                WorkitemSubscription.workitem_uid.is_(None),
                WorkitemSubscription.workitem_uid == WorkitemEvent.workitem_uid,
            ),
        )
        rows = conn.execute(
            select(WorkitemEvent.id, WorkitemEvent.report)
            .where(
                WorkitemEvent.id > (delivered or 0),
                or_(WorkitemEvent.for_ae.is_(None), WorkitemEvent.for_ae == ae_title),
                follows,
            )
            .order_by(WorkitemEvent.id)
            .limit(limit)
        ).all()
    return [Delivery(row.id, json.loads(row.report)) for row in rows]


def delivered(engine: Engine, ae_title: str, event_id: int) -> None:
    """Record that `ae_title`'s channel sent every report up to `event_id`."""
    now = utcnow()
    with engine.begin() as conn:
        changed = conn.execute(
            update(WorkitemChannel)
            .where(WorkitemChannel.ae_title == ae_title)
            .values(delivered=event_id, updated_at=now)
        ).rowcount
        if not changed:
            conn.execute(
                insert(WorkitemChannel).values(
                    ae_title=ae_title, delivered=event_id, updated_at=now
                )
            )


@dataclass(frozen=True)
class Performed:
    """A workitem the node performs, as its loop reads it."""

    uid: str
    state: WorkitemState
    transaction_uid: str | None
    pipeline: str
    study_instance_uid: str
    series_instance_uids: list[str]
    destinations: list[str]
    jobs: list[int]
    fetch_id: int | None
    cancel_requested: bool
    ready: bool
    """Its Input Readiness State is READY (its inputs may be used)."""
    priority: str
    """Its Scheduled Procedure Step Priority (HIGH, MEDIUM, LOW)."""
    created_at: datetime


def performed_by(engine: Engine, performer: str, pipelines: Iterable[str]) -> list[Performed]:
    """The open workitems of the node's pipelines: SCHEDULED ones it may claim, and those it
    claimed (as `performer`)."""
    statement = select(Workitem).where(
        Workitem.pipeline.in_(list(pipelines)),
        or_(
            Workitem.state == WorkitemState.SCHEDULED,
            and_(Workitem.state == WorkitemState.IN_PROGRESS, Workitem.performer == performer),
        ),
    )
    with engine.connect() as conn:
        rows = conn.execute(statement.order_by(Workitem.id)).mappings().all()
    return [
        Performed(
            row["sop_instance_uid"],
            row["state"],
            row["transaction_uid"],
            row["pipeline"],
            row["study_instance_uid"],
            list(row["series_instance_uids"]),
            list(row["destinations"]),
            [int(job) for job in row["jobs"]],
            row["fetch_id"],
            row["cancel_requested"],
            *_readiness_and_priority(row["dataset"]),
            row["created_at"],
        )
        for row in rows
    ]


def note_work(
    engine: Engine, uid: str, jobs: list[int] | None = None, fetch: int | None = None
) -> None:
    """Record the jobs (or the fetch) that perform a workitem."""
    values: dict[str, Any] = {}
    if jobs is not None:
        values["jobs"] = [str(job) for job in jobs]
    if fetch is not None:
        values["fetch_id"] = fetch
    with engine.begin() as conn:
        _save(conn, uid, values)


def _readiness_and_priority(dataset: str) -> tuple[bool, str]:
    content = json.loads(dataset)
    readiness = content.get(READINESS_TAG, {}).get("Value") or ["READY"]
    priority = content.get(PRIORITY_TAG, {}).get("Value") or ["MEDIUM"]
    return readiness[0] == "READY", str(priority[0])


def _append(conn: Connection, audit: Audit | None) -> None:
    if audit is not None:
        audit(conn)


def _locked(conn: Connection, uid: str) -> Any:
    statement = select(Workitem).where(Workitem.sop_instance_uid == uid)
    if conn.dialect.name == "postgresql":
        statement = statement.with_for_update()
    row = conn.execute(statement).mappings().first()
    if row is None:
        raise WorkitemError(Refusal.NOT_FOUND, f"no workitem {uid}")
    return row


def _save(conn: Connection, uid: str, values: dict[str, Any]) -> None:
    conn.execute(
        update(Workitem)
        .where(Workitem.sop_instance_uid == uid)
        .values(**values, updated_at=utcnow())
    )


def _subscription(ae_title: str, uid: str | None) -> Any:
    which = (
        WorkitemSubscription.workitem_uid.is_(None)
        if uid is None
        else WorkitemSubscription.workitem_uid == uid
    )
    return and_(WorkitemSubscription.ae_title == ae_title, which)


def _report_state(conn: Connection, uid: str, dataset: Dataset, for_ae: str | None = None) -> None:
    event = Dataset()
    event.ProcedureStepState = dataset.ProcedureStepState
    event.InputReadinessState = dataset.get("InputReadinessState", "READY")
    for keyword in ("ReasonForCancellation", "ProcedureStepDiscontinuationReasonCodeSequence"):
        if keyword in dataset and dataset.ProcedureStepState == WorkitemState.CANCELED.value:
            event[keyword] = dataset[keyword]
    _report(conn, uid, EventType.STATE_REPORT, event, for_ae)


def _report_progress(conn: Connection, uid: str, progress: Dataset) -> None:
    event = Dataset()
    event.ProcedureStepProgressInformationSequence = (
        progress.ProcedureStepProgressInformationSequence
    )
    _report(conn, uid, EventType.PROGRESS_REPORT, event)


def _report(
    conn: Connection, uid: str, kind: EventType, event: Dataset, for_ae: str | None = None
) -> None:
    """Keep an event report: the N-EVENT-REPORT's command elements and its information."""
    report = Dataset()
    report.AffectedSOPClassUID = UPS_EVENT
    report.AffectedSOPInstanceUID = uid
    report.EventTypeID = int(kind)
    report.update(event)
    conn.execute(
        insert(WorkitemEvent).values(
            workitem_uid=uid,
            event_type=int(kind),
            report=_json(report),
            for_ae=for_ae,
            at=utcnow(),
        )
    )


def _json(dataset: Dataset) -> str:
    return json.dumps(dataset.to_json_dict())
