"""The audit trail: who sent, processed, sent on, fetched or changed what, and when.

Rows are only ever appended. Each names the actor (an AE title, a token's name, a worker,
the node) and the study, and carries the event's facts as JSON: UIDs, counts, destinations,
states. Patient names and IDs are not copied in: the study UID leads to them.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, insert, select

from node.db.models import AuditEvent, utcnow

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


@dataclass(frozen=True)
class Event:
    id: int
    at: datetime
    kind: str
    actor: str
    study_instance_uid: str | None
    detail: dict[str, Any]


def record(
    target: Engine | Connection,
    kind: Kind,
    actor: str,
    study_uid: str | None = None,
    **detail: Any,
) -> None:
    """Append one event, in the caller's transaction when given a connection."""
    statement = insert(AuditEvent).values(
        at=utcnow(),
        kind=kind.value,
        actor=actor[:64],
        study_instance_uid=study_uid,
        detail=json.dumps(detail, default=str, sort_keys=True),
    )
    if isinstance(target, Connection):
        target.execute(statement)
        return
    with target.begin() as conn:
        conn.execute(statement)


def record_quietly(
    engine: Engine, kind: Kind, actor: str, study_uid: str | None, **detail: Any
) -> None:
    """`record`, where the work it describes is already done: a database that refuses the
    event is logged, and the work stands."""
    try:
        record(engine, kind, actor, study_uid, **detail)
    except Exception as exc:  # the database is down or locked
        log.error("audit event %s by %s not recorded: %s", kind, actor, exc)


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
    return [
        Event(
            row["id"],
            row["at"],
            row["kind"],
            row["actor"],
            row["study_instance_uid"],
            json.loads(row["detail"]),
        )
        for row in rows
    ]
