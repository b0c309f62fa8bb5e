"""DICOM upper-layer PDUs built byte by byte (PS3.8 9.3), for tests that must send what no
well-behaved SCU would: malformed items, wrong lengths, trickles, mutated exchanges."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from pydicom.uid import ExplicitVRLittleEndian

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def presentation_context(
    context_id: int, abstract_syntax: str | None, transfer_syntaxes: Sequence[str]
) -> bytes:
    """A presentation context item; `abstract_syntax=None` leaves its sub-item out."""
    sub_items = b"" if abstract_syntax is None else item(0x30, abstract_syntax.encode())
    sub_items += b"".join(item(0x40, syntax.encode()) for syntax in transfer_syntaxes)
    return item(0x20, bytes([context_id, 0, 0, 0]) + sub_items)


def associate_rq(
    calling: str = "TESTSCU",
    called: str = "AINODE",
    contexts: Sequence[bytes] | None = None,
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ (a CT Image Storage and a Verification context by default)."""
    contexts = contexts or [
        presentation_context(1, CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
        presentation_context(3, VERIFICATION, ["1.2.840.10008.1.2"]),
    ]
    user = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4")
    body = (
        struct.pack(">H2x", 1)
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + item(0x10, APPLICATION_CONTEXT)
        + b"".join(contexts)
        + item(0x50, user)
    )
    return pdu(0x01, body)


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set in Implicit VR Little Endian with its group length."""
    body = b"".join(
        struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value for tag, value in elements
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def uid_value(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x00000002, uid_value(sop_class)),
            (0x00000100, struct.pack("<H", 0x0001)),
            (0x00000110, struct.pack("<H", message_id)),
            (0x00000700, struct.pack("<H", 0)),
            (0x00000800, struct.pack("<H", 0x0000)),
            (0x00001000, uid_value(sop_instance)),
        ]
    )


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def c_find_rq(
    sop_class: str = STUDY_ROOT_FIND,
    message_id: int = 1,
    with_dataset: bool = True,
    command_field: int = 0x0020,
) -> bytes:
    """A C-FIND-RQ (or another query/retrieve command on the same elements)."""
    return command_set(
        [
            (0x00000002, uid_value(sop_class)),
            (0x00000100, struct.pack("<H", command_field)),
            (0x00000110, struct.pack("<H", message_id)),
            (0x00000700, struct.pack("<H", 0)),
            (0x00000800, struct.pack("<H", 0x0000 if with_dataset else 0x0101)),
        ]
    )


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x00000002, uid_value(VERIFICATION)),
            (0x00000100, struct.pack("<H", 0x0030)),
            (0x00000110, struct.pack("<H", message_id)),
            (0x00000800, struct.pack("<H", 0x0101)),
        ]
    )


def p_data(context_id: int, value: bytes, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return pdu(0x04, pdv)


RELEASE_RQ = pdu(0x05, bytes(4))


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU the node sends (type, body); None when it closed the connection."""
    header = _read(sock, 6)
    if header is None:
        return None
    pdu_type, length = struct.unpack(">BxI", header)
    body = _read(sock, length)
    return None if body is None else (pdu_type, body)


def status_of(response_body: bytes) -> int:
    """The Status (0000,0900) of a DIMSE response carried in one P-DATA-TF body."""
    value = response_body[6:]
    offset = 0
    while offset + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHI", value, offset)
        offset += 8
        if (group, element) == (0x0000, 0x0900):
            return int(struct.unpack_from("<H", value, offset)[0])
        offset += length
    raise ValueError("no status in the response")


def _read(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except (ConnectionResetError, TimeoutError):
            return None
        if not chunk:
            return None
        data += chunk
    return data
