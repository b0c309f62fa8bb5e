"""The storage SCP: accept associations from known peers, persist each instance durably,
record it, and only then answer success.

Bytes are stored exactly as received (no decode and re-encode): the file is the DICOM preamble,
a file meta group the node writes, and the dataset as it came off the wire.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from node.catalog import Catalog, Receipt
from node.config import Settings
from node.db.models import utcnow
from node.dimse import status
from node.dimse.acceptor import (
    Acceptor,
    Association,
    Reply,
    StoreRequest,
)
from node.ingest.metadata import read_metadata
from node.ingest.part10 import file_meta
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
