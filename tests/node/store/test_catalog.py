"""The catalog's writes on a real database (SQLite and PostgreSQL): a duplicate counts once,
new bytes under a known UID replace (and recount both series when it moves), a released
association stamps the series it delivered, stale associations are closed."""

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, insert, select

from node.ops.processes import association_holders
from node.store.catalog import HOST, Catalog, Receipt
from node.store.db.models import Association, Instance, Series, SeriesState
from tests.rows import T0, metadata, receive


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(Series.series_instance_uid, Series.instance_count)).all()
    return dict(rows)


def test_duplicate_counts_once(engine: Engine) -> None:
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT01", "AINODE", None)
    assert receive(catalog, 1, "a1", T0).new_instance
    assert not receive(catalog, 1, "a1", T0, changed=False).new_instance
    assert not receive(catalog, 1, "a1", T0, changed=True).new_instance
    assert counts(engine) == {"1.2.826.0.1.3680043.10.1.2": 1}


def test_new_bytes_moved_to_another_series_recount_both(engine: Engine) -> None:
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT01", "AINODE", None)
    receive(catalog, 1, "a1", T0)
    receive(catalog, 2, "a1", T0)
    first_uid = metadata(1).key.sop_instance_uid
    moved = metadata(1, series="1.2.826.0.1.3680043.10.1.3", sop_uid=first_uid)
    receipt = Receipt("a1", "CT01", "AINODE", "1.2.840.10008.1.2.1", 100, T0)
    recorded = catalog.record_instance(moved, receipt, content_changed=True, link=True)
    assert not recorded.new_instance
    assert counts(engine) == {"1.2.826.0.1.3680043.10.1.2": 1, "1.2.826.0.1.3680043.10.1.3": 1}
    with engine.connect() as conn:
        owner = conn.execute(
            select(Series.series_instance_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid == first_uid)
        ).scalar_one()
    assert owner == "1.2.826.0.1.3680043.10.1.3"


def test_a_release_stamps_the_series_it_delivered_an_abort_does_not(engine: Engine) -> None:
    catalog = Catalog(engine)
    for association in ("released", "aborted"):
        catalog.open_association(association, "CT01", "AINODE", "127.0.0.1")
    receive(catalog, 1, "released", T0)
    catalog.close_association("aborted", released=False, instances=0)
    with engine.connect() as conn:
        assert conn.execute(select(Series.released_at)).scalar_one() is None
    catalog.close_association("released", released=True, instances=1)
    with engine.connect() as conn:
        released_at, state = conn.execute(select(Series.released_at, Series.state)).one()
        closed = dict(conn.execute(select(Association.id, Association.released)).all())
    assert released_at is not None and state == SeriesState.RECEIVING
    assert closed == {"released": True, "aborted": False}


def test_stale_associations_of_dead_processes_are_closed(engine: Engine) -> None:
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT01", "AINODE", None)
    assert catalog.close_stale_associations([999_999_999]) == 0
    assert catalog.close_stale_associations() == 1
    assert catalog.close_stale_associations() == 0


def test_an_association_is_closed_once_its_process_or_its_host_is_gone(
    engine: Engine, tmp_path: Path
) -> None:
    """Trees on several hosts share the catalog: an edge that starts (and the coordinator,
    every minute) closes the associations of dead processes here and of hosts where no tree
    runs any more, never one a live process holds or a host just starting opened."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = datetime.now(UTC)
    live_table = tmp_path / ".processes-edge-live-pod-1.json"
    live_table.write_text('[{"name": "main", "pid": 1, "ready": true, "host": "live-pod"}]')
    rows = {
        "held-here": (HOST, os.getpid(), now),
        "dead-here": (HOST, gone.pid, now),
        "pid-reused": (HOST, os.getpid(), now - timedelta(days=365)),
        "old-row-dead": (None, gone.pid, now),
        "gone-pod": ("gone-pod", 7, now - timedelta(hours=1)),
        "live-pod": ("live-pod", 7, now - timedelta(hours=1)),
        "new-pod": ("new-pod", 7, now - timedelta(seconds=5)),
    }
    with engine.begin() as conn:
        conn.execute(
            insert(Association),
            [
                {"id": key, "calling_ae": "CT", "called_ae": "AINODE", "pid": pid, "host": host,
                 "opened_at": opened, "released": False, "instances_received": 0}
                for key, (host, pid, opened) in rows.items()
            ],
        )  # fmt: skip
    catalog = Catalog(engine)
    assert catalog.close_orphaned_associations(association_holders(tmp_path)) == 4
    with engine.connect() as conn:
        still_open = set(
            conn.execute(select(Association.id).where(Association.closed_at.is_(None))).scalars()
        )
    assert still_open == {"held-here", "live-pod", "new-pod"}
