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
from tests.peers import free_port


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


def test_a_database_a_newer_version_migrated_is_left_alone_with_the_reason(tmp_path) -> None:
    """Downgraded by mistake: `serve` refuses to start (no traceback), other commands say
    why, and the database keeps its schema."""
    import subprocess
    import sys

    import yaml

    from node.store.db.migrate import SchemaNewer

    url = f"sqlite:///{tmp_path / 'ainode.db'}"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    for refused in (upgrade, require_current):
        with pytest.raises(SchemaNewer, match="at 0099, newer than this version knows"):
            refused(engine)
    engine.dispose()

    config = tmp_path / "node.yaml"
    port = free_port()
    settings = {"node": {"accept_unknown_peers": True, "port": port}, "database": {"url": url}}
    settings["storage"] = {"path": str(tmp_path / "storage")}
    config.write_text(yaml.safe_dump(settings))
    served = subprocess.run(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert served.returncode == 1
    assert "not starting: the database schema is at 0099, newer" in served.stderr
    assert "Traceback" not in served.stderr
    status = subprocess.run(
        [sys.executable, "-m", "node", "status", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 2 and "run that version" in status.stderr
    with make_engine(url).connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0099"
