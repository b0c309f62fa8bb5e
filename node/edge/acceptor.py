"""The DICOM upper layer as an association acceptor: one blocking thread per association, its
state machine from the first byte to release or abort. The PDUs are `pdu`'s, the command sets
`messages`', what a peer may take `limits`'.

pynetdicom decodes the A-ASSOCIATE-RQ, negotiates the presentation contexts and encodes the
A-ASSOCIATE-AC and -RJ. The data phase is done here: P-DATA-TF reassembly and the C-STORE and
C-ECHO command sets, read and answered straight from the socket, and the N-EVENT-REPORTs of
storage commitment; C-FIND, C-MOVE and C-GET are handed to the services with an `_Exchange`
for their responses, their C-CANCEL and (C-GET) the C-STORE sub-operations on the same
association. pynetdicom's own acceptor runs two polling reactors per association (its DUL
and its association loop), decodes every command set into a pydicom Dataset and deep-copies
its 120 presentation contexts for each association; measured with `bench/ingest.py`, that
kept the node at 0.13 x storescp, bound on the CPU.

Every peer may be broken or hostile. What it sends is read against deadlines for whole PDUs
(ARTIM for the A-ASSOCIATE-RQ, PS3.8 9.1.5; the network timeout after it), into buffers that
grow only as bytes arrive; connections that have not associated yet are capped; anything it
gets wrong ends in an A-ASSOCIATE-RJ or A-ABORT and one log line, and frees its slot.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
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

from node.edge.commitment import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    BadReport,
    CommitmentReport,
    EventReportStatus,
    report_of,
)
from node.edge.limits import (
    FIRST_READ,
    MAX_ASSOCIATE_RQ_BYTES,
    MAX_COMMAND_BYTES,
    READ_STEP,
    Deadline,
    Limits,
)
from node.edge.messages import (
    QueryRequest,
    Reply,
    StoreRequest,
    as_uid,
    as_us,
    command_elements,
    query_request,
    response,
    store_request,
    store_rq,
    us,
)
from node.edge.pdu import (
    PDU_HEADER,
    PDU_TYPES,
    RELEASE_RP,
    ProtocolError,
    check_contexts,
    decode_associate_rq,
    p_data,
    pdvs,
)
from node.edge.protocol import (
    ADDRESS_LIMIT_EXCEEDED,
    APPLICATION_CONTEXT,
    LOCAL_LIMIT_EXCEEDED,
    NO_DATA_SET,
    UNSUPPORTED_APPLICATION_CONTEXT,
    VERIFICATION,
    AbortReason,
    AbortSource,
    AssociateResult,
    CommandField,
    CommandTag,
    PduType,
    Rejection,
    ResultSource,
)
from node.edge.qr import (
    PATIENT_ROOT,
    QUERY_RETRIEVE_CLASSES,
    QUERY_SYNTAXES,
    STUDY_ROOT,
    Exchange,
    Sendable,
    SubOperations,
    decoded,
    encoded,
)
from node.edge.status import RetrieveStatus, Status
from node.ops.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)


@dataclass
class Association:
    """One accepted association, as the services see it."""

    calling_ae: str
    called_ae: str
    address: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    released: bool = False
    contexts: dict[int, PresentationContext] = field(default_factory=dict)


class Services(Protocol):
    """What the acceptor asks of the node."""

    def admit(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None: ...

    def opened(self, association: Association) -> None: ...

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply: ...

    def query_retrieve(
        self, association: Association, request: QueryRequest, exchange: Exchange
    ) -> None:
        """Answer a C-FIND, C-MOVE or C-GET through `exchange`."""

    def commitment_report(self, association: Association, report: CommitmentReport) -> Reply:
        """Record a peer's storage commitment report."""

    def closed(self, association: Association) -> None: ...


QUERY_COMMANDS = {
    CommandField.C_FIND_RQ: frozenset({PATIENT_ROOT[CommandField.C_FIND_RQ],
                                       STUDY_ROOT[CommandField.C_FIND_RQ]}),
    CommandField.C_MOVE_RQ: frozenset({PATIENT_ROOT[CommandField.C_MOVE_RQ],
                                       STUDY_ROOT[CommandField.C_MOVE_RQ]}),
    CommandField.C_GET_RQ: frozenset({PATIENT_ROOT[CommandField.C_GET_RQ],
                                      STUDY_ROOT[CommandField.C_GET_RQ]}),
}  # fmt: skip
"""Each query/retrieve command, and the SOP classes it is served on."""
C_STORE_RSP = CommandField.C_STORE_RQ | CommandField.RESPONSE
REJECTED_CLOSE_SECONDS = 2.0
"""How long a rejected requestor is given to close the connection itself."""


def supported_contexts() -> list[PresentationContext]:
    """Verification and every Storage SOP class, in every transfer syntax pydicom knows (the
    storage classes also in the SCU role, for C-GET); the Query/Retrieve classes, and Storage
    Commitment for the reports of the peers the node sends to (the peer as its SCP), in
    Implicit and Explicit VR Little Endian."""
    contexts = [build_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)]
    contexts.extend(build_context(uid, list(QUERY_SYNTAXES)) for uid in QUERY_RETRIEVE_CLASSES)
    commitment = build_context(STORAGE_COMMITMENT, list(COMMITMENT_SYNTAXES))
    commitment.scu_role = commitment.scp_role = True
    contexts.append(commitment)
    for storage in StoragePresentationContexts:
        if storage.abstract_syntax is None:
            continue
        context = build_context(storage.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        context.scu_role = context.scp_role = True  # the peer may take C-GET's C-STOREs
        contexts.append(context)
    return contexts


class Acceptor(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Listens, and serves each connection as one association in its own thread; with
    `tls`, each connection is a TLS connection first."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        services: Services,
        limits: Limits,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.services = services
        self.limits = limits
        self.contexts = supported_contexts()
        self.reuse_port = reuse_port
        self.tls = tls
        self._lock = threading.Lock()
        self._open: dict[int, _Connection] = {}
        self._pending: dict[int, socket.socket] = {}  # oldest first
        super().__init__(address, _Connection)

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def open_associations(self) -> int:
        with self._lock:
            return len(self._open)

    @property
    def pending_connections(self) -> int:
        with self._lock:
            return len(self._pending)

    def verify_request(self, request: object, client_address: object) -> bool:
        """Count a new connection in. Past `max_pending`, the connection that has been
        negotiating longest is closed to make room: a sender sends its A-ASSOCIATE-RQ at once,
        so the oldest is the one dawdling, and trickling peers only push each other out."""
        assert isinstance(request, socket.socket)
        with self._lock:
            oldest = None
            if len(self._pending) >= self.limits.max_pending:
                oldest = self._pending.pop(next(iter(self._pending)))
            self._pending[id(request)] = request
        if oldest is not None:
            log.warning(
                "connection from %s closed: the oldest of %d still negotiating",
                _address(_peer_of(oldest)),
                self.limits.max_pending,
            )
            with contextlib.suppress(OSError):
                oldest.shutdown(socket.SHUT_RDWR)
        return True

    def handle_error(self, request: object, client_address: object) -> None:
        """Never a traceback for what a peer did (connections handle their own errors)."""
        log.error("connection from %s failed in the listener", _address(client_address))

    def stop_listening(self) -> None:
        """Refuse new associations (the listening socket is closed)."""
        self.shutdown()
        self.server_close()

    def abort_all(self) -> None:
        """Abort every open association."""
        with self._lock:
            connections = list(self._open.values())
        for connection in connections:
            connection.abort(AbortReason.NOT_SPECIFIED, AbortSource.SERVICE_USER)

    def _associated(self, connection: _Connection) -> Rejection | None:
        """A negotiating connection becomes an association; the rejection once
        `max_associations` are open, or `max_per_address` from its address (it stays counted
        as negotiating until it ends)."""
        with self._lock:
            if len(self._open) >= self.limits.max_associations:
                return LOCAL_LIMIT_EXCEEDED
            host = connection.peer_host
            if sum(c.peer_host == host for c in self._open.values()) >= self.limits.max_per_address:
                return ADDRESS_LIMIT_EXCEEDED
            self._pending.pop(connection.socket_id, None)
            self._open[connection.socket_id] = connection
            return None

    def _ended(self, connection: _Connection) -> None:
        with self._lock:
            self._pending.pop(connection.socket_id, None)
            self._open.pop(connection.socket_id, None)


class _Connection(socketserver.BaseRequestHandler):
    """One association: negotiate, then answer commands until release or abort."""

    server: Acceptor
    request: socket.socket

    def finish(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):  # socketserver closes only the raw socket
            with contextlib.suppress(OSError):
                self.request.close()

    def setup(self) -> None:
        self.socket_id = id(self.request)  # the accepted socket's (TLS wraps it later)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()
        self._peer_max_pdu = 0
        self._heard = False
        """Whether the peer has sent a byte (a port probe never does)."""
        self._address = _address(self.client_address)
        self.peer_host = str(self.client_address[0]) if self.client_address else ""

    def handle(self) -> None:
        association = None
        try:
            if self.server.tls is not None:
                self._start_tls()
            association = self._negotiate()
            if association is not None:
                self.server.services.opened(association)
                self._serve(association)
        except ProtocolError as exc:
            self._log_end(association, f"aborted: {exc}")
            self.abort(exc.reason)
        except Deadline as exc:
            self._log_end(association, f"aborted: {exc}")
            self.abort(AbortReason.NOT_SPECIFIED)
        except (OSError, EOFError) as exc:
            # A health check or load balancer probing the port: not worth a line a probe.
            level = logging.INFO if self._heard else logging.DEBUG
            self._log_end(association, f"connection lost: {exc}", level=level)
        except Exception as exc:  # whatever a peer's bytes provoke: one line, never a trace
            self._log_end(association, f"aborted after {type(exc).__name__}: {exc}")
            self.abort(AbortReason.NOT_SPECIFIED)
        finally:
            self.server._ended(self)
            if association is not None:
                self.server.services.closed(association)

    def abort(
        self, reason: AbortReason, source: AbortSource = AbortSource.SERVICE_PROVIDER
    ) -> None:
        """Send an A-ABORT and close the connection; a blocked read ends."""
        body = bytes([0, 0, source, reason if source == AbortSource.SERVICE_PROVIDER else 0])
        with contextlib.suppress(OSError, ValueError):
            self._send(PDU_HEADER.pack(PduType.ABORT, len(body)) + body)
        with contextlib.suppress(OSError, ValueError):
            self.request.shutdown(socket.SHUT_RDWR)

    def _log_end(
        self, association: Association | None, what: str, level: int = logging.WARNING
    ) -> None:
        if association is None:
            log.log(level, "connection from %s before association: %s", self._address, what)
        else:
            log.log(level, "association %s (%s): %s", association.id, association.calling_ae, what)

    def _start_tls(self) -> None:
        assert self.server.tls is not None
        self.request.settimeout(self.server.limits.association_timeout)
        try:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        except ssl.SSLError as exc:
            self._heard = not isinstance(exc, ssl.SSLEOFError)  # a probe sends no ClientHello
            raise OSError(f"TLS handshake failed: {exc.reason or exc}") from exc

    def _negotiate(self) -> Association | None:
        limits = self.server.limits
        deadline = time.monotonic() + limits.association_timeout
        pdu_type, body = self._read_pdu(MAX_ASSOCIATE_RQ_BYTES, deadline, "A-ASSOCIATE-RQ")
        if pdu_type != PduType.ASSOCIATE_RQ:
            raise ProtocolError(
                f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}", AbortReason.UNEXPECTED_PDU
            )
        request = decode_associate_rq(body)
        calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
        rejection = None
        if request.application_context_name != APPLICATION_CONTEXT:
            rejection = UNSUPPORTED_APPLICATION_CONTEXT
        else:
            rejection = self.server.services.admit(calling, called, self._address)
        if rejection is None:
            rejection = self.server._associated(self)
        if rejection is not None:
            log.warning(
                "association from %s (%s -> %s) rejected: %s",
                self._address,
                calling,
                called,
                rejection.meaning,
            )
            self._reject(rejection)
            return None
        association = Association(calling, called, self._address)
        self._peer_max_pdu = request.maximum_length_received or 0
        self._accept(request, association)
        return association

    def _accept(self, request: A_ASSOCIATE, association: Association) -> None:
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        proposed = request.presentation_context_definition_list
        check_contexts(proposed)
        contexts = self.server.contexts
        if any(scp for _, scp in roles.values()):
            contexts = _in_their_order(proposed, contexts, roles)
        try:
            results, role_replies = negotiate_as_acceptor(proposed, contexts, roles)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"presentation contexts cannot be negotiated: {exc}") from exc
        association.contexts = {
            cx.context_id: cx for cx in results if cx.result == 0 and cx.context_id is not None
        }
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.server.limits.announced_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        reply = A_ASSOCIATE()
        reply.application_context_name = APPLICATION_CONTEXT
        reply.calling_ae_title = request.calling_ae_title
        reply.called_ae_title = request.called_ae_title
        reply.result = AssociateResult.ACCEPTED
        reply.result_source = ResultSource.SERVICE_USER
        reply.presentation_context_definition_results_list = results
        reply.user_information = [maximum, implementation, version, *role_replies]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(reply)
        self._send(pdu.encode())

    def _reject(self, rejection: Rejection) -> None:
        reply = A_ASSOCIATE()
        reply.result = rejection.result
        reply.result_source = rejection.source
        reply.diagnostic = rejection.reason
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(reply)
        self._send(pdu.encode())
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_WR)
            self._await_close(REJECTED_CLOSE_SECONDS)

    def _await_close(self, seconds: float) -> None:
        """Wait (bounded) for the requestor to close the connection (PS3.8 Sta13): a
        connection closed first by us can reach it as a reset that discards the A-ASSOCIATE-RJ
        still unread, and the peer sees an abort where it was told why it was rejected."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.request.settimeout(left)
            if not self.request.recv(4096):
                return

    def _serve(self, association: Association) -> None:
        messages = self._messages(association)
        for context_id, command, dataset in messages:
            field_ = as_us(command, CommandTag.COMMAND_FIELD)
            if field_ == CommandField.C_CANCEL_RQ:
                continue  # for a request already answered
            if field_ in QUERY_COMMANDS:
                self._query_retrieve(association, messages, context_id, command, dataset)
                continue
            if field_ == CommandField.N_EVENT_REPORT_RQ:
                self._event_report(association, context_id, command, dataset)
                continue
            reply = self._dispatch(association, context_id, command, dataset)
            self._respond(context_id, command, reply)
        association.released = True

    def _query_retrieve(
        self,
        association: Association,
        messages: Iterator[tuple[int, dict[int, bytes], bytes | None]],
        context_id: int,
        command: dict[int, bytes],
        dataset: bytes | None,
    ) -> None:
        context = association.contexts[context_id]
        field_ = CommandField(as_us(command, CommandTag.COMMAND_FIELD))
        if context.abstract_syntax not in QUERY_COMMANDS[field_]:
            comment = f"{field_.name} is not served on {context.abstract_syntax}"
            self._respond(context_id, command, Reply(Status.SOP_CLASS_NOT_SUPPORTED, comment))
            return
        if dataset is None:
            comment = f"{field_.name} without an identifier"
            self._respond(context_id, command, Reply(RetrieveStatus.UNABLE_TO_PROCESS, comment))
            return
        request = query_request(command, dataset, UID(context.transfer_syntax[0]))
        exchange = _Exchange(self, association, messages, context_id, command)
        try:
            self.server.services.query_retrieve(association, request, exchange)
        except (OSError, EOFError, ProtocolError, Deadline):
            raise
        except Exception:  # a fault of ours must not take the association down with it
            log.exception("association %s: %s failed", association.id, field_.name)
            if not exchange.answered:
                comment = "processing failure in the query/retrieve SCP"
                exchange.respond(RetrieveStatus.UNABLE_TO_PROCESS, comment=comment)

    def _event_report(
        self,
        association: Association,
        context_id: int,
        command: dict[int, bytes],
        dataset: bytes | None,
    ) -> None:
        """A storage commitment report: recorded by the services, answered with their
        status (the Event Type ID echoed, as PS3.7 10.3.1 has it)."""
        context = association.contexts[context_id]
        event_type = as_us(command, CommandTag.EVENT_TYPE_ID, default=0)
        extra: dict[int, bytes] = {CommandTag.EVENT_TYPE_ID: us(event_type)}
        instance = as_uid(command, CommandTag.AFFECTED_SOP_INSTANCE_UID)
        if context.abstract_syntax != STORAGE_COMMITMENT:
            comment = "N-EVENT-REPORT is taken for Storage Commitment only"
            reply = Reply(EventReportStatus.NO_SUCH_SOP_CLASS, comment)
        elif instance != STORAGE_COMMITMENT_INSTANCE:
            reply = Reply(EventReportStatus.NO_SUCH_SOP_INSTANCE, f"SOP Instance {instance[:40]}")
        else:
            implicit = context.transfer_syntax[0] == COMMITMENT_SYNTAXES[0]
            try:
                report = report_of(event_type, dataset, implicit)
            except BadReport as exc:
                reply = Reply(exc.status, str(exc))
            else:
                reply = self._recorded(association, report)
        self._respond(context_id, command, reply, extra)

    def _recorded(self, association: Association, report: CommitmentReport) -> Reply:
        try:
            return self.server.services.commitment_report(association, report)
        except Exception:  # a fault of ours must not take the association down with it
            log.exception("association %s: a storage commitment report failed", association.id)
            return Reply(EventReportStatus.PROCESSING_FAILURE, "the report cannot be recorded")

    def _messages(
        self, association: Association
    ) -> Iterator[tuple[int, dict[int, bytes], bytes | None]]:
        """Each complete DIMSE message: its context, command elements and dataset bytes."""
        limits = self.server.limits
        command_parts: list[memoryview] = []
        dataset_parts: list[memoryview] = []
        dataset_bytes = 0
        command: dict[int, bytes] | None = None
        message_context: int | None = None
        message_started: float | None = None
        message_bytes = 0
        while True:
            deadline, what = time.monotonic() + limits.network_timeout, "PDU"
            if message_started is not None:
                whole_by = limits.message_deadline(message_started, message_bytes)
                if whole_by < deadline:
                    deadline, what = whole_by, "message at node.min_transfer_kbps"
            pdu_type, body = self._read_pdu(limits.receive_limit, deadline, what)
            if pdu_type == PduType.RELEASE_RQ:
                if command is not None or command_parts:
                    raise ProtocolError("A-RELEASE-RQ inside a message", AbortReason.UNEXPECTED_PDU)
                self.server._ended(self)  # before the reply: the peer may associate again at once
                self._send(RELEASE_RP)
                return
            if pdu_type == PduType.ABORT:
                raise EOFError("aborted by the peer")
            if pdu_type != PduType.P_DATA_TF:
                raise ProtocolError(
                    f"unexpected PDU type {pdu_type:#04x}", AbortReason.UNEXPECTED_PDU
                )
            if message_started is None:
                message_started = time.monotonic()
            message_bytes += len(body)
            for context_id, is_command, is_last, value in pdvs(body):
                if context_id not in association.contexts:
                    raise ProtocolError(f"presentation context {context_id} was not accepted")
                if message_context is not None and context_id != message_context:
                    raise ProtocolError(
                        f"one message on two presentation contexts ({message_context}, "
                        f"{context_id})"
                    )
                message_context = context_id
                if is_command:
                    if command is not None:
                        raise ProtocolError("a command fragment arrived inside a dataset")
                    command_parts.append(value)
                    if sum(len(part) for part in command_parts) > MAX_COMMAND_BYTES:
                        raise ProtocolError("command set larger than 64 KiB")
                    if not is_last:
                        continue
                    command = command_elements(b"".join(command_parts))
                    command_parts.clear()
                    if as_us(command, CommandTag.COMMAND_DATA_SET_TYPE) != NO_DATA_SET:
                        continue
                    yield context_id, command, None
                else:
                    if command is None:
                        raise ProtocolError("a dataset fragment arrived before its command")
                    dataset_parts.append(value)
                    dataset_bytes += len(value)
                    if dataset_bytes > limits.max_dataset_bytes:
                        raise ProtocolError(
                            f"dataset larger than {limits.max_dataset_bytes >> 20} MiB"
                        )
                    if not is_last:
                        continue
                    dataset = b"".join(dataset_parts)
                    dataset_parts.clear()
                    dataset_bytes = 0
                    yield context_id, command, dataset
                command = None
                message_context = None
                message_started, message_bytes = None, 0

    def _dispatch(
        self,
        association: Association,
        context_id: int,
        command: dict[int, bytes],
        dataset: bytes | None,
    ) -> Reply:
        field_ = as_us(command, CommandTag.COMMAND_FIELD)
        context = association.contexts[context_id]
        if field_ == CommandField.C_ECHO_RQ and context.abstract_syntax == VERIFICATION:
            return Reply(Status.SUCCESS)
        if field_ != CommandField.C_STORE_RQ or context.abstract_syntax == VERIFICATION:
            return Reply(
                Status.UNRECOGNIZED_OPERATION,
                "C-STORE, C-ECHO, C-FIND, C-MOVE, C-GET, N-EVENT-REPORT are served",
            )
        if dataset is None:
            return Reply(Status.CANNOT_UNDERSTAND, "C-STORE-RQ without a dataset")
        request = store_request(command, UID(context.transfer_syntax[0]))
        if request.sop_class_uid != context.abstract_syntax:
            return Reply(
                Status.SOP_CLASS_NOT_SUPPORTED,
                "Affected SOP Class UID differs from the presentation context's",
            )
        try:
            return self.server.services.store(association, request, dataset)
        except Exception:  # a fault of ours must not take the association down with it
            log.exception("association %s: storing %s failed", association.id, request.message_id)
            return Reply(Status.PROCESSING_FAILURE, "processing failure in the receiver")

    def _respond(
        self,
        context_id: int,
        command: dict[int, bytes],
        reply: Reply,
        extra: dict[int, bytes] | None = None,
    ) -> None:
        self._send(p_data(context_id, response(command, reply, extra), self._peer_max_pdu))

    def _read_pdu(self, limit: int, deadline: float, what: str) -> tuple[int, bytearray]:
        """One whole PDU, or Deadline if it has not all arrived by `deadline`."""
        header = self._read_exactly(PDU_HEADER.size, deadline, what)
        pdu_type, length = PDU_HEADER.unpack(header)
        if pdu_type not in PDU_TYPES:
            raise ProtocolError(f"unknown PDU type {pdu_type:#04x}", AbortReason.UNRECOGNIZED_PDU)
        if length > limit:
            raise ProtocolError(f"{what} of {length} bytes exceeds the {limit} accepted")
        return pdu_type, self._read_exactly(length, deadline, what)

    def _read_exactly(self, count: int, deadline: float, what: str) -> bytearray:
        """`count` bytes into a buffer that grows as they arrive."""
        buffer = bytearray(min(count, FIRST_READ))
        received = 0
        while received < count:
            if received == len(buffer):
                buffer.extend(bytes(min(count - received, len(buffer), READ_STEP)))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Deadline(f"{what} not received whole in time ({received} of {count} bytes)")
            self.request.settimeout(remaining)
            try:
                with memoryview(buffer) as view:
                    read = self.request.recv_into(view[received:], len(buffer) - received)
            except TimeoutError as exc:
                raise Deadline(
                    f"{what} not received whole in time ({received} of {count} bytes)"
                ) from exc
            if read == 0:
                raise EOFError("connection closed by the peer")
            self._heard = True
            received += read
        return buffer

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.request.settimeout(self.server.limits.network_timeout)
            self.request.sendall(data)


def _in_their_order(
    proposed: list[PresentationContext],
    supported: list[PresentationContext],
    roles: dict[UID, tuple[bool | None, bool | None]],
) -> list[PresentationContext]:
    """`supported`, where the peer takes the SCP role (C-GET's C-STOREs come to it): its
    transfer syntaxes in the order the peer proposed them, so it gets the stored bytes in
    the syntax it prefers (pynetdicom picks by the acceptor's order)."""
    theirs: dict[str, list[str]] = {}
    for context in proposed:
        if roles.get(UID(context.abstract_syntax or ""), (None, None))[1]:
            theirs.setdefault(str(context.abstract_syntax), list(context.transfer_syntax))
    reordered = []
    for context in supported:
        order = theirs.get(str(context.abstract_syntax))
        if order is None:
            reordered.append(context)
            continue
        ours = set(context.transfer_syntax)
        syntaxes: list[str | UID] = [syntax for syntax in order if syntax in ours]
        preferred = build_context(str(context.abstract_syntax), syntaxes or list(ours))
        preferred.scu_role, preferred.scp_role = context.scu_role, context.scp_role
        reordered.append(preferred)
    return reordered


class _Exchange:
    """One query/retrieve request's side of its association: its responses (the last one
    final), the C-CANCEL the peer may send meanwhile, and C-GET's C-STORE sub-operations."""

    def __init__(
        self,
        connection: _Connection,
        association: Association,
        messages: Iterator[tuple[int, dict[int, bytes], bytes | None]],
        context_id: int,
        command: dict[int, bytes],
    ) -> None:
        self._connection = connection
        self._association = association
        self._messages = messages
        self._context_id = context_id
        self._command = command
        self._message_id = as_us(command, CommandTag.MESSAGE_ID)
        self._implicit = association.contexts[context_id].transfer_syntax[0] == QUERY_SYNTAXES[0]
        self._sub_message_id = 0
        self._cancelled = False
        self.answered = False

    def respond(
        self,
        status: int,
        identifier: Dataset | None = None,
        counts: SubOperations | None = None,
        comment: str | None = None,
    ) -> None:
        pending = status in (RetrieveStatus.PENDING, RetrieveStatus.PENDING_WARNING)
        extra: dict[int, bytes] = {}
        if counts is not None:
            if pending or status == RetrieveStatus.CANCELED:
                extra[CommandTag.REMAINING_SUBOPERATIONS] = us(counts.remaining)
            extra[CommandTag.COMPLETED_SUBOPERATIONS] = us(counts.completed)
            extra[CommandTag.FAILED_SUBOPERATIONS] = us(counts.failed)
            extra[CommandTag.WARNING_SUBOPERATIONS] = us(counts.warning)
        message = response(self._command, Reply(status, comment), extra, identifier is not None)
        connection, peer_max = self._connection, self._connection._peer_max_pdu
        data = p_data(self._context_id, message, peer_max)
        if identifier is not None:
            encoded_identifier = encode(identifier, self._implicit, True)
            if encoded_identifier is None:
                raise ValueError("the response identifier cannot be encoded")
            data += p_data(self._context_id, encoded_identifier, peer_max, command=False)
        connection._send(data)
        self.answered = not pending

    def cancelled(self) -> bool:
        """Whether the peer has sent a C-CANCEL-RQ for this request (read if waiting)."""
        while not self._cancelled and self._readable():
            self._take(self._next())
        return self._cancelled

    def store(self, file: Sendable) -> int | str:
        """Send `file` as a C-STORE-RQ on this association, and wait for its response."""
        found = self._context_for(file)
        if isinstance(found, str):
            return found
        context_id, syntax = found
        try:
            if syntax == file.transfer_syntax_uid:
                _, offset = split_dataset(file.path)
                with file.path.open("rb") as stored:
                    stored.seek(offset)
                    data = stored.read()
            else:
                data = encoded(decoded(file.path), UID(syntax))
        except (OSError, ValueError, RuntimeError) as exc:
            return f"the stored file cannot be sent: {exc}"
        self._sub_message_id = self._sub_message_id % 0xFFFF + 1
        command = store_rq(self._sub_message_id, file.sop_class_uid, file.sop_instance_uid)
        peer_max = self._connection._peer_max_pdu
        self._connection._send(
            p_data(context_id, command, peer_max) + p_data(context_id, data, peer_max, False)
        )
        while True:
            answer = self._next()
            field_ = as_us(answer, CommandTag.COMMAND_FIELD)
            responded_to = as_us(answer, CommandTag.MESSAGE_ID_BEING_RESPONDED_TO, default=0)
            if field_ == C_STORE_RSP and responded_to == self._sub_message_id:
                return as_us(answer, CommandTag.STATUS)
            self._take(answer)

    def _context_for(self, file: Sendable) -> tuple[int, str] | str:
        """The accepted context to send `file` on (the node as SCU): in its stored syntax,
        else in an uncompressed one (decoded); or why there is none."""
        usable = [
            (context_id, str(context.transfer_syntax[0]))
            for context_id, context in self._association.contexts.items()
            if context.abstract_syntax == file.sop_class_uid and context.as_scu
        ]
        for preferred in (file.transfer_syntax_uid, *QUERY_SYNTAXES):
            for context_id, syntax in usable:
                if syntax == preferred:
                    return context_id, syntax
        return f"no context for {file.sop_class_uid} was accepted with the peer as C-STORE SCP"

    def _next(self) -> dict[int, bytes]:
        try:
            _, command, _ = next(self._messages)
        except StopIteration:
            raise EOFError("the peer released the association inside an operation") from None
        return command

    def _take(self, command: dict[int, bytes]) -> None:
        """A message that arrived while this request is being answered: its C-CANCEL."""
        field_ = as_us(command, CommandTag.COMMAND_FIELD)
        responded_to = as_us(command, CommandTag.MESSAGE_ID_BEING_RESPONDED_TO, default=0)
        if field_ != CommandField.C_CANCEL_RQ:
            raise ProtocolError(
                f"command {field_:#06x} arrived while message {self._message_id} is being "
                "answered (asynchronous operations are not negotiated)",
                AbortReason.UNEXPECTED_PDU_PARAMETER,
            )
        if responded_to == self._message_id:
            self._cancelled = True

    def _readable(self) -> bool:
        sock = self._connection.request
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return bool(select.select([sock], [], [], 0)[0])


def _peer_of(connection: socket.socket) -> object:
    try:
        return connection.getpeername()
    except OSError:
        return "a closed connection"


def _address(client_address: object) -> str:
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return f"{client_address[0]}:{client_address[1]}"
    return str(client_address)
