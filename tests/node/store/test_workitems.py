"""A workitem's change and its audit event commit together, on SQLite and PostgreSQL: the
trail never shows a claim before the creation it follows, nor a change that did not happen."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Connection, Engine

from node.ops.audit import WorkitemChanged, appender, list_events
from node.store import workitems
from node.store.db.models import WorkitemState
from node.store.workitems import NewWorkitem


def new_workitem() -> NewWorkitem:
    return NewWorkitem(generate_uid(), "echo", generate_uid(), (generate_uid(),), (), Dataset())


def refused(conn: Connection) -> None:
    """An audit event the database does not take (the disk filled mid-transaction)."""
    raise OSError("database or disk is full")


def test_each_change_is_audited_in_its_own_transaction_in_order(engine: Engine) -> None:
    new = new_workitem()
    created = WorkitemChanged(action="created", workitem=new.uid, pipeline="echo")
    workitems.create(engine, new, audit=appender("requester", created))
    claimed = appender("AINODE", WorkitemChanged(action="claimed", workitem=new.uid))
    transaction = generate_uid()
    workitems.change_state(
        engine, new.uid, WorkitemState.IN_PROGRESS, transaction, "AINODE", audit=claimed
    )
    trail = [(e.actor, e.detail["action"]) for e in reversed(list_events(engine))]
    assert trail == [("requester", "created"), ("AINODE", "claimed")]


def test_a_change_whose_audit_event_fails_does_not_happen(engine: Engine) -> None:
    new = new_workitem()
    with pytest.raises(OSError):
        workitems.create(engine, new, audit=refused)
    with pytest.raises(workitems.WorkitemError):
        workitems.get(engine, new.uid)

    workitems.create(engine, new)
    transaction = generate_uid()
    with pytest.raises(OSError):
        workitems.change_state(
            engine, new.uid, WorkitemState.IN_PROGRESS, transaction, "AINODE", audit=refused
        )
    assert workitems.get(engine, new.uid).ProcedureStepState == "SCHEDULED"
    with pytest.raises(OSError):
        workitems.request_cancel(engine, new.uid, "RIS", "wrong patient", audit=refused)
    assert workitems.get(engine, new.uid).ProcedureStepState == "SCHEDULED"
    assert list_events(engine) == []
