"""`ainode backup` while a modality sends, `ainode restore` into another node's new database
and empty storage: every instance stored when the store was copied is there, byte for byte
(those the catalog's copy lacks included), the restored node completes the series with them,
and `ainode verify` finds the store and the catalog in agreement. On SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.peers import ECHO_TO_PACS, free_port, node_settings, storescp, storescu, wait_until
from tests.phantoms import chest, chest_geometry, write_series


@pytest.fixture(params=["sqlite", "postgresql"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path):
    def make(name: str) -> str:
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / name / 'ainode.db'}"
        return request.getfixturevalue("postgres").new_database(f"t_{uuid.uuid4().hex[:12]}")

    return make


def ainode(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def stored(storage: Path) -> dict[str, bytes]:
    return {str(p.relative_to(storage)): p.read_bytes() for p in storage.glob("*/*/*.dcm")}


def test_a_backup_taken_during_a_send_restores_every_acknowledged_instance(
    start_node, new_database, real_series, tmp_path: Path
) -> None:
    files = real_series["lung-kernel"]
    node = start_node(database_url=new_database("first"), workers={"count": 0})
    sending = threading.Thread(target=storescu, args=(node.port, files))
    sending.start()
    wait_until(lambda: sum(s["instances"] for s in node.series().values()) >= 5, 60)
    backup = tmp_path / "backup"
    made = ainode("backup", "--config", node.config_path, backup)  # mid-send
    sending.join(120)
    assert made.returncode == 0, made.stderr
    assert not sending.is_alive()  # storescu succeeded: every file acknowledged
    node.stop()
    assert "hard-linked" in made.stdout and (backup / "config" / "config.yaml").exists()
    assert backup.stat().st_mode & 0o777 == 0o700  # patient data

    home = tmp_path / "elsewhere"
    settings = node_settings(home, free_port(), new_database("second"))
    config = home / "config.yaml"
    home.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump(settings))
    brought = ainode("restore", "--config", config, backup)
    assert brought.returncode == 0, brought.stderr
    again = ainode("restore", "--config", config, backup)
    assert again.returncode == 1 and "is not empty" in again.stderr  # never over a store

    original = stored(Path(node.settings["storage"]["path"]))
    assert len(original) == len(files)
    restored_files = stored(home / "storage")  # what had arrived when the store was copied
    assert len(restored_files) >= 5
    assert all(original[name] == data for name, data in restored_files.items())  # byte for byte
    restored = start_node(
        database_url=settings["database"]["url"],
        storage=settings["storage"],
        workers={"count": 0},
    )

    def complete() -> bool:
        series = list(restored.series().values())
        wanted = [("complete", len(restored_files))]
        return [(s["state"], s["instances"]) for s in series] == wanted

    wait_until(complete, 60)  # what arrived after the catalog's copy is recorded on start
    verified = restored.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_restored_node_runs_the_queued_jobs_and_sends_the_undelivered_results(
    start_node, new_database, tmp_path: Path
) -> None:
    """At backup time a result waits for a PACS that is down and a job is queued again; the
    backup restored on another machine (other paths) sends the one and runs the other, its
    results to the PACS too."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(ECHO_TO_PACS)
    pacs_port = free_port()
    pacs = {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
    peers = {"modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104}, "pacs": pacs}
    node = start_node(
        database_url=new_database("first"),
        workers={"count": 1}, peers=peers, routing={"rules_file": str(rules)},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
    )  # fmt: skip
    for name in ("ct-1", "ct-2"):
        storescu(node.port, write_series(tmp_path / name, chest_geometry(), chest()))

    def undelivered() -> list[dict] | None:
        dispatches = node.status()["dispatches"]
        waiting = len(dispatches) == 2 and all(d["state"] == "retrying" for d in dispatches)
        return dispatches if waiting else None

    waiting = wait_until(undelivered, 90)
    node.stop()
    rerun = max(job["id"] for job in node.status()["jobs"])
    assert node.cli("jobs", "retry", str(rerun)).returncode == 0  # queued again, offline
    backup = tmp_path / "backup"
    made = ainode("backup", "--config", node.config_path, backup)
    assert made.returncode == 0, made.stderr
    shutil.rmtree(node.settings["storage"]["path"])  # the first machine is gone

    home = tmp_path / "elsewhere"
    home.mkdir()
    settings = node_settings(home, free_port(), new_database("second"))
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    brought = ainode("restore", "--config", config, backup)
    assert brought.returncode == 0, brought.stderr
    received = tmp_path / "pacs"
    with storescp(pacs_port, received):
        restored = start_node(
            database_url=settings["database"]["url"], storage=settings["storage"],
            workers={"count": 1}, peers=peers, routing={"rules_file": str(rules)},
        )  # fmt: skip

        def delivered() -> list[dict] | None:
            status = restored.status()
            done = [j["state"] for j in status["jobs"]] == ["succeeded"] * 2
            sent = [d["state"] for d in status["dispatches"]] == ["succeeded"] * 2
            return status["dispatches"] if done and sent else None

        dispatches = wait_until(delivered, 90, interval=0.5)
        wait_until(lambda: len(list(received.iterdir())) == 2, 10)
    # the one that waited for the PACS, from its own files; the rerun job's, anew
    assert sorted(d["id"] for d in dispatches) == sorted(d["id"] for d in waiting)
    assert {pydicom.dcmread(sr).Modality for sr in received.iterdir()} == {"SR"}


def test_a_file_gone_by_its_turn_is_skipped_and_counted(tmp_path: Path) -> None:
    """Retention runs while a backup walks the store: a file it removes between the walk's
    listing and its link is skipped, not an error (a dangling link is such a file: listed,
    gone when linked)."""
    from node.admin.backup import _copy_tree

    store = tmp_path / "store"
    (store / "study" / "series").mkdir(parents=True)
    (store / "study" / "series" / "kept.dcm").write_bytes(b"kept")
    (store / "study" / "series" / "removed.dcm").symlink_to(store / "no-longer-there.dcm")
    copied = _copy_tree(store, tmp_path / "copy", tmp_path / "manifest.tsv")
    assert (copied.files, copied.linked, copied.vanished) == (1, 1, 1)
    assert (tmp_path / "copy" / "study" / "series" / "kept.dcm").read_bytes() == b"kept"
    assert (tmp_path / "manifest.tsv").read_text() == "study/series/kept.dcm\t4\n"
