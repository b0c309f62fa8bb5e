"""The storage SCP: accept associations from known peers, persist each instance durably,
record it, and only then answer success.

Bytes are stored exactly as received (no decode and re-encode): the file is the DICOM preamble,
a file meta group the node writes, and the dataset as it came off the wire.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
import types
import uuid
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from node.catalog import Catalog, InstanceMetadata, Receipt
from node.config import NodeSettings, Settings
from node.db.models import utcnow
from node.dimse import status
from node.storage import InstanceStore, InvalidUID, StorageError, StorageFull, WriteOutcome

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF
DUL_POLL_SECONDS = 0.0002
"""How long pynetdicom's DUL reactor sleeps between polls of an idle socket (its default, 1 ms,
is paid several times per C-STORE round trip and halves single-association throughput)."""


class _Listener(ThreadedAssociationServer):
    """pynetdicom's threaded server, with TCP_NODELAY and optional SO_REUSEPORT.

    `block_on_close` is off: stopping must not wait for every association to end by itself.
    """

    block_on_close = False
    reuse_port = False

    def shutdown(self) -> None:
        """Stop accepting and close the socket (made by make_server, unknown to the AE)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


@dataclass
class _AssociationRecord:
    id: str
    calling_ae: str
    called_ae: str
    opened: float = field(default_factory=time.monotonic)
    released: bool = False
    instances: int = 0
    series_linked: set[str] = field(default_factory=set)


class StorageSCP:
    """Verification and every Storage SOP class, in every transfer syntax pydicom knows."""

    def __init__(self, settings: Settings, store: InstanceStore, catalog: Catalog) -> None:
        self._settings = settings
        self._store = store
        self._catalog = catalog
        self._ae = _make_ae(settings.node, settings)
        self._server: _Listener | None = None
        self._associations: dict[int, _AssociationRecord] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self, reuse_port: bool = False) -> None:
        """Bind and serve in background threads."""
        node = self._settings.node
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_connection_close),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        _Listener.reuse_port = reuse_port
        server = self._ae.make_server(
            (node.host, node.port), evt_handlers=handlers, server_class=_Listener
        )
        thread = threading.Thread(target=server.serve_forever, name="scp-listener", daemon=True)
        thread.start()
        self._server = server
        log.info("listening as %s on %s:%d", node.ae_title, node.host, self.port)

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Refuse new associations, finish the instances being stored, abort the rest."""
        with self._lock:
            self._stopping = True
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + drain_seconds
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        time.sleep(0.2)  # let the last responses leave before aborting
        for association in list(self._ae.active_associations):
            association.abort()
        self._ae.shutdown()
        log.info("storage SCP stopped")

    def _on_connection_open(self, event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS
        transport = event.assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport.recv = types.MethodType(_recv_all, transport)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        record = _AssociationRecord(
            id=uuid.uuid4().hex,
            calling_ae=assoc.requestor.ae_title.strip(),
            called_ae=assoc.acceptor.ae_title.strip(),
        )
        with self._lock:
            self._associations[id(assoc)] = record
        try:
            self._catalog.open_association(
                record.id, record.calling_ae, record.called_ae, assoc.requestor.address
            )
        except SQLAlchemyError:
            log.exception("association %s from %s: cannot record it", record.id, record.calling_ae)
        log.info(
            "association %s accepted: %s -> %s from %s",
            record.id,
            record.calling_ae,
            record.called_ae,
            assoc.requestor.address,
        )

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            record = self._associations.get(id(event.assoc))
            if record is not None:
                record.released = True

    def _on_connection_close(self, event: evt.Event) -> None:
        with self._lock:
            record = self._associations.pop(id(event.assoc), None)
        if record is None:
            return
        try:
            self._catalog.close_association(record.id, record.released, record.instances)
        except SQLAlchemyError:
            log.exception("association %s: cannot record its end", record.id)
        log.info(
            "association %s %s after %.1f s: %d instances from %s",
            record.id,
            "released" if record.released else "aborted",
            time.monotonic() - record.opened,
            record.instances,
            record.calling_ae,
        )

    def _on_c_store(self, event: evt.Event) -> int | Dataset:
        with self._lock:
            if self._stopping:
                return _failure(status.OUT_OF_RESOURCES, "node is shutting down, send again later")
            self._in_flight += 1
            record = self._associations.get(id(event.assoc))
        try:
            return self._store_instance(event, record)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _store_instance(self, event: evt.Event, record: _AssociationRecord | None) -> int | Dataset:
        request = event.request
        association_id = record.id if record else "unknown"
        try:
            dataset = event.dataset
            _check_truncation(dataset, len(request.DataSet.getbuffer()))
            meta = InstanceMetadata.from_dataset(dataset)
        except InvalidUID as exc:
            log.warning("association %s: instance refused: %s", association_id, exc)
            return _failure(status.INVALID_UID, str(exc))
        except Exception as exc:  # pydicom raises many types on malformed input
            log.warning("association %s: cannot parse dataset: %s", association_id, exc)
            return _failure(status.CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}")
        uid = meta.key.sop_instance_uid
        if meta.sop_class_uid != request.AffectedSOPClassUID:
            log.warning(
                "association %s: %s: SOP Class differs from the request", association_id, uid
            )
            return _failure(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPClassUID of the dataset differs from the Affected SOP Class UID",
            )
        encoded = event.encoded_dataset(include_meta=True)
        try:
            outcome = self._store.write(meta.key, (encoded,))
        except (StorageFull, StorageError) as exc:
            log.error("association %s: %s not stored: %s", association_id, uid, exc)
            return _failure(status.OUT_OF_RESOURCES, str(exc))
        receipt = Receipt(
            association_id=association_id,
            calling_ae=record.calling_ae if record else event.assoc.requestor.ae_title,
            called_ae=record.called_ae if record else event.assoc.acceptor.ae_title,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            size_bytes=len(encoded),
            received_at=utcnow(),
        )
        linked = record.series_linked if record else set()
        try:
            self._catalog.record_instance(
                meta,
                receipt,
                content_changed=outcome is not WriteOutcome.IDENTICAL,
                link=meta.key.series_uid not in linked,
            )
        except SQLAlchemyError as exc:
            if outcome is WriteOutcome.CREATED:
                self._store.remove(meta.key)
            log.error("association %s: %s not recorded: %s", association_id, uid, exc)
            return _failure(status.OUT_OF_RESOURCES, "database unavailable")
        linked.add(meta.key.series_uid)
        if record is not None:
            record.instances += 1
        log.debug("association %s: stored %s (%s)", association_id, uid, outcome.value)
        return status.SUCCESS


def _recv_all(transport: AssociationSocket, nr_bytes: int) -> bytearray:
    """`nr_bytes` from the socket, read straight into one buffer (pynetdicom reads 4 KiB at a
    time and appends: 256 Python-level reads and copies per 1 MiB PDU). Fewer bytes only when
    the peer closed the connection, as pynetdicom's own."""
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = transport.socket.recv_into(view[received:], nr_bytes - received)
        if count == 0:
            return buffer[:received]
        received += count
    return buffer


def _check_truncation(dataset: Dataset, size: int) -> None:
    """Raise ValueError if an element's value or header was cut short.

    pydicom reads a short value or a partial trailing header without complaint; a sender that
    dropped bytes must not get a success status.
    """
    end = 0
    for tag in sorted(dataset.keys()):
        element = dataset.get_item(tag)
        if not isinstance(element, RawDataElement) or element.length == UNDEFINED_LENGTH:
            end = -1
            continue
        if element.value is not None and len(element.value) != element.length:
            raise ValueError(
                f"element {tag} is truncated ({len(element.value)} of {element.length} bytes)"
            )
        end = element.value_tell + element.length
    if 0 <= end < size:
        raise ValueError(f"{size - end} bytes after the last element")


def _failure(code: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = code
    response.ErrorComment = comment[:64]
    return response


def _make_ae(node: NodeSettings, settings: Settings) -> AE:
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.require_called_aet = False
    if not node.accept_unknown_peers:
        ae.require_calling_aet = [peer.ae_title for peer in settings.peers.values()]
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae
