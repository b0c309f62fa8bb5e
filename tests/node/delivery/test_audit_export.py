"""The audit trail as DICOM audit messages (PS3.15 A.5) to a real local syslog listener:
what a modality sent arrives as "DICOM Instances Transferred" with its patient and SOP
classes; a collector that is down gets every message once it is back, in order."""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import pytest
from pydicom.uid import CTImageStorage, generate_uid

from tests.node.edge.test_scp import ct_dataset
from tests.node.edge.test_tls import certificate
from tests.peers import free_port, storescu, wait_until

HEADER = "<85>1 "  # authpriv.notice, syslog protocol version 1


class Collector:
    """What a syslog listener received: RFC 5424 messages, in order."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lock = threading.Lock()

    def add(self, message: bytes) -> None:
        with self.lock:
            self.messages.append(message)

    def audits(self) -> list[ElementTree.Element]:
        with self.lock:
            messages = list(self.messages)
        parsed = []
        for message in messages:
            header, _, xml = message.partition("\ufeff".encode())
            assert b" ainode - DICOM+RFC3881 - " in header, header
            parsed.append(ElementTree.fromstring(xml))
        return parsed


@contextmanager
def tcp_listener(
    port: int, collector: Collector, tls: ssl.SSLContext | None = None
) -> Iterator[None]:
    """Octet-counted frames (RFC 6587) over TCP, or over TLS (RFC 5425)."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                length = b""
                while (byte := self.rfile.read(1)) not in (b" ", b""):
                    length += byte
                if not length:
                    return
                collector.add(self.rfile.read(int(length)))

    class Server(socketserver.ThreadingTCPServer):
        def get_request(self) -> tuple[socket.socket, object]:
            connection, address = super().get_request()
            if tls is not None:
                connection = tls.wrap_socket(connection, server_side=True)
            return connection, address

    server = Server(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.allow_reuse_address = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def udp_listener(port: int, collector: Collector) -> Iterator[None]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.2)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                collector.add(sock.recv(65535))
            except TimeoutError:
                continue

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sock.close()


def event_id(audit: ElementTree.Element) -> str:
    return audit.find("EventIdentification/EventID").get("csd-code")


def transferred(collector: Collector, study_uid: str) -> ElementTree.Element | None:
    for audit in collector.audits():
        objects = audit.findall("ParticipantObjectIdentification")
        if event_id(audit) == "110104" and any(
            o.get("ParticipantObjectID") == study_uid for o in objects
        ):
            return audit
    return None


def send_study(port: int, folder: Path, patient_id: str) -> str:
    study = generate_uid()
    paths = []
    for index in range(2):
        dataset = ct_dataset(generate_uid(), study)
        dataset.PatientID = patient_id
        path = folder / f"{patient_id}-{index}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    storescu(port, paths)
    return study


@pytest.mark.parametrize("protocol", ["tcp", "udp", "tls"])
def test_received_instances_become_dicom_audit_messages(
    start_node, tmp_path: Path, protocol: str
) -> None:
    port = free_port()
    collector = Collector()
    syslog = {"host": "127.0.0.1", "port": port, "protocol": protocol, "poll_seconds": 0.2}
    if protocol == "udp":
        listener = udp_listener(port, collector)
    elif protocol == "tcp":
        listener = tcp_listener(port, collector)
    else:
        pki = tmp_path / "pki"
        pki.mkdir()
        certificate(pki, "ca", None)
        certificate(pki, "collector", "ca", ip="127.0.0.1")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki / "collector.crt", pki / "collector.key")
        listener = tcp_listener(port, collector, context)
        syslog["ca_file"] = str(pki / "ca.crt")
    with listener:
        node = start_node(audit={"syslog": syslog})
        study = send_study(node.port, tmp_path, "PID-0001")
        audit = wait_until(lambda: transferred(collector, study), 20)

        started = collector.audits()[0]
        assert event_id(started) == "110100"  # Application Activity
        type_code = started.find("EventIdentification/EventTypeCode")
        assert type_code.get("csd-code") == "110120"  # Application Start

        identification = audit.find("EventIdentification")
        assert identification.get("EventActionCode") == "C"
        assert identification.get("EventOutcomeIndicator") == "0"
        source, destination = audit.findall("ActiveParticipant")
        assert (source.get("UserID"), source.get("UserIsRequestor")) == ("STORESCU", "true")
        assert source.get("NetworkAccessPointID") == "127.0.0.1"
        assert source.find("RoleIDCode").get("csd-code") == "110153"
        assert destination.get("UserID") == node.settings["node"]["ae_title"]
        assert destination.find("RoleIDCode").get("csd-code") == "110152"
        study_object, patient = audit.findall("ParticipantObjectIdentification")
        assert study_object.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
        sop_class = study_object.find("SOPClass")
        assert (sop_class.get("UID"), sop_class.get("NumberOfInstances")) == (CTImageStorage, "2")
        assert patient.get("ParticipantObjectID") == "PID-0001"
        assert patient.get("ParticipantObjectTypeCodeRole") == "1"
        assert patient.find("ParticipantObjectName").text == "Test^Phantom"
        assert collector.messages[0].startswith(HEADER.encode())
        assert node.stop() == 0
        stopped = wait_until(
            lambda: next(
                (
                    a
                    for a in collector.audits()
                    if a.find("EventIdentification/EventTypeCode") is not None
                    and a.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"
                ),
                None,
            ),
            10,
        )
        assert stopped is not None
    assert "PID-0001" not in node.log() and "Test^Phantom" not in node.log()


def test_a_collector_that_is_down_gets_every_message_when_it_is_back(
    start_node, tmp_path: Path
) -> None:
    port = free_port()
    collector = Collector()
    syslog = {"host": "127.0.0.1", "port": port, "protocol": "tcp", "poll_seconds": 0.2}
    node = start_node(audit={"syslog": syslog})
    first = send_study(node.port, tmp_path, "PID-A")
    second = send_study(node.port, tmp_path, "PID-B")
    wait_until(lambda: "audit export to syslog paused" in node.log(), 20)
    with tcp_listener(port, collector):
        wait_until(lambda: transferred(collector, second), 20)
        ids = [event_id(a) for a in collector.audits()]
        assert ids[0] == "110100"  # the start, first: the order of the trail
        assert transferred(collector, first) is not None
        assert ids.count("110104") == 2
    assert "audit export to syslog resumed" in node.log()


def test_job_and_admin_events_export_and_the_export_goes_on(engine, tmp_path: Path) -> None:
    """Every kind of event goes out, in order, including job events and rows written by an
    older version (a job's series as a bare string): none stops the export."""
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from node.config import Settings
    from node.delivery.audit_export import AuditExporter
    from node.ops.audit import (
        Action,
        AdminAction,
        ApplicationEvent,
        Committed,
        JobEnded,
        PatientRecordRead,
        Queried,
        Received,
        Retrieved,
        Sent,
        WorkitemChanged,
        record,
    )
    from node.store.db.models import AuditEvent

    study, series = generate_uid(), generate_uid()
    record(engine, "node", ApplicationEvent(action="start"))
    received = Received(
        source="dimse", exchange="a1", address="127.0.0.1:4000", instances=2, studies=[study],
        series=[series], released=True,
    )  # fmt: skip
    record(engine, "STORESCU", received, study)
    job = JobEnded(job=1, pipeline="lung-quant", series=[series], revision=1, state="failed")
    record(engine, "worker-0", job, study)
    with engine.begin() as conn:
        conn.execute(
            insert(AuditEvent).values(
                at=datetime.now(UTC), kind="job", actor="worker-0", study_instance_uid=study,
                detail=f'{{"job": 2, "pipeline": "x", "series": "{series}", "revision": 1, '
                '"state": "succeeded"}',
            )
        )  # fmt: skip
    sent = Sent(destination="pacs", dispatch=1, sop_instances=[generate_uid()], status="1 of 1")
    record(engine, "AINODE", sent, study)
    record(engine, "it-admin", AdminAction(action=Action.RETRY_JOB, id=1))
    record(engine, "it-admin", PatientRecordRead(route="/api/v1/status", studies=1))
    record(engine, "WORKSTATION", Queried(level="STUDY", matches=3))
    moved = Retrieved(
        service="C-MOVE", level="STUDY", destination="PACS", instances=2, failed=1,
        studies=[study],
    )  # fmt: skip
    record(engine, "WORKSTATION", moved, study)
    committed = Committed(
        destination="pacs", dispatch=1, transaction_uid=generate_uid(),
        sop_instances=sent.sop_instances[:0], failed=sent.sop_instances,
    )  # fmt: skip
    record(engine, "ORTHANC", committed, study)
    record(engine, "RIS", WorkitemChanged(action="created", workitem=generate_uid()), study)
    port = free_port()
    collector = Collector()
    settings = Settings.model_validate(
        {
            "node": {"accept_unknown_peers": True},
            "audit": {"syslog": {"host": "127.0.0.1", "port": port, "protocol": "tcp"}},
        }
    )
    with tcp_listener(port, collector):
        exporter = AuditExporter(engine, settings)
        assert exporter.run_due() == 11
        exporter.close()
        audits = wait_until(lambda: len(collector.audits()) == 11 and collector.audits(), 10)
    assert [event_id(a) for a in audits] == [
        "110100", "110104", "110103", "110103", "110104", "110113", "110110", "110112", "110104",
        "110104", "110111",
    ]  # fmt: skip
    assert audits[10].find("EventIdentification").get("EventActionCode") == "C"
    commitment = audits[9]  # the PACS's word on a transfer: here, it kept nothing
    assert commitment.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    who = [p.get("UserID") for p in commitment.iter("ActiveParticipant")]
    assert who == ["AINODE", "pacs"]
    query, retrieve = audits[7], audits[8]
    assert [p.get("UserID") for p in query.iter("ActiveParticipant")] == ["WORKSTATION", "AINODE"]
    assert retrieve.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # one failed
    who = [(p.get("UserID"), p.get("UserIsRequestor")) for p in retrieve.iter("ActiveParticipant")]
    assert who == [("AINODE", "false"), ("PACS", "false"), ("WORKSTATION", "true")]
    patient_record = audits[6].find("EventIdentification")
    assert patient_record.get("EventActionCode") == "R"
    failed, succeeded = audits[2], audits[3]
    assert failed.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert succeeded.find("EventIdentification").get("EventOutcomeIndicator") == "0"
