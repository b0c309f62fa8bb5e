"""The upper-layer acceptor against a real pynetdicom peer over loopback: fragmented PDUs,
statuses with comments, the association limit, release, abort and garbage on the wire."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from node.dimse.acceptor import Acceptor, Association, Limits, Reply, StoreRequest
from node.dimse.protocol import CALLING_AE_NOT_RECOGNIZED, Rejection


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
    second = associate(acceptor.port)
    assert second.is_rejected
    assert (second.acceptor.primitive.result_source, second.acceptor.primitive.diagnostic) == (
        3,
        2,
    )
    first.release()
    third = associate(acceptor.port)
    assert third.is_established
    third.release()


def test_unknown_calling_ae_is_rejected(acceptor: Acceptor) -> None:
    assoc = associate(acceptor.port, calling="INTRUDER")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == 3


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
