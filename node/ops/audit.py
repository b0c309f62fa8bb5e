"""The audit trail: who sent, processed, sent on, fetched or changed what, and when.

Rows are only ever appended. Each names the actor (an AE title, a token's name, a worker,
the node) and the study, and carries the event's facts as JSON, one typed model per kind of
event: UIDs (always lists where an event may name several), counts, destinations, states.
Patient names and IDs are not copied in: the study UID leads to them.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from sqlalchemy import Connection, Engine, Select, insert, select

from node.store.db.models import AuditEvent, utcnow

log = logging.getLogger(__name__)


class Kind(enum.StrEnum):
    RECEIVED = "received"
    """Instances received in one association or STOW-RS request (or fetched)."""
    JOB = "job"
    """A job ended."""
    SENT = "sent"
    """Results delivered to a destination."""
    FETCHED = "fetched"
    ADMIN = "admin"
    """An action through the API or the command line."""
    APPLICATION = "application"
    """The node started or stopped."""
    PATIENT_RECORD = "patient record"
    """Patient identifiers shown through the API or the dashboard (PS3.15 Patient Record)."""
    QUERY = "query"
    """A peer's C-FIND answered (PS3.15 Query)."""
    RETRIEVE = "retrieve"
    """Instances a peer's C-MOVE or C-GET sent (PS3.15 DICOM Instances Transferred)."""
    COMMITMENT = "commitment"
    """A destination's storage commitment report on sent results."""
    WORKITEM = "workitem"
    """An AI task on the UPS worklist created, claimed, completed, canceled or asked to be
    (PS3.15 Procedure Record)."""


class Action(enum.StrEnum):
    """What an administrator did, through the API or the command line."""

    RETRY_JOB = "retry job"
    CANCEL_JOB = "cancel job"
    RESEND_DISPATCH = "resend dispatch"
    ROUTE_SERIES = "route series"
    QUEUE_FETCH = "queue fetch"
    RELOAD_RULES = "reload rules"
    REPLACE_RULES = "replace rules"
    FIT_GUARD = "guard-fit"

    @property
    def changes_configuration(self) -> bool:
        return self in (Action.RELOAD_RULES, Action.REPLACE_RULES, Action.FIT_GUARD)


def _as_list(value: object) -> object:
    """One UID where older rows kept a bare string: a list of one."""
    return [value] if isinstance(value, str) else value


class Facts(BaseModel):
    """The facts of one kind of event; `kind` says which."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: ClassVar[Kind]


class Received(Facts):
    kind = Kind.RECEIVED
    source: str
    exchange: str
    address: str | None
    instances: int
    """Accepted: stored now, or already held (`duplicates`)."""
    duplicates: int = 0
    """Already held: the same instance sent again (in this or another transfer syntax)."""
    conflicts: list[str] = []
    """Refused: another instance is stored under each of these SOP Instance UIDs."""
    studies: list[str]
    series: list[str]
    released: bool


class JobEnded(Facts):
    kind = Kind.JOB
    job: int
    pipeline: str
    series: list[str]
    revision: int
    state: str
    version: str | None = None
    positive: bool | None = None

    _series = field_validator("series", mode="before")(_as_list)


class Sent(Facts):
    kind = Kind.SENT
    destination: str
    dispatch: int
    sop_instances: list[str]
    """What the destination took (a destination that wants no key images gets none)."""
    status: str


class Committed(Facts):
    kind = Kind.COMMITMENT
    destination: str
    dispatch: int
    transaction_uid: str
    sop_instances: list[str]
    """What the destination committed."""
    failed: list[str] = []
    """Sent, and reported failed or not reported: the dispatch is sent again."""


class WorkitemChanged(Facts):
    kind = Kind.WORKITEM
    action: Literal["created", "claimed", "completed", "canceled", "cancel requested"]
    workitem: str
    pipeline: str | None = None


class Fetched(Facts):
    kind = Kind.FETCHED
    source: str
    fetch: int
    query: str
    studies: list[str]
    instances: int
    prior_of: str | None = None


class AdminAction(Facts):
    kind = Kind.ADMIN
    action: Action
    id: int | None = None
    before: str | None = None
    after: str | None = None
    series: list[str] = []
    revision: int | None = None
    pipeline: str | None = None
    profiles: int | None = None
    file: str | None = None
    backup: str | None = None

    _series = field_validator("series", mode="before")(_as_list)


class ApplicationEvent(Facts):
    kind = Kind.APPLICATION
    action: Literal["start", "stop"]


class PatientRecordRead(Facts):
    kind = Kind.PATIENT_RECORD
    route: str
    studies: int


class Queried(Facts):
    kind = Kind.QUERY
    level: str
    matches: int


class Retrieved(Facts):
    kind = Kind.RETRIEVE
    service: str
    """C-MOVE or C-GET."""
    level: str
    destination: str
    instances: int
    failed: int
    studies: list[str]


FACTS: dict[str, type[Facts]] = {
    model.kind.value: model
    for model in (
        Received,
        JobEnded,
        Sent,
        Committed,
        WorkitemChanged,
        Fetched,
        AdminAction,
        ApplicationEvent,
        PatientRecordRead,
        Queried,
        Retrieved,
    )
}


@dataclass(frozen=True)
class Event:
    id: int
    at: datetime
    kind: str
    actor: str
    study_instance_uid: str | None
    detail: dict[str, Any]
    """The facts as JSON (`ainode audit list --json`, `GET /api/v1/audit`)."""

    def line(self) -> str:
        """One line for people (`ainode audit list`)."""
        facts = ", ".join(f"{k}={v}" for k, v in sorted(self.detail.items()))
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.kind:<8} {self.actor:<16} {facts}"

    @cached_property
    def facts(self) -> Facts | None:
        """The typed facts; None for a row no model reads (written by another version)."""
        return _facts(self.kind, self.detail)


def record(
    target: Engine | Connection, actor: str, facts: Facts, study_uid: str | None = None
) -> None:
    """Append one event, in the caller's transaction when given a connection."""
    statement = insert(AuditEvent).values(
        at=utcnow(),
        kind=facts.kind.value,
        actor=actor[:64],
        study_instance_uid=study_uid,
        detail=facts.model_dump_json(),
    )
    if isinstance(target, Connection):
        target.execute(statement)
        return
    with target.begin() as conn:
        conn.execute(statement)


def appender(
    actor: str, facts: Facts, study_uid: str | None = None
) -> Callable[[Connection], None]:
    """`record` of one event, in the transaction of the change it describes."""
    return lambda conn: record(conn, actor, facts, study_uid)


def record_quietly(engine: Engine, actor: str, facts: Facts, study_uid: str | None = None) -> None:
    """`record`, where the work it describes is already done: a database that refuses the
    event is logged, and the work stands."""
    try:
        record(engine, actor, facts, study_uid)
    except Exception as exc:  # the database is down or locked
        log.error("audit event %s by %s not recorded: %s", facts.kind, actor, exc)


def list_events_after(engine: Engine, after_id: int, limit: int) -> list[Event]:
    """Oldest first, from the event after `after_id` (an export's position)."""
    statement = (
        select(AuditEvent).where(AuditEvent.id > after_id).order_by(AuditEvent.id).limit(limit)
    )
    return _events(engine, statement)


def list_events(engine: Engine, since: datetime | None = None, limit: int = 1000) -> list[Event]:
    """Newest first."""
    statement = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if since is not None:
        statement = statement.where(AuditEvent.at >= since)
    return _events(engine, statement)


def _events(engine: Engine, statement: Select[AuditEvent]) -> list[Event]:
    with engine.connect() as conn:
        rows = list(conn.execute(statement).mappings())
    return [_event(row) for row in rows]


def _event(row: Any) -> Event:
    detail = json.loads(row["detail"])
    facts = _facts(row["kind"], detail)
    return Event(
        row["id"],
        row["at"],
        row["kind"],
        row["actor"],
        row["study_instance_uid"],
        facts.model_dump(mode="json") if facts is not None else detail,
    )


def _facts(kind: str, detail: dict[str, Any]) -> Facts | None:
    model = FACTS.get(kind)
    if model is None:
        return None
    try:
        return model.model_validate(detail)
    except ValidationError as exc:
        log.warning("audit %s event's facts unreadable (%d errors)", kind, exc.error_count())
        return None
