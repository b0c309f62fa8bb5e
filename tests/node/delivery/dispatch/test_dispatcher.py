"""Dispatch outcomes on a real database: retried with backoff, dead after the last attempt,
failed at once when the destination has no address; delivered to a real storescp."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.uid import SecondaryCaptureImageStorage as SC
from sqlalchemy import Engine, select, update

from node.config import Settings
from node.delivery.dispatch.dispatcher import Dispatcher
from node.delivery.dispatch.records import list_dispatches
from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.ingest.metadata import InstanceMetadata
from node.store.catalog import Catalog, Receipt
from node.store.db.models import Dispatch, Notification, utcnow
from tests.peers import free_port, storescp
from tests.rows import finish


def succeeded_job(
    engine: Engine,
    destinations: tuple[str, ...],
    files: list[Path],
    attempts: int = 2,
    notify: tuple[str, ...] = (),
) -> None:
    """A series received from AE 'CT' and its job (its rule notifying `notify`) finished with
    `files` as its objects, each dispatch allowed `attempts`."""
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT", "AINODE", None)
    meta = InstanceMetadata.from_dataset(pydicom.dcmread(files[0], stop_before_pixels=True))
    receipt = Receipt("a1", "CT", "AINODE", "1.2.840.10008.1.2", 1, utcnow())
    recorded = catalog.record_instance(meta, receipt, content_changed=True, link=True)
    queue = JobQueue(engine)
    request = JobRequest("x", "echo", destinations, Priority.ROUTINE, ("r",), notify=notify)
    queue.enqueue(recorded.series_id, 1, [request])
    job = queue.claim("w", 30)
    assert job is not None
    assert finish(engine, job.id, objects=tuple(files), dispatch_attempts=attempts)


def settings(peer_port: int, known_origin: bool, **sections: object) -> Settings:
    peers = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": peer_port}}
    if known_origin:
        peers["ct"] = {"ae_title": "CT", "host": "127.0.0.1", "port": peer_port}
    return Settings.model_validate(
        {
            "peers": peers,
            "dispatch": {"retry_base_seconds": 0.05, "retry_max_seconds": 0.1},
            **sections,
        }
    )


def test_retry_then_dead_and_unknown_origin_fails(engine: Engine, real_series) -> None:
    files = real_series["lung-kernel"][:2]
    succeeded_job(engine, ("pacs", "origin"), files)
    dispatcher = Dispatcher(engine, settings(free_port(), known_origin=False))
    assert dispatcher.run_due() == 2
    states = {d.destination: d for d in list_dispatches(engine)}
    assert states["pacs"].state == "retrying" and states["pacs"].attempts == 1
    assert "no association with PACS@127.0.0.1" in states["pacs"].error
    assert states["origin"].state == "failed"
    assert states["origin"].error == "origin 'CT' is not a configured peer: no address"
    time.sleep(0.2)
    assert dispatcher.run_due() == 1
    (pacs,) = [d for d in list_dispatches(engine) if d.destination == "pacs"]
    assert pacs.state == "dead" and pacs.attempts == 2
    dispatcher.close()


def test_a_pacs_down_four_hours_gets_the_results_with_the_defaults(
    engine: Engine, real_series, tmp_path: Path
) -> None:
    """A night's maintenance window: the PACS refuses for four hours (each retry's wait is
    skipped by moving the clock on), then comes back and takes the results."""
    files = real_series["lung-kernel"][:2]
    port = free_port()
    config = Settings.model_validate(
        {"peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}}}
    )
    succeeded_job(engine, ("pacs",), files, attempts=config.dispatch.max_attempts)
    dispatcher = Dispatcher(engine, config)
    down = timedelta()
    while down < timedelta(hours=4):
        assert dispatcher.run_due() == 1
        (dispatch,) = list_dispatches(engine)
        assert dispatch.state == "retrying", (down, dispatch.attempts)
        with engine.begin() as conn:  # the clock moves on to the retry
            wait = conn.execute(select(Dispatch.run_after)).scalar_one() - utcnow()
            conn.execute(update(Dispatch).values(run_after=utcnow()))
        down += wait
    with storescp(port, tmp_path / "received"):
        assert dispatcher.run_due() == 1
    (dispatch,) = list_dispatches(engine)
    assert dispatch.state == "succeeded" and dispatch.attempts > 10
    assert len(list((tmp_path / "received").iterdir())) == 2
    dispatcher.close()


def test_a_dead_dispatch_tells_the_undelivered_targets(engine: Engine, real_series) -> None:
    files = real_series["lung-kernel"][:1]
    succeeded_job(engine, ("pacs",), files, attempts=1, notify=("ward", "quiet"))
    hooks = {
        "ward": {"url": "http://127.0.0.1:9/hook", "on": ["undelivered", "failed"]},
        "quiet": {"url": "http://127.0.0.1:9/hook", "on": ["positive"]},
    }
    dispatcher = Dispatcher(engine, settings(free_port(), False, notifications=hooks))
    assert dispatcher.run_due() == 1
    (dispatch,) = list_dispatches(engine)
    assert dispatch.state == "dead"
    with engine.connect() as conn:
        (told,) = conn.execute(
            select(Notification.target, Notification.event, Notification.payload)
        )
    assert (told.target, told.event) == ("ward", "undelivered")
    payload = json.loads(told.payload)
    assert payload["destination"] == "pacs" and payload["dispatch"] == dispatch.id
    assert "no association with PACS@127.0.0.1" in payload["error"]
    dispatcher.close()


def test_delivered_to_the_origin(engine: Engine, real_series, tmp_path: Path) -> None:
    files = real_series["lung-kernel"][:2]
    succeeded_job(engine, ("origin",), files)
    port = free_port()
    dispatcher = Dispatcher(engine, settings(port, known_origin=True))
    with storescp(port, tmp_path / "received"):
        assert dispatcher.run_due() == 1
    (dispatch,) = list_dispatches(engine)
    assert (dispatch.state, dispatch.status, dispatch.attempts) == ("succeeded", "2 of 2 stored", 1)
    assert len(list((tmp_path / "received").iterdir())) == 2
    assert dispatcher.requeue_interrupted() == 0
    dispatcher.close()


def test_the_audit_and_the_status_name_what_the_destination_took(
    engine: Engine, real_series, tmp_path: Path
) -> None:
    """A destination that wants no key images takes the other objects; the `sent` event and
    the dispatch's `sent` list those, not every object of the job."""
    from node.ops.audit import Sent, list_events

    objects = tmp_path / "objects"
    objects.mkdir()
    names = ("seg.dcm", "sr.dcm", "key-image-1.dcm")
    files = [objects / name for name in names]
    for source, target in zip(real_series["lung-kernel"], files, strict=False):
        target.write_bytes(source.read_bytes())
    key_image = pydicom.dcmread(files[2])  # a key image is a Secondary Capture
    key_image.SOPClassUID = key_image.file_meta.MediaStorageSOPClassUID = SC
    key_image.save_as(files[2])
    succeeded_job(engine, ("pacs",), files)
    port = free_port()
    dispatcher = Dispatcher(engine, settings(port, known_origin=False))
    with storescp(port, tmp_path / "received"):
        assert dispatcher.run_due() == 1
    dispatcher.close()
    taken = sorted(str(pydicom.dcmread(path).SOPInstanceUID) for path in files[:2])
    (dispatch,) = list_dispatches(engine)
    assert (dispatch.status, sorted(dispatch.sent or [])) == ("2 of 2 stored", taken)
    (event,) = [e for e in list_events(engine) if e.kind == "sent"]
    assert isinstance(event.facts, Sent)
    assert sorted(event.facts.sop_instances) == taken
