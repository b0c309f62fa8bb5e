"""DIMSE messages (PS3.7 6, 9.3): a command set's elements read by tag (Implicit VR Little
Endian), the C-STORE-RQ and the query/retrieve requests the acceptor hands to its services,
the responses it sends back, and the C-STORE-RQ of a C-GET's sub-operation."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID

from node.edge.pdu import ProtocolError
from node.edge.protocol import COMMAND_GROUP, DATA_SET, NO_DATA_SET, CommandField, CommandTag

ELEMENT_HEADER = struct.Struct("<HHI")


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ: its command set and the transfer syntax its dataset is encoded in."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    priority: int


@dataclass(frozen=True)
class QueryRequest:
    """A C-FIND-, C-MOVE- or C-GET-RQ: its SOP class (the information model), its identifier
    as encoded in `transfer_syntax`, and for C-MOVE the AE title to send to."""

    command: CommandField
    message_id: int
    sop_class_uid: str
    identifier: bytes
    transfer_syntax: UID
    move_destination: str = ""


@dataclass(frozen=True)
class Reply:
    """The status of a DIMSE response, with an optional Error Comment."""

    status: int
    comment: str | None = None


def store_request(command: dict[int, bytes], transfer_syntax: UID) -> StoreRequest:
    """The C-STORE-RQ of a command set whose dataset is in `transfer_syntax`."""
    return StoreRequest(
        message_id=as_us(command, CommandTag.MESSAGE_ID),
        sop_class_uid=as_uid(command, CommandTag.AFFECTED_SOP_CLASS_UID),
        sop_instance_uid=as_uid(command, CommandTag.AFFECTED_SOP_INSTANCE_UID),
        transfer_syntax=transfer_syntax,
        priority=as_us(command, CommandTag.PRIORITY, default=0),
    )


def query_request(command: dict[int, bytes], identifier: bytes, syntax: UID) -> QueryRequest:
    """The C-FIND-, C-MOVE- or C-GET-RQ of a command set with its identifier."""
    return QueryRequest(
        command=CommandField(as_us(command, CommandTag.COMMAND_FIELD)),
        message_id=as_us(command, CommandTag.MESSAGE_ID),
        sop_class_uid=as_uid(command, CommandTag.AFFECTED_SOP_CLASS_UID),
        identifier=identifier,
        transfer_syntax=syntax,
        move_destination=as_uid(command, CommandTag.MOVE_DESTINATION),
    )


def response(
    command: dict[int, bytes],
    reply: Reply,
    extra: dict[int, bytes] | None = None,
    with_dataset: bool = False,
) -> bytes:
    """The encoded response command set to `command`, with `reply`'s status and comment,
    the `extra` elements, and whether a dataset follows."""
    field_ = as_us(command, CommandTag.COMMAND_FIELD) | CommandField.RESPONSE
    elements: dict[int, bytes] = {
        CommandTag.AFFECTED_SOP_CLASS_UID: command.get(CommandTag.AFFECTED_SOP_CLASS_UID, b""),
        CommandTag.COMMAND_FIELD: us(field_),
        CommandTag.MESSAGE_ID_BEING_RESPONDED_TO: command.get(CommandTag.MESSAGE_ID, b"\0\0"),
        CommandTag.COMMAND_DATA_SET_TYPE: us(DATA_SET if with_dataset else NO_DATA_SET),
        CommandTag.STATUS: us(reply.status),
    }
    if reply.comment:
        elements[CommandTag.ERROR_COMMENT] = padded(reply.comment[:64].encode("ascii", "replace"))
    if CommandTag.AFFECTED_SOP_INSTANCE_UID in command:
        uid = command[CommandTag.AFFECTED_SOP_INSTANCE_UID]
        elements[CommandTag.AFFECTED_SOP_INSTANCE_UID] = uid
    return command_set({**elements, **(extra or {})})


def store_rq(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 0
) -> bytes:
    """A C-STORE-RQ command set (a dataset follows)."""
    return command_set({
        CommandTag.AFFECTED_SOP_CLASS_UID: uid_value(sop_class_uid),
        CommandTag.COMMAND_FIELD: us(CommandField.C_STORE_RQ),
        CommandTag.MESSAGE_ID: us(message_id),
        CommandTag.PRIORITY: us(priority),
        CommandTag.COMMAND_DATA_SET_TYPE: us(DATA_SET),
        CommandTag.AFFECTED_SOP_INSTANCE_UID: uid_value(sop_instance_uid),
    })  # fmt: skip


def command_set(elements: dict[int, bytes]) -> bytes:
    """A command set of `elements` in tag order, its group length first."""
    body = b"".join(element(tag, elements[tag]) for tag in sorted(elements))
    return element(CommandTag.GROUP_LENGTH, struct.pack("<I", len(body))) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def uid_value(uid: str) -> bytes:
    """A UI value: ASCII, padded to an even length with NUL."""
    encoded = uid.encode("ascii")
    return encoded + b"\0" if len(encoded) % 2 else encoded


def command_elements(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (Implicit VR Little Endian, PS3.7 6.3.1) by tag."""
    elements = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("truncated command set")
        group, element, length = ELEMENT_HEADER.unpack_from(data, offset)
        offset += 8
        if group != COMMAND_GROUP:
            raise ProtocolError(f"command set holds element ({group:04X},{element:04X})")
        if offset + length > len(data):
            raise ProtocolError(f"command element ({group:04X},{element:04X}) is truncated")
        elements[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return elements


def as_us(command: dict[int, bytes], tag: int, default: int | None = None) -> int:
    value = command.get(tag)
    if value is None and default is not None:
        return default
    if value is None or len(value) != 2:
        raise ProtocolError(f"command element {tag:08X} is missing or not a US")
    return int(struct.unpack("<H", value)[0])


def as_uid(command: dict[int, bytes], tag: int) -> str:
    return command.get(tag, b"").decode("ascii", "replace").rstrip("\0 ")


def element(tag: int, value: bytes) -> bytes:
    return ELEMENT_HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def padded(value: bytes) -> bytes:
    return value + b" " if len(value) % 2 else value
