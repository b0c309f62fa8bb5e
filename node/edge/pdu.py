"""The upper-layer PDUs (PS3.8 9.3): their headers, the A-ASSOCIATE-RQ as pynetdicom decodes
it, the presentation data values of a P-DATA-TF in and out, and the one error a peer's bytes
raise, `ProtocolError` (the association is aborted with its reason)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from node.edge.protocol import AbortReason, MessageControl, PduType

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")
RELEASE_RP = PDU_HEADER.pack(PduType.RELEASE_RP, 4) + b"\0\0\0\0"
PDU_TYPES = frozenset(PduType)


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; the association is aborted."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER):
        super().__init__(message)
        self.reason = reason


def decode_associate_rq(body: bytearray) -> A_ASSOCIATE:
    """The A-ASSOCIATE-RQ as pynetdicom reads it; ProtocolError for anything malformed (its
    decoder raises AssertionError, KeyError, struct.error, UnicodeDecodeError...)."""
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(PDU_HEADER.pack(PduType.ASSOCIATE_RQ, len(body)) + bytes(body))
        request = pdu.to_primitive()
        request.calling_ae_title.strip()
        request.called_ae_title.strip()
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {detail}") from exc
    return request


def check_contexts(proposed: list[PresentationContext]) -> None:
    """Each proposed presentation context names one abstract syntax and a transfer syntax."""
    if not proposed:
        raise ProtocolError("A-ASSOCIATE-RQ proposes no presentation context")
    for context in proposed:
        if context.context_id is None or not context.abstract_syntax:
            raise ProtocolError(f"presentation context {context.context_id} has no abstract syntax")
        if not context.transfer_syntax:
            raise ProtocolError(f"presentation context {context.context_id} has no transfer syntax")


def pdvs(body: bytearray) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """The presentation data values of a P-DATA-TF body: context, command?, last?, value."""
    view = memoryview(body)
    offset = 0
    if not body:
        raise ProtocolError("P-DATA-TF without presentation data values")
    while offset < len(body):
        if offset + 6 > len(body):
            raise ProtocolError("truncated presentation data value item")
        length, context_id, control = PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise ProtocolError(f"presentation data value item of invalid length {length}")
        flags = MessageControl(control & (MessageControl.COMMAND | MessageControl.LAST))
        yield (
            context_id,
            MessageControl.COMMAND in flags,
            MessageControl.LAST in flags,
            view[offset + 6 : end],
        )
        offset = end


def p_data(context_id: int, message: bytes, peer_max_pdu: int, command: bool = True) -> bytes:
    """A command set (or a dataset) as P-DATA-TF PDUs, each within the peer's maximum PDU
    length."""
    room = peer_max_pdu - 6 if peer_max_pdu else len(message)
    room = max(room, 1)
    pdus = []
    for start in range(0, len(message), room):
        fragment = message[start : start + room]
        control = MessageControl.COMMAND if command else MessageControl(0)
        if start + room >= len(message):
            control |= MessageControl.LAST
        pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(PDU_HEADER.pack(PduType.P_DATA_TF, len(pdv)) + pdv)
    return b"".join(pdus)
