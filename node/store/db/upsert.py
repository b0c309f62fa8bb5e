"""The one switch between SQLite's and PostgreSQL's INSERT ... ON CONFLICT (`insert_into`), and
the upsert built on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite

from node.store.db.models import Base


def insert_into(bind: Connection | Engine, model: type[Base]) -> sqlite.Insert | postgresql.Insert:
    """An INSERT into `model`'s table in `bind`'s dialect, which can say ON CONFLICT."""
    dialect = postgresql if bind.dialect.name == "postgresql" else sqlite
    return dialect.insert(model)


def upsert(
    conn: Connection, model: type[Base], row: Mapping[str, object], keys: Sequence[str]
) -> None:
    """Insert `row` into `model`'s table; where a row with the same `keys` (a unique
    constraint) exists, set its other columns to `row`'s."""
    insert = insert_into(conn, model).values(dict(row))
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=list(keys),
            set_={column: insert.excluded[column] for column in row if column not in keys},
        )
    )
