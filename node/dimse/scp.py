"""The storage SCP: accept associations from known peers, persist each instance durably,
record it, and only then answer success.

Bytes are stored exactly as received (no decode and re-encode): the file is the DICOM preamble,
a file meta group the node writes, and the dataset as it came off the wire.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from sqlalchemy.exc import SQLAlchemyError

from node.catalog import HOT_TAGS, Catalog, InstanceMetadata, Receipt
from node.config import Settings
from node.db.models import utcnow
from node.dimse import status
from node.dimse.acceptor import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Acceptor,
    Association,
    Reply,
    StoreRequest,
)
from node.dimse.scan import scan_dataset
from node.storage import InstanceStore, InvalidUID, StorageError, StorageFull, WriteOutcome

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass
class _Delivery:
    """What one association delivered so far."""

    opened: float = field(default_factory=time.monotonic)
    instances: int = 0
    series_linked: set[str] = field(default_factory=set)


class StorageSCP:
    """Verification and every Storage SOP class, in every transfer syntax pydicom knows."""

    def __init__(self, settings: Settings, store: InstanceStore, catalog: Catalog) -> None:
        self._settings = settings
        self._store = store
        self._catalog = catalog
        self._known_peers = {peer.ae_title for peer in settings.peers.values()}
        self._acceptor: Acceptor | None = None
        self._deliveries: dict[str, _Delivery] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._acceptor is not None
        return self._acceptor.port

    def start(self, reuse_port: bool = False) -> None:
        """Bind and serve in background threads."""
        node = self._settings.node
        acceptor = Acceptor(
            (node.host, node.port),
            self,
            max_pdu_size=node.max_pdu_size,
            max_associations=node.max_associations,
            reuse_port=reuse_port,
        )
        thread = threading.Thread(target=acceptor.serve_forever, name="scp-listener", daemon=True)
        thread.start()
        self._acceptor = acceptor
        log.info("listening as %s on %s:%d", node.ae_title, node.host, self.port)

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Refuse new associations, finish the instances being stored, abort the rest."""
        with self._lock:
            self._stopping = True
        if self._acceptor is None:
            return
        self._acceptor.stop_listening()
        deadline = time.monotonic() + drain_seconds
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        time.sleep(0.2)  # let the last responses leave before aborting
        self._acceptor.abort_all()
        log.info("storage SCP stopped")

    def admit(self, calling_ae: str, called_ae: str) -> bool:
        """Known peers only, unless `node.accept_unknown_peers`."""
        return self._settings.node.accept_unknown_peers or calling_ae in self._known_peers

    def opened(self, association: Association) -> None:
        with self._lock:
            self._deliveries[association.id] = _Delivery()
        try:
            self._catalog.open_association(
                association.id, association.calling_ae, association.called_ae, association.address
            )
        except SQLAlchemyError:
            log.exception(
                "association %s from %s: cannot record it", association.id, association.calling_ae
            )
        log.info(
            "association %s accepted: %s -> %s from %s",
            association.id,
            association.calling_ae,
            association.called_ae,
            association.address,
        )

    def closed(self, association: Association) -> None:
        with self._lock:
            delivery = self._deliveries.pop(association.id)
        try:
            self._catalog.close_association(
                association.id, association.released, delivery.instances
            )
        except SQLAlchemyError:
            log.exception("association %s: cannot record its end", association.id)
        log.info(
            "association %s %s after %.1f s: %d instances from %s",
            association.id,
            "released" if association.released else "aborted",
            time.monotonic() - delivery.opened,
            delivery.instances,
            association.calling_ae,
        )

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply:
        with self._lock:
            if self._stopping:
                return Reply(status.OUT_OF_RESOURCES, "node is shutting down, send again later")
            self._in_flight += 1
            delivery = self._deliveries[association.id]
        try:
            return self._store_instance(association, delivery, request, dataset)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _store_instance(
        self,
        association: Association,
        delivery: _Delivery,
        request: StoreRequest,
        dataset: bytes,
    ) -> Reply:
        association_id = association.id
        try:
            meta = read_metadata(dataset, request.transfer_syntax)
        except InvalidUID as exc:
            log.warning("association %s: instance refused: %s", association_id, exc)
            return Reply(status.INVALID_UID, str(exc))
        except Exception as exc:  # pydicom raises many types on malformed input
            log.warning("association %s: cannot parse dataset: %s", association_id, exc)
            return Reply(status.CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}")
        uid = meta.key.sop_instance_uid
        if meta.sop_class_uid != request.sop_class_uid:
            log.warning(
                "association %s: %s: SOP Class differs from the request", association_id, uid
            )
            return Reply(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPClassUID of the dataset differs from the Affected SOP Class UID",
            )
        header = file_meta(meta.sop_class_uid, uid, request.transfer_syntax, association.calling_ae)
        try:
            outcome = self._store.write(meta.key, (header, dataset))
        except (StorageFull, StorageError) as exc:
            log.error("association %s: %s not stored: %s", association_id, uid, exc)
            return Reply(status.OUT_OF_RESOURCES, str(exc))
        receipt = Receipt(
            association_id=association_id,
            calling_ae=association.calling_ae,
            called_ae=association.called_ae,
            transfer_syntax_uid=str(request.transfer_syntax),
            size_bytes=len(header) + len(dataset),
            received_at=utcnow(),
        )
        try:
            self._catalog.record_instance(
                meta,
                receipt,
                content_changed=outcome is not WriteOutcome.IDENTICAL,
                link=meta.key.series_uid not in delivery.series_linked,
            )
        except SQLAlchemyError as exc:
            if outcome is WriteOutcome.CREATED:
                self._store.remove(meta.key)
            log.error("association %s: %s not recorded: %s", association_id, uid, exc)
            return Reply(status.OUT_OF_RESOURCES, "database unavailable")
        delivery.series_linked.add(meta.key.series_uid)
        delivery.instances += 1
        log.debug("association %s: stored %s (%s)", association_id, uid, outcome.value)
        return Reply(status.SUCCESS)


def read_metadata(encoded: bytes, transfer_syntax: UID) -> InstanceMetadata:
    """What the catalog needs of an instance; raises if its dataset cannot be parsed.

    `scan_dataset` reads it from a whole little-endian stream without building a dataset;
    pydicom parses it only when a series is created, or judges a stream the scan refused.
    """
    if transfer_syntax.is_deflated:
        encoded = zlib.decompress(encoded, -zlib.MAX_WBITS)
    if transfer_syntax.is_little_endian:
        try:
            values = scan_dataset(encoded, transfer_syntax.is_implicit_VR, HOT_TAGS)
        except ValueError:
            pass
        else:
            return InstanceMetadata.from_raw(
                values, lambda: _parse_for_series(encoded, transfer_syntax)
            )
    return InstanceMetadata.from_dataset(parse(encoded, transfer_syntax))


def _parse_for_series(inflated: bytes, transfer_syntax: UID) -> Dataset:
    """The dataset whose attributes describe a new series; empty (and logged) in the unlikely
    case that pydicom refuses a stream the scan accepted: the instance is stored regardless."""
    try:
        return parse(inflated, transfer_syntax)
    except Exception as exc:  # pydicom raises many types on malformed input
        log.warning("series attributes unreadable, left empty: %s", exc)
        return Dataset()


def parse(inflated: bytes, transfer_syntax: UID) -> Dataset:
    """The dataset as sent (deflate undone), its values left raw; ValueError if it was cut
    short."""
    dataset = read_dataset(
        BytesIO(inflated), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    )
    _check_truncation(dataset, len(inflated))
    return dataset


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """The DICOM preamble, prefix and File Meta Information group (PS3.10 7.1).

    Encoded directly: pydicom's FileMetaDataset validates each element on assignment and cost
    a tenth of the receive path.
    """
    body = b"".join(
        (
            _explicit_element(0x0001, b"OB", b"\0\1"),
            _explicit_element(0x0002, b"UI", _even(sop_class_uid.encode(), b"\0")),
            _explicit_element(0x0003, b"UI", _even(sop_instance_uid.encode(), b"\0")),
            _explicit_element(0x0010, b"UI", _even(transfer_syntax.encode(), b"\0")),
            _explicit_element(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID.encode(), b"\0")),
            _explicit_element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode(), b" ")),
            _explicit_element(0x0016, b"AE", _even(source_ae.encode("ascii", "replace"), b" ")),
        )
    )
    group_length = _explicit_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


def _explicit_element(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element in Explicit VR Little Endian."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _check_truncation(dataset: Dataset, size: int) -> None:
    """Raise ValueError if the last element's value or header was cut short.

    pydicom reads a short value or a partial trailing header without complaint; a sender that
    dropped bytes must not get a success status. Elements are read in stream order, so a
    stream cut short ends inside the last element read: only that one needs checking.
    """
    if not len(dataset):
        return
    tag = next(reversed(dataset.keys()))
    element = dataset.get_item(tag)
    if not isinstance(element, RawDataElement) or element.length == UNDEFINED_LENGTH:
        return
    if element.value is not None and len(element.value) != element.length:
        raise ValueError(
            f"element {tag} is truncated ({len(element.value)} of {element.length} bytes)"
        )
    end = element.value_tell + element.length
    if end < size:
        raise ValueError(f"{size - end} bytes after the last element")
