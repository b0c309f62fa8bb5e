"""Storage commitment on a real database with real peers: Orthanc commits what the node sent
and reports on an association of its own; a report that never comes (Orthanc stopped
mid-way) or names failures spends an attempt and the results go again; reports the node did
not ask for, or cannot read, are refused with the PS3.7 status that says why."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from sqlalchemy import Engine, select, update

from node.config import Settings
from node.delivery.dispatch.dispatcher import Dispatcher
from node.delivery.dispatch.records import DispatchView, list_dispatches
from node.edge.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
from node.ingest.receiver import Receiver
from node.ops.audit import Kind, list_events
from node.store.db.models import Dispatch, Notification, utcnow
from tests import dicom_wire as wire
from tests.node.delivery.dispatch.test_dispatcher import succeeded_job
from tests.peers import OrthancServer, free_port, storescp, wait_until


def node_settings(
    home: Path, engine: Engine, node_port: int, pacs_port: int, **sections: Any
) -> Settings:
    return Settings.model_validate({
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": node_port},
        "storage": {"path": str(home / "storage")},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "peers": {
            "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                     "commitment": True},
            "ct": {"ae_title": "CT", "host": "127.0.0.1", "port": free_port()},
        },
        "dispatch": {"retry_base_seconds": 0.05, "retry_max_seconds": 0.1,
                     "commitment_timeout_seconds": 600},
        **sections,
    })  # fmt: skip


@contextmanager
def receiving(settings: Settings) -> Iterator[Receiver]:
    """The node's storage SCP, which takes the reports."""
    receiver = Receiver(settings, reuse_port=False)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def only_dispatch(engine: Engine) -> DispatchView:
    (dispatch,) = list_dispatches(engine)
    return dispatch


def commitment_events(engine: Engine) -> list[Any]:
    return [event for event in list_events(engine) if event.kind == Kind.COMMITMENT]


def uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_orthanc_commits_what_was_sent_and_the_dispatch_is_delivered(
    engine: Engine, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    files = real_series["lung-kernel"][:2]
    settings = node_settings(tmp_path, engine, orthanc.node_port, orthanc.dicom_port)
    succeeded_job(engine, ("pacs",), files)
    dispatcher = Dispatcher(engine, settings)
    with receiving(settings):
        assert dispatcher.run_due() == 1
        sent = only_dispatch(engine)
        assert sent.status == "2 of 2 stored"
        assert sent.state in ("waiting", "succeeded")  # Orthanc may have reported already
        delivered = wait_until(
            lambda: (d := only_dispatch(engine)).state == "succeeded" and d, timeout=30
        )
    assert delivered.commitment == "committed" and delivered.attempts == 1
    assert set(delivered.sent or []) == uids(files)
    (event,) = commitment_events(engine)
    assert event.actor == "ORTHANC"
    assert set(event.detail["sop_instances"]) == uids(files) and event.detail["failed"] == []
    assert dispatcher.run_due() == 0  # nothing left to settle or send
    dispatcher.close()


def test_orthanc_stopped_mid_way_pending_then_retried_then_committed(
    engine: Engine, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    """Orthanc takes the instances and the request, but its report finds no node listening
    (its job fails); Orthanc then stops. The commitment times out, the resend finds Orthanc
    down; once Orthanc and the node's receiver are back, the results go again and are
    committed."""
    files = real_series["lung-kernel"][:2]
    settings = node_settings(tmp_path, engine, orthanc.node_port, orthanc.dicom_port)
    settings.dispatch.commitment_timeout_seconds = 1
    succeeded_job(engine, ("pacs",), files, attempts=5)
    dispatcher = Dispatcher(engine, settings)
    assert dispatcher.run_due() == 1
    assert only_dispatch(engine).commitment == "pending"
    ports = (str(orthanc.dicom_port), orthanc.env["ORTHANC_HTTP_PORT"])
    orthanc.stop()

    def due_now() -> None:  # the clock moves on to the deadline or the retry
        with engine.begin() as conn:
            conn.execute(update(Dispatch).values(run_after=utcnow()))

    due_now()
    assert dispatcher.run_due() == 0  # settled: no report in time, an attempt spent
    unreported = only_dispatch(engine)
    assert (unreported.state, unreported.commitment) == ("retrying", "failed")
    assert "no storage commitment report from pacs within 1 s" in (unreported.error or "")
    due_now()
    assert dispatcher.run_due() == 1  # sent again: Orthanc is down
    failed = only_dispatch(engine)
    assert (failed.state, failed.commitment, failed.attempts) == ("retrying", "failed", 2)
    assert "no association with ORTHANC" in (failed.error or "")
    orthanc.start(ports)
    with receiving(settings):
        due_now()
        assert dispatcher.run_due() == 1
        delivered = wait_until(
            lambda: (d := only_dispatch(engine)).state == "succeeded" and d, timeout=30
        )
    assert (delivered.commitment, delivered.attempts) == ("committed", 3)
    dispatcher.close()


def report(
    port: int,
    transaction_uid: str | None,
    committed: list[tuple[str, str]],
    failed: list[tuple[str, str, int]] = (),  # type: ignore[assignment]
    calling_ae: str = "ORTHANC",
    event_type: int | None = None,
    instance_uid: str = STORAGE_COMMITMENT_INSTANCE,
    information: Any = None,
) -> int:
    """Send a storage commitment report as a PACS does (pynetdicom, the PACS as the SCP of
    the Storage Commitment Push Model on an association it opens); the node's status."""
    if information is None:
        information = Dataset()
        if transaction_uid is not None:
            information.TransactionUID = transaction_uid
        information.ReferencedSOPSequence = [_ref(c, i) for c, i in committed]
        if failed:
            information.FailedSOPSequence = [_ref(c, i, reason) for c, i, reason in failed]
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT)
    role = build_role(STORAGE_COMMITMENT, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", ext_neg=[role])
    assert assoc.is_established
    try:
        kind = event_type if event_type is not None else (2 if failed else 1)
        status, _ = assoc.send_n_event_report(information, kind, STORAGE_COMMITMENT, instance_uid)
        return int(status.Status)
    finally:
        assoc.release()


def _ref(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def references(files: list[Path]) -> list[tuple[str, str]]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in headers]


def waiting_dispatch(
    engine: Engine, files: list[Path], attempts: int, notify: tuple[str, ...] = ()
) -> str:
    """A dispatch to `pacs` sent and waiting for its report; its Transaction UID."""
    succeeded_job(engine, ("pacs",), files, attempts=attempts, notify=notify)
    uid = generate_uid()
    with engine.begin() as conn:
        conn.execute(
            update(Dispatch).values(
                state="waiting",
                commitment="pending",
                transaction_uid=uid,
                sent=sorted(uids(files)),
                attempts=1,
                run_after=utcnow().replace(year=2100),
            )
        )
    return uid


def test_a_report_of_failures_sends_again_and_the_last_attempt_alerts(
    engine: Engine, real_series, tmp_path: Path
) -> None:
    files = real_series["lung-kernel"][:2]
    ward = {"url": "http://127.0.0.1:9/hook", "on": ["undelivered"]}
    settings = node_settings(
        tmp_path, engine, free_port(), free_port(), notifications={"ward": ward}
    )
    uid = waiting_dispatch(engine, files, attempts=1, notify=("ward",))
    (kept, lost) = references(files)
    dispatcher = Dispatcher(engine, settings)
    with receiving(settings) as receiver:
        port = receiver.scp.port
        assert report(port, uid, [kept], [(*lost, 0x0112)]) == 0x0000
    marked = only_dispatch(engine)
    assert (marked.state, marked.commitment) == ("waiting", "failed")
    assert f"{lost[1]}: failure reason 0x0112" in (marked.error or "")
    assert dispatcher.run_due() == 0  # settled: out of attempts, so dead, and nothing sent
    dead = only_dispatch(engine)
    assert (dead.state, dead.commitment) == ("dead", "failed")
    (event,) = commitment_events(engine)
    assert event.detail["failed"] == [lost[1]] and event.detail["sop_instances"] == [kept[1]]
    with engine.connect() as conn:
        (told,) = conn.execute(select(Notification.target, Notification.event))
    assert (told.target, told.event) == ("ward", "undelivered")
    dispatcher.close()


def test_a_report_that_leaves_an_instance_out_is_not_a_commitment(
    engine: Engine, real_series, tmp_path: Path
) -> None:
    files = real_series["lung-kernel"][:2]
    settings = node_settings(tmp_path, engine, free_port(), free_port())
    uid = waiting_dispatch(engine, files, attempts=3)
    with receiving(settings) as receiver:
        assert report(receiver.scp.port, uid, references(files)[:1]) == 0x0000
    marked = only_dispatch(engine)
    assert marked.commitment == "failed" and "not in the report" in (marked.error or "")


def test_reports_the_node_did_not_ask_for_or_cannot_read_are_refused(
    engine: Engine, real_series, tmp_path: Path
) -> None:
    files = real_series["lung-kernel"][:2]
    settings = node_settings(tmp_path, engine, free_port(), free_port())
    uid = waiting_dispatch(engine, files, attempts=3)
    every = references(files)
    unreadable = Dataset()
    unreadable.TransactionUID = uid
    unreadable.ReferencedSOPSequence = [Dataset()]  # an item without its UIDs
    with receiving(settings) as receiver:
        port = receiver.scp.port
        assert report(port, generate_uid(), every) == 0x0115  # unknown transaction
        assert report(port, uid, every, calling_ae="CT") == 0x0115  # not asked to commit
        assert report(port, None, every) == 0x0115  # no Transaction UID
        assert report(port, uid, every, event_type=7) == 0x0113
        assert report(port, uid, every, instance_uid=generate_uid()) == 0x0112
        assert report(port, uid, every, information=unreadable) == 0x0115
        assert only_dispatch(engine).state == "waiting"  # none of them changed anything
        assert report(port, uid, every) == 0x0000
        assert report(port, uid, every) == 0x0000  # the same report again: nothing more
    done = only_dispatch(engine)
    assert (done.state, done.commitment) == ("succeeded", "committed")
    assert len(commitment_events(engine)) == 1


def n_command(field: int, sop_class: str, with_dataset: bool, event_type: int = 1) -> bytes:
    """An N-EVENT-REPORT-RQ (0x0100) or N-ACTION-RQ (0x0130) command set."""
    type_tag = 0x00001002 if field == 0x0100 else 0x00001008
    instance_tag = 0x00001000 if field == 0x0100 else 0x00001001
    class_tag = 0x00000002 if field == 0x0100 else 0x00000003
    return wire.command_set(sorted([
        (class_tag, wire.uid_value(sop_class)),
        (0x00000100, struct.pack("<H", field)),
        (0x00000110, struct.pack("<H", 1)),
        (0x00000800, struct.pack("<H", 0x0000 if with_dataset else 0x0101)),
        (instance_tag, wire.uid_value(STORAGE_COMMITMENT_INSTANCE)),
        (type_tag, struct.pack("<H", event_type)),
    ]))  # fmt: skip


def test_storage_commitment_commands_the_node_does_not_serve_are_refused_on_the_wire(
    engine: Engine, tmp_path: Path
) -> None:
    """A report on the Verification context, an N-ACTION asking the node to commit, and a
    report without its event information each get their status; the association lives on."""
    settings = node_settings(tmp_path, engine, free_port(), free_port())
    contexts = [
        wire.presentation_context(1, wire.VERIFICATION, [ImplicitVRLittleEndian]),
        wire.presentation_context(3, STORAGE_COMMITMENT, [ImplicitVRLittleEndian]),
    ]
    with (
        receiving(settings) as receiver,
        socket.create_connection(("127.0.0.1", receiver.scp.port), timeout=10) as raw,
    ):
        raw.sendall(wire.associate_rq(calling="ORTHANC", contexts=contexts))
        assert wire.read_pdu(raw)[0] == 0x02
        statuses = []
        for context, command in (
            (1, n_command(0x0100, wire.VERIFICATION, with_dataset=False)),
            (3, n_command(0x0130, STORAGE_COMMITMENT, with_dataset=False)),
            (3, n_command(0x0100, STORAGE_COMMITMENT, with_dataset=False)),
        ):
            raw.sendall(wire.p_data(context, command, command=True))
            statuses.append(wire.status_of(wire.read_pdu(raw)[1]))
        raw.sendall(wire.p_data(1, wire.c_echo_rq(), command=True))
        statuses.append(wire.status_of(wire.read_pdu(raw)[1]))
        raw.sendall(wire.RELEASE_RQ)
        assert wire.read_pdu(raw)[0] == 0x06
    assert statuses == [0x0118, 0x0211, 0x0115, 0x0000]


def test_a_peer_without_storage_commitment_is_told_apart_from_one_that_is_down(
    engine: Engine, real_series, tmp_path: Path
) -> None:
    """DCMTK's storescp stores but has no Storage Commitment SCP: the results are there,
    the dispatch says why it is not delivered and tries again."""
    files = real_series["lung-kernel"][:1]
    port = free_port()
    settings = node_settings(tmp_path, engine, free_port(), port)
    succeeded_job(engine, ("pacs",), files, attempts=3)
    dispatcher = Dispatcher(engine, settings)
    with storescp(port, tmp_path / "received", "-aet", "ORTHANC"):
        assert dispatcher.run_due() == 1
    assert len(list((tmp_path / "received").iterdir())) == 1
    refused = only_dispatch(engine)
    assert (refused.state, refused.commitment) == ("retrying", "failed")
    assert "accepts none of the SOP classes proposed: Storage Commitment Push Model" in (
        refused.error or ""
    )
    dispatcher.close()
