"""`ainode upgrade` from the previous release's schema with data in it: the migrations are
listed, a backup is taken, the database is migrated; `ainode rollback` puts the previous
schema back with the data. Refused while a node runs. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from alembic import command
from sqlalchemy import text

from node.store.db.engine import make_engine
from node.store.db.migrate import HEAD, alembic_config
from tests.peers import free_port

PREVIOUS = "0014"
"""The schema of the release before this one."""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ainode.db'}"
    return request.getfixturevalue("postgres").new_database(f"t_{uuid.uuid4().hex[:12]}")


def ainode(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def schema_and_rows(url: str) -> tuple[str, list[str]]:
    engine = make_engine(url)
    with engine.connect() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        actors = list(conn.execute(text("SELECT actor FROM audit_events ORDER BY id")).scalars())
    engine.dispose()
    return revision, actors


def test_upgrade_backs_up_and_migrates_and_rollback_brings_the_previous_schema_back(
    database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    command.upgrade(alembic_config(engine), PREVIOUS)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_events (at, kind, actor, detail) "
                "VALUES (CURRENT_TIMESTAMP, 'admin', 'before-upgrade', '{}')"
            )
        )
    engine.dispose()
    config = tmp_path / "node.yaml"
    settings = {
        "node": {"accept_unknown_peers": True, "port": free_port()},
        "database": {"url": database_url},
        "storage": {"path": str(tmp_path / "storage")},
    }
    config.write_text(yaml.safe_dump(settings))
    backup = tmp_path / "before-upgrade"

    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / ".running").write_text(f"{os.getpid()}\n")  # a node runs
    refused = ainode("upgrade", "--config", config, "--backup", backup)
    assert refused.returncode == 1 and "stop it before upgrading" in refused.stderr
    (tmp_path / "storage" / ".running").unlink()

    upgraded = ainode("upgrade", "--config", config, "--backup", backup)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"will apply {HEAD}:" in upgraded.stdout and f"migrated to {HEAD}" in upgraded.stdout
    assert schema_and_rows(database_url) == (HEAD, ["before-upgrade"])
    again = ainode("upgrade", "--config", config, "--backup", tmp_path / "unused")
    assert again.returncode == 0 and "nothing to migrate" in again.stdout
    assert not (tmp_path / "unused").exists()

    rolled = ainode("rollback", "--config", config, backup)
    assert rolled.returncode == 0, rolled.stderr
    assert schema_and_rows(database_url) == (PREVIOUS, ["before-upgrade"])
    assert (tmp_path / "storage" / ".running").exists()  # its next start checks the store
