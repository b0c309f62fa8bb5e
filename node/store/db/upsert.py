"""Insert a row or, where its key exists, update it: the one upsert of SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from node.store.db.models import Base


def upsert(
    conn: Connection, model: type[Base], row: Mapping[str, object], keys: Sequence[str]
) -> None:
    """Insert `row` into `model`'s table; where a row with the same `keys` (a unique
    constraint) exists, set its other columns to `row`'s."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(model).values(dict(row))
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=list(keys),
            set_={column: insert.excluded[column] for column in row if column not in keys},
        )
    )
