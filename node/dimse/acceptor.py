"""The DICOM upper layer as an association acceptor: one blocking thread per association.

pynetdicom decodes the A-ASSOCIATE-RQ, negotiates the presentation contexts and encodes the
A-ASSOCIATE-AC and -RJ. The data phase is done here: P-DATA-TF reassembly and the C-STORE and
C-ECHO command sets, read and answered straight from the socket. pynetdicom's own acceptor runs
two polling reactors per association (its DUL and its association loop), decodes every command
set into a pydicom Dataset and deep-copies its 120 presentation contexts for each association;
measured with `bench/ingest.py`, that kept the node at 0.13 x storescp, bound on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    PresentationContext,
    StoragePresentationContexts,
    build_context,
    negotiate_as_acceptor,
)

from node.dimse.status import VERIFICATION
from node.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
ASSOCIATION_TIMEOUT_SECONDS = 30.0
"""How long a new connection may take to send its A-ASSOCIATE-RQ."""
NETWORK_TIMEOUT_SECONDS = 60.0
"""How long an established association may stay silent before it is aborted."""

_ASSOCIATE_RQ, _ASSOCIATE_RJ, _P_DATA, _RELEASE_RQ, _ABORT = 0x01, 0x03, 0x04, 0x05, 0x07
_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT_HEADER = struct.Struct("<HHI")
_MAX_ASSOCIATE_RQ_BYTES = 1 << 20
_NO_DATASET = 0x0101
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
UNRECOGNIZED_OPERATION, PROCESSING_FAILURE = 0x0211, 0x0110

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
# A-ABORT provider reasons, PS3.8 9.3.8
ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x02, 0x06


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; the association is aborted."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Association:
    """One accepted association, as the services see it."""

    calling_ae: str
    called_ae: str
    address: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    released: bool = False
    contexts: dict[int, PresentationContext] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ: its command set and the transfer syntax its dataset is encoded in."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    priority: int


@dataclass(frozen=True)
class Reply:
    """The status of a DIMSE response, with an optional Error Comment."""

    status: int
    comment: str | None = None


class Services(Protocol):
    """What the acceptor asks of the node."""

    def admit(self, calling_ae: str, called_ae: str) -> bool: ...

    def opened(self, association: Association) -> None: ...

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply: ...

    def closed(self, association: Association) -> None: ...


def supported_contexts() -> list[PresentationContext]:
    """Verification and every Storage SOP class, in every transfer syntax pydicom knows."""
    storage = [context.abstract_syntax for context in StoragePresentationContexts]
    return [
        build_context(abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for abstract_syntax in (VERIFICATION, *storage)
        if abstract_syntax is not None
    ]


class Acceptor(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Listens, and serves each connection as one association in its own thread."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        services: Services,
        max_pdu_size: int,
        max_associations: int,
        reuse_port: bool = False,
    ) -> None:
        self.services = services
        self.max_pdu_size = max_pdu_size
        self.max_associations = max_associations
        self.contexts = supported_contexts()
        self.reuse_port = reuse_port
        self._lock = threading.Lock()
        self._open: dict[int, _Connection] = {}
        super().__init__(address, _Connection)

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop_listening(self) -> None:
        """Refuse new associations (the listening socket is closed)."""
        self.shutdown()
        self.server_close()

    def abort_all(self) -> None:
        """Abort every open association."""
        with self._lock:
            connections = list(self._open.values())
        for connection in connections:
            connection.abort(reason=0)

    def _register(self, connection: _Connection) -> bool:
        """Count a new association in; False once `max_associations` are open."""
        with self._lock:
            if len(self._open) >= self.max_associations:
                return False
            self._open[id(connection)] = connection
            return True

    def _unregister(self, connection: _Connection) -> None:
        with self._lock:
            self._open.pop(id(connection), None)


class _Connection(socketserver.BaseRequestHandler):
    """One association: negotiate, then answer commands until release or abort."""

    server: Acceptor
    request: socket.socket

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()
        self._peer_max_pdu = 0

    def handle(self) -> None:
        address = f"{self.client_address[0]}:{self.client_address[1]}"
        try:
            association = self._negotiate(address)
        except (OSError, EOFError, ProtocolError) as exc:
            self.server._unregister(self)
            log.warning("connection from %s dropped before association: %s", address, exc)
            return
        if association is None:
            return
        try:
            self.server.services.opened(association)
            self._serve(association)
        except ProtocolError as exc:
            log.warning("association %s aborted: %s", association.id, exc)
            self.abort(exc.reason)
        except (OSError, EOFError) as exc:
            log.info("association %s: connection lost: %s", association.id, exc)
        finally:
            self.server._unregister(self)
            self.server.services.closed(association)

    def abort(self, reason: int) -> None:
        """Send an A-ABORT (from the service provider when `reason` is given, else from the
        service user) and close the connection; a blocked read ends."""
        source = 0x02 if reason else 0x00
        with contextlib.suppress(OSError):
            self._send(bytes([_ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason]))
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_RDWR)

    def _negotiate(self, address: str) -> Association | None:
        self.request.settimeout(ASSOCIATION_TIMEOUT_SECONDS)
        pdu_type, body = self._read_pdu(limit=_MAX_ASSOCIATE_RQ_BYTES)
        if pdu_type != _ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}")
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(_PDU_HEADER.pack(pdu_type, len(body)) + bytes(body))
        request = pdu.to_primitive()
        calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
        rejection = None
        if request.application_context_name != APPLICATION_CONTEXT:
            rejection = REJECT_APPLICATION_CONTEXT
        elif not self.server.services.admit(calling, called):
            rejection = REJECT_CALLING_AE
        elif not self.server._register(self):
            rejection = REJECT_LOCAL_LIMIT
        if rejection is not None:
            log.warning(
                "association from %s (%s -> %s) rejected: %s",
                address,
                calling,
                called,
                _REJECTION_REASONS[rejection],
            )
            self._reject(*rejection)
            return None
        association = Association(calling, called, address)
        self._peer_max_pdu = request.maximum_length_received or 0
        self._accept(request, association)
        return association

    def _accept(self, request: A_ASSOCIATE, association: Association) -> None:
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        results, role_replies = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.server.contexts, roles
        )
        association.contexts = {
            cx.context_id: cx for cx in results if cx.result == 0 and cx.context_id is not None
        }
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.server.max_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        reply = A_ASSOCIATE()
        reply.application_context_name = APPLICATION_CONTEXT
        reply.calling_ae_title = request.calling_ae_title
        reply.called_ae_title = request.called_ae_title
        reply.result = 0x00
        reply.result_source = 0x01
        reply.presentation_context_definition_results_list = results
        reply.user_information = [maximum, implementation, version, *role_replies]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(reply)
        self._send(pdu.encode())

    def _reject(self, result: int, source: int, diagnostic: int) -> None:
        reply = A_ASSOCIATE()
        reply.result, reply.result_source, reply.diagnostic = result, source, diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(reply)
        self._send(pdu.encode())
        self.request.shutdown(socket.SHUT_WR)

    def _serve(self, association: Association) -> None:
        self.request.settimeout(NETWORK_TIMEOUT_SECONDS)
        for context_id, command, dataset in self._messages(association):
            reply = self._dispatch(association, context_id, command, dataset)
            self._respond(context_id, command, reply)
        association.released = True

    def _messages(
        self, association: Association
    ) -> Iterator[tuple[int, dict[int, bytes], bytes | None]]:
        """Each complete DIMSE message: its context, command elements and dataset bytes."""
        command_parts: list[memoryview] = []
        dataset_parts: list[memoryview] = []
        command: dict[int, bytes] | None = None
        while True:
            pdu_type, body = self._read_pdu(limit=self._receive_limit())
            if pdu_type == _RELEASE_RQ:
                self._send(_RELEASE_RP)
                return
            if pdu_type == _ABORT:
                raise EOFError("aborted by the peer")
            if pdu_type != _P_DATA:
                raise ProtocolError(f"unexpected PDU type {pdu_type:#04x}", ABORT_UNEXPECTED_PDU)
            for context_id, is_command, is_last, value in _pdvs(body):
                if context_id not in association.contexts:
                    raise ProtocolError(f"presentation context {context_id} was not accepted")
                if is_command:
                    if command is not None:
                        raise ProtocolError("a command fragment arrived inside a dataset")
                    command_parts.append(value)
                    if not is_last:
                        continue
                    command = _command_elements(b"".join(command_parts))
                    command_parts.clear()
                    if _as_us(command, 0x00000800) != _NO_DATASET:
                        continue
                    yield context_id, command, None
                else:
                    if command is None:
                        raise ProtocolError("a dataset fragment arrived before its command")
                    dataset_parts.append(value)
                    if not is_last:
                        continue
                    dataset = b"".join(dataset_parts)
                    dataset_parts.clear()
                    yield context_id, command, dataset
                command = None

    def _dispatch(
        self,
        association: Association,
        context_id: int,
        command: dict[int, bytes],
        dataset: bytes | None,
    ) -> Reply:
        field_ = _as_us(command, 0x00000100)
        context = association.contexts[context_id]
        if field_ == C_ECHO_RQ and context.abstract_syntax == VERIFICATION:
            return Reply(0x0000)
        if field_ != C_STORE_RQ or context.abstract_syntax == VERIFICATION:
            return Reply(UNRECOGNIZED_OPERATION, "only C-STORE and C-ECHO are served")
        if dataset is None:
            return Reply(0xC000, "C-STORE-RQ without a dataset")
        request = StoreRequest(
            message_id=_as_us(command, 0x00000110),
            sop_class_uid=_as_uid(command, 0x00000002),
            sop_instance_uid=_as_uid(command, 0x00001000),
            transfer_syntax=UID(context.transfer_syntax[0]),
            priority=_as_us(command, 0x00000700, default=0),
        )
        try:
            return self.server.services.store(association, request, dataset)
        except Exception:  # a fault of ours must not take the association down with it
            log.exception("association %s: storing %s failed", association.id, request.message_id)
            return Reply(PROCESSING_FAILURE, "processing failure in the receiver")

    def _respond(self, context_id: int, command: dict[int, bytes], reply: Reply) -> None:
        elements = [
            (0x00000002, command.get(0x00000002, b"")),
            (0x00000100, struct.pack("<H", _as_us(command, 0x00000100) | 0x8000)),
            (0x00000120, command.get(0x00000110, b"\0\0")),
            (0x00000800, struct.pack("<H", _NO_DATASET)),
            (0x00000900, struct.pack("<H", reply.status)),
        ]
        if reply.comment:
            elements.append((0x00000902, _padded(reply.comment[:64].encode("ascii", "replace"))))
        if 0x00001000 in command:
            elements.append((0x00001000, command[0x00001000]))
        body = b"".join(_element(tag, value) for tag, value in elements)
        encoded = _element(0x00000000, struct.pack("<I", len(body))) + body
        self._send(_p_data(context_id, encoded, self._peer_max_pdu))

    def _receive_limit(self) -> int:
        """The largest PDU body accepted: what we negotiated, with room for a sloppy peer."""
        maximum = self.server.max_pdu_size
        return 2 * maximum if maximum else 0

    def _read_pdu(self, limit: int) -> tuple[int, bytearray]:
        header = self._read_exactly(6)
        pdu_type, length = _PDU_HEADER.unpack(header)
        if limit and length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds the {limit} negotiated")
        return pdu_type, self._read_exactly(length)

    def _read_exactly(self, count: int) -> bytearray:
        """`count` bytes straight into one buffer; EOFError if the peer closes first."""
        buffer = bytearray(count)
        view = memoryview(buffer)
        received = 0
        while received < count:
            read = self.request.recv_into(view[received:], count - received)
            if read == 0:
                raise EOFError("connection closed by the peer")
            received += read
        return buffer

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.request.sendall(data)


_REJECTION_REASONS = {
    REJECT_CALLING_AE: "calling AE title not recognised",
    REJECT_APPLICATION_CONTEXT: "application context name not supported",
    REJECT_LOCAL_LIMIT: "local limit of associations exceeded",
}


def _pdvs(body: bytearray) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """The presentation data values of a P-DATA-TF body: context, command?, last?, value."""
    view = memoryview(body)
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            raise ProtocolError("truncated presentation data value item")
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise ProtocolError(f"presentation data value item of invalid length {length}")
        yield context_id, bool(control & 0x01), bool(control & 0x02), view[offset + 6 : end]
        offset = end


def _p_data(context_id: int, message: bytes, peer_max_pdu: int) -> bytes:
    """A command as P-DATA-TF PDUs, each within the peer's maximum PDU length."""
    room = peer_max_pdu - 6 if peer_max_pdu else len(message)
    room = max(room, 1)
    pdus = []
    for start in range(0, len(message), room):
        fragment = message[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(message) else 0)
        pdv = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(_PDU_HEADER.pack(_P_DATA, len(pdv)) + pdv)
    return b"".join(pdus)


def _command_elements(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (Implicit VR Little Endian, PS3.7 6.3.1) by tag."""
    elements = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("truncated command set")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += 8
        if offset + length > len(data):
            raise ProtocolError(f"command element ({group:04X},{element:04X}) is truncated")
        elements[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return elements


def _as_us(command: dict[int, bytes], tag: int, default: int | None = None) -> int:
    value = command.get(tag)
    if value is None and default is not None:
        return default
    if value is None or len(value) != 2:
        raise ProtocolError(f"command element {tag:08X} is missing or not a US")
    return int(struct.unpack("<H", value)[0])


def _as_uid(command: dict[int, bytes], tag: int) -> str:
    return command.get(tag, b"").decode("ascii", "replace").rstrip("\0 ")


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _padded(value: bytes) -> bytes:
    return value + b" " if len(value) % 2 else value
