"""Prepared statements write what SQLAlchemy's own execution writes, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from node.store.db.models import Association
from node.store.db.prepared import PreparedStatement

OPENED = datetime(2026, 11, 22, 9, 30, 0, tzinfo=UTC)  # no microseconds: the format edge


def association(association_id: str) -> dict[str, object]:
    return {
        "id": association_id,
        "calling_ae": "CT01",
        "called_ae": "AINODE",
        "pid": 1,
        "opened_at": OPENED,
        "released": False,
        "instances_received": 0,
    }


def insert_association(engine: Engine) -> PreparedStatement:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(Association).on_conflict_do_nothing().returning(Association.id)
    return PreparedStatement(statement, engine.dialect, column_keys=list(association("x")))


def test_a_prepared_insert_reads_back_as_sqlalchemy_writes_it(engine: Engine) -> None:
    prepared = insert_association(engine)
    with engine.begin() as conn:
        first = prepared.first(conn, association("prepared"))
        again = prepared.first(conn, association("prepared"))
        conn.execute(insert(Association).values(association("core")))

    assert first == ("prepared",)
    assert again is None  # ON CONFLICT DO NOTHING returns no row
    with engine.connect() as conn:
        rows = dict(conn.execute(select(Association.id, Association.opened_at)).all())
        stored = conn.execute(
            select(Association.id).where(Association.opened_at == OPENED).order_by(Association.id)
        ).scalars()
        assert list(stored) == ["core", "prepared"]  # same encoding: one comparison finds both
    assert rows == {"core": OPENED, "prepared": OPENED}


def test_a_prepared_statement_refuses_values_it_has_no_place_for(engine: Engine) -> None:
    prepared = insert_association(engine)
    with engine.begin() as conn, pytest.raises(KeyError, match="colour"):
        prepared.first(conn, {**association("a"), "colour": "red"})
