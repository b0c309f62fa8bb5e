"""The upper-layer acceptor against a real pynetdicom peer over loopback: fragmented PDUs,
statuses with comments, the association limit, release, abort and garbage on the wire; and
against hand-built hostile PDUs: malformed requests, lying lengths, trickles, split messages."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from node.edge.acceptor import Acceptor, Association
from node.edge.limits import Limits
from node.edge.messages import Reply, StoreRequest
from node.edge.protocol import CALLING_AE_NOT_RECOGNIZED, Rejection
from tests import dicom_wire as wire


@dataclass
class Recorder:
    """The node's side, reduced to what it was asked and what it answers."""

    reply: Reply = field(default_factory=lambda: Reply(0x0000))
    stored: list[tuple[StoreRequest, bytes]] = field(default_factory=list)
    ended: list[Association] = field(default_factory=list)
    ended_event: threading.Event = field(default_factory=threading.Event)

    def admit(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None:
        return CALLING_AE_NOT_RECOGNIZED if calling_ae == "INTRUDER" else None

    def opened(self, association: Association) -> None:
        pass

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply:
        self.stored.append((request, dataset))
        if self.reply.status == 0xDEAD:
            self.reply = Reply(0x0000)
            raise RuntimeError("a bug in the node")
        return self.reply

    def closed(self, association: Association) -> None:
        self.ended.append(association)
        self.ended_event.set()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def acceptor(recorder: Recorder) -> Iterator[Acceptor]:
    limits = Limits(max_pdu_size=4096, max_associations=1, max_pending=4)
    server = Acceptor(("127.0.0.1", 0), recorder, limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop_listening()
    server.abort_all()


def ct_image(size: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (size // 256)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def associate(port: int, calling: str = "TESTSCU"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="AINODE")


def rejection(port: int, calling: str = "TESTSCU") -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ that a request on a raw socket gets.
    Not pynetdicom's requestor: under load its connection thread can handle the rejection
    before the thread that asked checks the connection, which then reports an abort."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(wire.associate_rq(calling=calling))
        answer = wire.read_pdu(raw)
    assert answer is not None and answer[0] == 0x03, answer  # A-ASSOCIATE-RJ
    result, source, reason = answer[1][1:4]
    return result, source, reason


def test_fragmented_dataset_arrives_whole_and_the_reply_goes_back(
    acceptor: Acceptor, recorder: Recorder
) -> None:
    ds = ct_image(40_000)  # ten P-DATA PDUs at the 4 KiB we negotiate
    recorder.reply = Reply(0xA700, "storage full: no space left")
    assoc = associate(acceptor.port)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 4096
    assert assoc.send_c_echo().Status == 0x0000
    response = assoc.send_c_store(ds)
    assoc.release()

    assert response.Status == 0xA700
    assert response.ErrorComment == "storage full: no space left"
    request, data = recorder.stored[0]
    assert data == encoded(ds)
    assert request.sop_instance_uid == ds.SOPInstanceUID
    assert request.sop_class_uid == CTImageStorage
    assert request.transfer_syntax == ExplicitVRLittleEndian
    assert recorder.ended_event.wait(5)
    assert recorder.ended[0].released and recorder.ended[0].calling_ae == "TESTSCU"


def test_association_limit_rejects_then_frees_on_release(acceptor: Acceptor) -> None:
    first = associate(acceptor.port)
    assert first.is_established
    assert rejection(acceptor.port)[1:] == (3, 2)  # the provider's local limit
    first.release()
    third = associate(acceptor.port)
    assert third.is_established
    third.release()


def test_unknown_calling_ae_is_rejected(acceptor: Acceptor) -> None:
    assert rejection(acceptor.port, calling="INTRUDER")[2] == 3  # calling AE not recognised


def test_peer_abort_closes_as_not_released(acceptor: Acceptor, recorder: Recorder) -> None:
    assoc = associate(acceptor.port)
    assert assoc.is_established
    assoc.abort()
    assert recorder.ended_event.wait(5)
    assert not recorder.ended[0].released


def test_garbage_is_dropped_and_the_next_peer_is_served(acceptor: Acceptor) -> None:
    with socket.create_connection(("127.0.0.1", acceptor.port)) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        answer = raw.recv(64)
    assert answer[:1] in (b"\x07", b"")  # an A-ABORT, or the connection closed
    assoc = associate(acceptor.port)
    assert assoc.is_established
    assoc.release()


def test_a_fault_in_the_node_fails_one_instance_not_the_association(
    acceptor: Acceptor, recorder: Recorder
) -> None:
    recorder.reply = Reply(0xDEAD)  # the next store raises
    assoc = associate(acceptor.port)
    assert assoc.send_c_store(ct_image(1024)).Status == 0x0110
    assert assoc.send_c_store(ct_image(1024)).Status == 0x0000
    assoc.release()
    assert len(recorder.stored) == 2


@pytest.fixture
def hostile(recorder: Recorder) -> Iterator[Acceptor]:
    """An acceptor with short deadlines, as a hospital would face a broken or hostile peer."""
    limits = Limits(
        max_pdu_size=0,
        max_associations=1,
        max_pending=8,
        association_timeout=1.0,
        network_timeout=1.0,
    )
    server = Acceptor(("127.0.0.1", 0), recorder, limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.stop_listening()
    server.abort_all()


def exchange(port: int, *pdus: bytes) -> list[int]:
    """Send `pdus`, then read what the node answers until it closes: the PDU types."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        for data in pdus:
            with contextlib.suppress(OSError):
                raw.sendall(data)
        while (answer := wire.read_pdu(raw)) is not None:
            answers.append(answer[0])
    return answers


def settled(acceptor: Acceptor) -> bool:
    """No association and no negotiating connection left."""
    deadline = time.monotonic() + 5
    while acceptor.open_associations or acceptor.pending_connections:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def untraced(caplog: pytest.LogCaptureFixture) -> bool:
    """No traceback from the node's own loggers (`configure_logging` quiets pynetdicom's)."""
    return all(r.exc_info is None for r in caplog.records if r.name.startswith("node"))


def test_a_context_without_abstract_syntax_never_locks_the_node_out(
    hostile: Acceptor, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 1: such an RQ used to raise inside the negotiation and keep its slot."""
    broken = wire.presentation_context(1, None, [ExplicitVRLittleEndian])
    for _ in range(10):  # one slot (max_associations=1): each must be given back
        assert exchange(hostile.port, wire.associate_rq(contexts=[broken])) == [0x07]
        assert settled(hostile)
    assoc = associate(hostile.port)
    assert assoc.is_established
    assoc.release()
    assert untraced(caplog)
    assert "has no abstract syntax" in caplog.text


@pytest.mark.parametrize(
    "mutate",
    [
        lambda rq: rq[:-3],  # cut inside the user information item
        lambda rq: rq[:6] + rq[6:40] + b"\xff" * 40 + rq[80:],  # garbage AE titles and more
        lambda rq: rq.replace(b"\x10\x00\x00\x15", b"\x10\x00\x00\x99"),  # item length lies
        lambda rq: rq.replace(b"\x51\x00\x00\x04", b"\x51\x00\x00\x02"),  # short max length
        lambda rq: rq.replace(b"\x50\x00", b"\x77\x00"),  # unknown item type
        lambda rq: rq[:6] + b"\x00\x07" + rq[8:],  # protocol version 7
    ],
)
def test_malformed_associate_requests_are_answered_not_traced(
    hostile: Acceptor, caplog: pytest.LogCaptureFixture, mutate
) -> None:
    """Finding 2: each gets an A-ASSOCIATE-RJ or A-ABORT and one log line, no traceback."""
    answers = exchange(hostile.port, mutate(wire.associate_rq()))
    # an A-ABORT or an A-ASSOCIATE-RJ; or, where the request still reads as one, an
    # A-ASSOCIATE-AC and, the peer saying nothing more, an A-ABORT at the network deadline
    assert answers in ([0x07], [0x03], [0x02, 0x07]), answers
    assert settled(hostile)
    assert untraced(caplog)


def test_an_announced_length_costs_nothing_until_it_is_sent(hostile: Acceptor) -> None:
    """Finding 3: headers claiming huge PDUs are refused at once or cost only what arrives."""
    assert exchange(hostile.port, struct.pack(">BxI", 0x01, 0xFFFFFFFF)) == [0x07]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sockets = []
    for _ in range(8):  # the negotiating connections allowed
        raw = socket.create_connection(("127.0.0.1", hostile.port))
        raw.sendall(struct.pack(">BxI", 0x01, 1 << 20))  # an RQ of 1 MiB announced, not sent
        sockets.append(raw)
    time.sleep(0.3)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    for raw in sockets:
        raw.close()
    assert grown < 2 << 20, f"{grown} bytes for 8 MiB announced"
    assert settled(hostile)


def test_past_the_pending_cap_the_longest_negotiating_connection_makes_room(
    hostile: Acceptor,
) -> None:
    """Idle connections fill the cap; a real sender still associates, and the connection
    that waited longest is the one closed."""
    idle = [socket.create_connection(("127.0.0.1", hostile.port), timeout=5) for _ in range(8)]
    time.sleep(0.2)
    assoc = associate(hostile.port)
    assert assoc.is_established
    closed = idle[0].recv(16)  # the oldest was closed (or aborted, had its ARTIM run out)
    assert closed == b"" or closed.startswith(b"\x07")
    assoc.release()
    for raw in idle:
        raw.close()
    assert settled(hostile)


def test_a_trickling_peer_is_cut_off_at_the_pdu_deadline(hostile: Acceptor) -> None:
    """Finding 3: the deadline is for the whole PDU, not for each byte."""
    request = wire.associate_rq()
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as raw:
        started = time.monotonic()
        sent = 0
        with contextlib.suppress(OSError):
            for byte in request:
                raw.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.2)
        answer = wire.read_pdu(raw)
    assert sent < len(request), "the whole RQ went through a byte every 0.2 s"
    assert answer is None or answer[0] == 0x07
    assert time.monotonic() - started < len(request) * 0.2
    assert settled(hostile)


def test_a_dataset_split_over_two_contexts_is_aborted(hostile: Acceptor) -> None:
    contexts = [
        wire.presentation_context(1, wire.CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
        wire.presentation_context(3, wire.MR_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
    ]
    command = wire.c_store_rq(wire.CT_IMAGE_STORAGE, "1.2.3.4")
    answers = exchange(
        hostile.port,
        wire.associate_rq(contexts=contexts),
        wire.p_data(1, command, command=True),
        wire.p_data(1, b"\x08\x00\x16\x00UI\x02\x001\x00", command=False, last=False),
        wire.p_data(3, b"\x08\x00\x18\x00UI\x02\x001\x00", command=False),
    )
    assert answers == [0x02, 0x07]
    assert settled(hostile)


def test_an_affected_sop_class_not_of_its_context_is_refused(
    hostile: Acceptor, recorder: Recorder
) -> None:
    """Finding 6: MR sent on a CT context."""
    command = wire.c_store_rq(wire.MR_IMAGE_STORAGE, "1.2.3.4")
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as raw:
        raw.sendall(wire.associate_rq())
        assert wire.read_pdu(raw)[0] == 0x02
        raw.sendall(wire.p_data(1, command, command=True))
        raw.sendall(wire.p_data(1, encoded(ct_image(256)), command=False))
        pdu_type, body = wire.read_pdu(raw)
        raw.sendall(wire.RELEASE_RQ)
        assert wire.read_pdu(raw)[0] == 0x06
    assert pdu_type == 0x04 and wire.status_of(body) == 0x0122
    assert recorder.stored == []


def test_a_message_trickled_in_whole_pdus_is_cut_off(recorder: Recorder) -> None:
    """Finding 11: each 10-byte P-DATA arrives well within the PDU deadline, but the message
    must keep node.min_transfer_kbps after the network timeout: the slot is freed."""
    limits = Limits(max_associations=1, network_timeout=1.0, min_bytes_per_second=1024)
    server = Acceptor(("127.0.0.1", 0), recorder, limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        command = wire.c_store_rq(wire.CT_IMAGE_STORAGE, "1.2.3.4")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(wire.associate_rq())
            assert wire.read_pdu(raw)[0] == 0x02
            raw.sendall(wire.p_data(1, command, command=True))
            started = time.monotonic()
            answer = None
            with contextlib.suppress(OSError):
                for _ in range(40):  # 10 bytes every 0.5 s: each PDU in time, the message not
                    raw.sendall(wire.p_data(1, b"\0" * 4, command=False, last=False))
                    time.sleep(0.5)
                    raw.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        answer = raw.recv(1)
                    raw.setblocking(True)
                    if answer is not None:
                        break
            cut_after = time.monotonic() - started
        assert answer in (b"\x07", b""), answer
        assert cut_after < 5
        assert settled(server)
    finally:
        server.stop_listening()
        server.abort_all()


def test_one_address_cannot_take_every_slot(recorder: Recorder) -> None:
    """Finding 11: past node.max_associations_per_address, an address is rejected while
    slots remain for others."""
    limits = Limits(max_associations=4, max_per_address=2)
    server = Acceptor(("127.0.0.1", 0), recorder, limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        held = [associate(server.port) for _ in range(2)]
        assert all(a.is_established for a in held)
        assert rejection(server.port) == (2, 3, 2)  # transient: the address's limit
        held[0].release()
        again = associate(server.port)
        assert again.is_established
        for assoc in (held[1], again):
            assoc.release()
    finally:
        server.stop_listening()
        server.abort_all()
