"""Bring a database to the newest schema with Alembic (`ainode serve` at start-up,
idempotent), or check that it is there (every other command)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
HEAD = "0022"
"""The newest migration's revision (a test checks it against Alembic's heads): a database
there is current without loading Alembic (a tenth of a second of every command)."""


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


class SchemaNotCurrent(RuntimeError):
    """The database is not at the newest migration (only `ainode serve` migrates)."""


class SchemaNewer(SchemaNotCurrent):
    """The database was migrated by a newer version: this one must not touch it."""


def upgrade(engine: Engine) -> None:
    """Apply every migration not yet applied; SchemaNewer for a database a newer version
    migrated (this one neither downgrades nor runs on it)."""
    from alembic import command

    with _one_migrator(engine):
        _refuse_newer(engine, _stored_revisions(engine))
        command.upgrade(alembic_config(engine), "head")


MIGRATION_LOCK = 0x41494E4F
"""PostgreSQL's advisory lock key that one migrating process holds ("AINO")."""


@contextlib.contextmanager
def _one_migrator(engine: Engine) -> Iterator[None]:
    """One process migrates at a time (roles started together would race to create the
    same tables): a PostgreSQL advisory lock, or a lock file beside a SQLite database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrating", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pending(engine: Engine) -> list[tuple[str, str]]:
    """(revision, what it does) of each migration not applied yet, oldest first;
    SchemaNewer for a database a newer version migrated."""
    from alembic.script import ScriptDirectory

    stored = _stored_revisions(engine)
    _refuse_newer(engine, stored)
    scripts = ScriptDirectory.from_config(alembic_config(engine))
    current = next(iter(stored), None)
    revisions = scripts.iterate_revisions("heads", current or "base")
    return [(r.revision, r.doc or "") for r in reversed(list(revisions)) if r.revision != current]


def _refuse_newer(engine: Engine, stored: set[str]) -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(engine))
    unknown = sorted(r for r in stored if r not in {s.revision for s in scripts.walk_revisions()})
    if unknown:
        raise SchemaNewer(
            f"the database schema is at {', '.join(unknown)}, newer than this version knows "
            f"(it needs {HEAD}): a newer ainode migrated it; run that version, or restore the "
            "backup taken before its upgrade"
        )


def require_current(engine: Engine) -> None:
    """Raise SchemaNotCurrent unless every migration has been applied: commands that only
    read or edit rows never change the schema."""
    stored = _stored_revisions(engine)
    if stored == {HEAD}:
        return
    _refuse_newer(engine, stored)
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    heads = set(ScriptDirectory.from_config(alembic_config(engine)).get_heads())
    if current == heads:
        return
    if not current:
        raise SchemaNotCurrent(
            "the database has no tables yet: `ainode serve` creates them at its first start"
        )
    raise SchemaNotCurrent(
        f"the database schema is at {', '.join(sorted(current))}, this version needs "
        f"{', '.join(sorted(heads))}: start `ainode serve` once to migrate it"
    )


def _stored_revisions(engine: Engine) -> set[str]:
    """The revisions the database records (none where it has no version table yet)."""
    try:
        with engine.connect() as conn:
            return {
                str(row[0]) for row in conn.execute(text("SELECT version_num FROM alembic_version"))
            }
    except DBAPIError:
        return set()
