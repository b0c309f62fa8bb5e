"""Migrations build exactly the schema the models describe, on both backends; only
`ainode serve` migrates, other commands check."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine

from node.store.db.engine import make_engine
from node.store.db.migrate import SchemaNotCurrent, require_current, upgrade
from node.store.db.models import Base


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": False})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_require_current_names_what_is_missing(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ainode.db'}")
    with pytest.raises(SchemaNotCurrent, match="no tables yet"):
        require_current(engine)
    upgrade(engine)
    require_current(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0004'")
    with pytest.raises(SchemaNotCurrent, match=r"at 0004, this version needs 0\d{3}:"):
        require_current(engine)
    engine.dispose()


def test_the_head_a_command_checks_without_alembic_is_alembics_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from node.store.db.migrate import HEAD, MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD]
