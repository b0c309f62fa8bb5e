"""`ainode upgrade` from the previous release's schema with data in it: the migrations are
listed, a backup is taken, the database is migrated; `ainode rollback` puts the previous
schema back with the data. Refused while a node runs. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pydicom
import pytest
import yaml
from alembic import command
from sqlalchemy import text

from node.store.db.engine import make_engine
from node.store.db.migrate import HEAD, alembic_config
from tests.peers import free_port, storescu, wait_until

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


PREVIOUS_RELEASE = "ec93671"
"""The last commit of the release before this one (schema 0016)."""


@pytest.mark.slow
def test_instances_the_previous_release_stored_are_kept_by_an_upgrade_and_a_rollback(
    database_url: str, real_series, tmp_path: Path
) -> None:
    """The previous release's own code receives a real series; this release upgrades its
    database and finds every instance, byte for byte; a rollback gives the previous release
    its schema and its series back."""
    repo = Path(__file__).resolve().parents[3]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", PREVIOUS_RELEASE, "node", "pipelines"],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(f"the previous release {PREVIOUS_RELEASE} is not in this clone's history")
    previous = tmp_path / "previous"
    previous.mkdir()
    subprocess.run(["tar", "-x", "-C", str(previous)], input=archive.stdout, check=True)
    files = real_series["covid"][:20]
    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port},
        "peers": {"modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104}},
        "database": {"url": database_url},
        "storage": {"path": str(tmp_path / "storage")},
        "workers": {"count": 0},
    }))  # fmt: skip
    old_code = {**os.environ, "PYTHONPATH": str(previous)}
    log = (tmp_path / "previous.log").open("w")
    serving = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        env=old_code, cwd=previous, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: _listening(port), 60)
        storescu(port, files)  # every one acknowledged by the previous release
    finally:
        serving.terminate()
        serving.wait(60)
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    before = {p.stem: p.read_bytes() for p in (tmp_path / "storage").glob("*/*/*.dcm")}

    upgraded = ainode("upgrade", "--config", config, "--backup", tmp_path / "backup")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "will apply 0017:" in upgraded.stdout and f"migrated to {HEAD}" in upgraded.stdout
    verified = ainode("verify", "--config", config, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    found = json.loads(verified.stdout)
    assert found["checked"] == len(files) and found["unhashed"] == len(files)  # older rows
    after = {p.stem: p.read_bytes() for p in (tmp_path / "storage").glob("*/*/*.dcm")}
    assert set(after) == sent and after == before  # byte for byte
    for path in files:  # what the modality sent: every attribute, the JPEG frames as sent
        original = pydicom.dcmread(path)
        kept = pydicom.dcmread(tmp_path / "storage" / _relative(original))
        assert kept == original

    rolled = ainode("rollback", "--config", config, tmp_path / "backup")
    assert rolled.returncode == 0, rolled.stderr
    status = subprocess.run(
        [sys.executable, "-m", "node", "status", "--config", str(config), "--json"],
        env=old_code, cwd=previous, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    (series,) = json.loads(status.stdout)["series"]
    assert series["instances"] == len(files)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _relative(ds: pydicom.Dataset) -> Path:
    return Path(ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")
