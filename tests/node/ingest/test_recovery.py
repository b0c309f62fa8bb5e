"""Re-recording stored instances whose rows a power loss took (`node.ingest.recovery`).

A power loss cannot be produced here; what it leaves behind can: instance files on disk, flushed
before they were acknowledged, whose last commits are gone from the database.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, func, select

from node.ingest.metadata import InstanceMetadata
from node.ingest.recovery import (
    boot_marker,
    current_boot_id,
    recover_after_restart,
    rerecord_unrecorded,
)
from node.store.catalog import Catalog, Receipt
from node.store.db.models import Association, Instance, Series, utcnow
from node.store.storage import InstanceKey, InstanceStore
from tests.peers import NodeProcess, storescu, wait_until
from tests.phantoms import Geometry, sphere, write_series

SENDER_AE = "SCANNER1"


def store_series(store: InstanceStore, folder: Path, slices: int) -> list[InstanceKey]:
    """A phantom series written into the store as the SCP writes it (its sender in the meta)."""
    keys = []
    for path in write_series(
        folder, Geometry(rows=8, columns=8, slices=slices), sphere((0, 0, 0), 5, 0, -1000)
    ):
        ds = pydicom.dcmread(path)
        ds.file_meta.SourceApplicationEntityTitle = SENDER_AE
        ds.save_as(path, enforce_file_format=True)
        key = InstanceKey.validated(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        store.write(key, (path.read_bytes(),))
        keys.append(key)
    return keys


def record(catalog: Catalog, store: InstanceStore, keys: list[InstanceKey]) -> None:
    catalog.open_association("a" * 32, SENDER_AE, "AINODE", None)
    for key in keys:
        meta = InstanceMetadata.from_dataset(pydicom.dcmread(store.path_of(key)))
        receipt = Receipt("a" * 32, SENDER_AE, "AINODE", "1.2.840.10008.1.2.1", 1, utcnow())
        catalog.record_instance(meta, receipt, content_changed=True, link=True)


def series_counts(engine: Engine) -> dict[str, tuple[int, int, str | None]]:
    """Series UID -> (instance_count, rows, calling AE)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                Series.series_instance_uid,
                Series.instance_count,
                select(func.count()).where(Instance.series_id == Series.id).scalar_subquery(),
                Series.calling_ae,
            )
        ).all()
    return {uid: (count, instances, ae) for uid, count, instances, ae in rows}


def test_files_without_rows_are_recorded_again(engine: Engine, tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "storage")
    store.prepare()
    catalog = Catalog(engine)
    kept = store_series(store, tmp_path / "a", slices=6)
    lost = store_series(store, tmp_path / "b", slices=4)
    record(catalog, store, kept[:4])  # the last two of `kept` and all of `lost` rolled back
    broken = store.root / kept[0].study_uid / kept[0].series_uid / "1.2.3.4.dcm"
    broken.write_bytes(b"not DICOM")

    assert rerecord_unrecorded(engine, store, catalog, "AINODE") == 6

    counts = series_counts(engine)
    assert counts[kept[0].series_uid] == (6, 6, SENDER_AE)
    assert counts[lost[0].series_uid] == (4, 4, SENDER_AE)
    with engine.connect() as conn:
        released_association, closed_at, delivered = conn.execute(
            select(
                Association.released, Association.closed_at, Association.instances_received
            ).where(Association.calling_ae == "RECOVERY")
        ).one()
        released = conn.scalars(select(Series.released_at)).all()
        calling = set(conn.scalars(select(Instance.calling_ae)))
    assert released_association and closed_at is not None and delivered == 6
    assert all(at is not None for at in released), "both series may complete at once"
    assert calling == {SENDER_AE}
    assert broken.exists(), "an unreadable file is left for a person to look at"
    assert rerecord_unrecorded(engine, store, catalog, "AINODE") == 0


def test_the_check_runs_once_per_boot_and_only_on_sqlite(engine: Engine, tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "storage")
    store.prepare()
    catalog = Catalog(engine)
    keys = store_series(store, tmp_path / "a", slices=3)
    marker = boot_marker(engine)
    if engine.dialect.name != "sqlite":
        assert marker is None
        assert recover_after_restart(engine, store, catalog, "AINODE") is None
        return
    assert marker is not None and current_boot_id() is not None
    assert recover_after_restart(engine, store, catalog, "AINODE") == 3  # never checked
    assert marker.read_text().strip() == current_boot_id()
    with engine.begin() as conn:
        conn.execute(
            Instance.__table__.delete().where(Instance.sop_instance_uid == keys[0].sop_instance_uid)
        )
    assert recover_after_restart(engine, store, catalog, "AINODE") is None  # same boot
    marker.write_text("a-boot-before-a-power-loss\n")
    assert recover_after_restart(engine, store, catalog, "AINODE") == 1


@pytest.mark.slow
def test_node_restarted_after_a_power_loss_completes_every_stored_series(
    start_node: Callable[..., NodeProcess], real_series: dict[str, list[Path]]
) -> None:
    """Rows of the last commits are gone (as a power loss leaves a SQLite database in
    `synchronous=NORMAL`); the files are there. The restarted node records them again."""
    node = start_node(
        completion={"quiet_seconds": 2, "release_grace_seconds": 1}, workers={"count": 0}
    )
    covid, cap = real_series["covid"], real_series["cap"]
    storescu(node.port, covid + cap)
    uids = {
        name: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        for name, files in (("covid", covid), ("cap", cap))
    }
    wait_until(
        lambda: all(node.series().get(uid, {}).get("state") == "complete" for uid in uids.values()),
        30,
    )
    node.stop()

    database = node.settings["database"]["url"].removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        series_id = {
            uid: sid for sid, uid in db.execute("SELECT id, series_instance_uid FROM series")
        }
        cap_id, covid_id = series_id[uids["cap"]], series_id[uids["covid"]]
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM instances WHERE series_id = ?", (cap_id,))
        db.execute("DELETE FROM series WHERE id = ?", (cap_id,))
        tail = [
            row[0]
            for row in db.execute(
                "SELECT id FROM instances WHERE series_id = ? ORDER BY id DESC LIMIT 20",
                (covid_id,),
            )
        ]
        db.execute(f"DELETE FROM instances WHERE id IN ({','.join('?' * len(tail))})", tail)
        db.execute(
            "UPDATE series SET instance_count = instance_count - 20, state = 'receiving',"
            " completed_at = NULL WHERE id = ?",
            (covid_id,),
        )
    Path(f"{database}.boot-id").write_text("a-boot-before-a-power-loss\n")

    node.start()
    expected = {uids["covid"]: len(covid), uids["cap"]: len(cap)}

    def recovered() -> bool:
        series = node.series()
        return all(
            series.get(uid, {}).get("state") == "complete" and series[uid]["instances"] == count
            for uid, count in expected.items()
        )

    wait_until(recovered, timeout=60)
    assert (
        f"restart check: {len(covid) + len(cap)} stored instances, {20 + len(cap)} re-recorded"
        in node.log()
    )
    node.stop()
    checks = node.log().count("restart check")
    node.start()
    node.stop()
    assert node.log().count("restart check") == checks, "no second check in the same boot"


@pytest.mark.slow
def test_a_crashed_receivers_unrecorded_files_are_recorded_without_a_restart(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """A receiver killed between flushing a file and recording it leaves a whole instance that
    was never acknowledged. The moment cannot be hit on purpose; what it leaves can be made:
    files in the store, written while the receiver lived, without rows. Once the supervisor
    restarts the receiver, it records them; files from before it started are not its own."""
    from tests.node.test_service import receivers_up

    node = start_node(node={"receivers": 2}, workers={"count": 0}, completion={"quiet_seconds": 1})
    store = InstanceStore(node.storage)
    before = store_series(store, tmp_path / "before", slices=2)  # not written in its life
    [receiver] = wait_until(lambda: receivers_up(node, 1), timeout=30)
    for key in before:  # as if written long before the receiver started
        os.utime(store.path_of(key), (0, 0))
    orphans = store_series(store, tmp_path / "orphans", slices=3)
    os.kill(receiver, signal.SIGKILL)

    wait_until(lambda: "check after a receiver's crash" in node.log(), timeout=60)
    assert node.series()[orphans[0].series_uid]["instances"] == 3  # recorded, all of them
    assert wait_until(lambda: node.series()[orphans[0].series_uid]["state"] == "complete", 30)
    assert before[0].series_uid not in node.series()
    assert "check after a receiver's crash: 3 stored instances, 3 re-recorded" in node.log()
