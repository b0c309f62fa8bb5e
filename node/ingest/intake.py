"""One instance in, whatever the door (a C-STORE, a part of a STOW-RS request): read, checked,
stored durably, recorded in the catalog, and only then answered.

An exchange (a DIMSE association, a STOW-RS request) is recorded with its first instance and
closed when it ends: a clean end is the release signal that series completion waits for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.uid import UID
from sqlalchemy import Connection

from node.edge.status import Status
from node.ingest.metadata import InstanceMetadata, read_metadata, reencoded
from node.ingest.part10 import file_meta
from node.ingest.scan import Encoded
from node.ops.audit import Received, record, record_quietly
from node.ops.metrics import INSTANCES, RECEIVED_BYTES
from node.store.catalog import AssociationRecord, Catalog, Receipt
from node.store.db.models import Source, utcnow
from node.store.storage import (
    FileRegion,
    InstanceStore,
    InvalidUID,
    StorageError,
    StorageFull,
    WriteOutcome,
    content_hash,
)

log = logging.getLogger(__name__)


CONFLICT = "another instance with this SOP Instance UID is stored; the first copy is kept"


@dataclass(frozen=True)
class Sender:
    """Who delivers in one exchange: a calling AE over DIMSE, a token's name over DICOMweb."""

    exchange_id: str
    calling_ae: str
    called_ae: str
    address: str | None
    source: Source

    @property
    def label(self) -> str:
        kind = "association" if self.source is Source.DIMSE else "request"
        return f"{kind} {self.exchange_id}"


@dataclass
class Delivery:
    """What one exchange delivered so far."""

    sender: Sender
    opened: float = field(default_factory=time.monotonic)
    recorded: bool = False
    instances: int = 0
    """Instances accepted: stored now, or already held (`duplicates`)."""
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)
    """SOP Instance UIDs refused because another instance is stored under each."""
    series_linked: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Parts of one STOW-RS request are stored in parallel (after the first)."""


@dataclass(frozen=True)
class Answer:
    """The status of one instance, with why, and what was read of it (None if unreadable)."""

    status: Status
    reason: str | None = None
    meta: InstanceMetadata | None = None


Check = Callable[[InstanceMetadata], Answer | None]
"""A door's own check of a readable instance (a refusal, or None to go on)."""


class Intake:
    """Stores and records instances for every door (`StorageSCP`, STOW-RS)."""

    def __init__(self, store: InstanceStore, catalog: Catalog, min_free_mb: float) -> None:
        self._store = store
        self._catalog = catalog
        self._min_free_mb = min_free_mb

    def problem(self) -> str | None:
        """Why nothing can be stored now (the disk below `storage.min_free_mb`), or None."""
        free_mb = self._store.free_mb()
        if free_mb < self._min_free_mb:
            return (
                f"storage has {free_mb:.0f} MB free, "
                f"below storage.min_free_mb ({self._min_free_mb:.0f})"
            )
        return None

    def accept(
        self,
        delivery: Delivery,
        dataset: Encoded,
        transfer_syntax: UID,
        check: Check | None = None,
        spooled: FileRegion | None = None,
    ) -> Answer:
        """Store `dataset` (encoded in `transfer_syntax`, without file meta) as sent; when
        it is a view of a `spooled` file region, the kernel copies it from there."""
        answer = self._accept(delivery, dataset, transfer_syntax, check, spooled)
        source = delivery.sender.source.value
        INSTANCES.labels(source, answer.status.name.lower()).inc()
        if answer.status == Status.SUCCESS:
            RECEIVED_BYTES.labels(source).inc(len(dataset))
        return answer

    def _accept(
        self,
        delivery: Delivery,
        dataset: Encoded,
        transfer_syntax: UID,
        check: Check | None,
        spooled: FileRegion | None,
    ) -> Answer:
        label = delivery.sender.label
        problem = self.problem()
        if problem is not None:
            log.error("%s: instance refused: %s", label, problem)
            return Answer(Status.OUT_OF_RESOURCES, problem)
        try:
            meta = read_metadata(dataset, transfer_syntax)
        except InvalidUID as exc:
            log.warning("%s: instance refused: %s", label, exc)
            return Answer(Status.INVALID_UID, str(exc))
        except Exception as exc:  # pydicom raises many types on malformed input
            log.warning("%s: dataset refused: %s", label, exc)
            return Answer(Status.CANNOT_UNDERSTAND, str(exc))
        refusal = check(meta) if check is not None else None
        if refusal is not None:
            log.warning("%s: %s refused: %s", label, meta.key.sop_instance_uid, refusal.reason)
            return Answer(refusal.status, refusal.reason, meta)
        return self._keep(delivery, meta, dataset, transfer_syntax, spooled)

    def _keep(
        self,
        delivery: Delivery,
        meta: InstanceMetadata,
        dataset: Encoded,
        transfer_syntax: UID,
        spooled: FileRegion | None,
    ) -> Answer:
        sender = delivery.sender
        uid = meta.key.sop_instance_uid
        header = file_meta(meta.sop_class_uid, uid, transfer_syntax, sender.calling_ae[:16])
        try:
            body = dataset if spooled is None else spooled
            outcome = self._store.write(meta.key, (header, body))
        except (StorageFull, StorageError) as exc:
            log.error("%s: %s not stored: %s", sender.label, uid, exc)
            return Answer(Status.OUT_OF_RESOURCES, str(exc), meta)
        if outcome is WriteOutcome.DIFFERS and not reencoded(
            self._store.path_of(meta.key), dataset, transfer_syntax
        ):
            log.warning("%s: %s refused: %s", sender.label, uid, CONFLICT)
            with delivery.lock:
                delivery.conflicts.append(uid)
                delivery.studies.add(meta.key.study_uid)
            return Answer(Status.DUPLICATE_SOP_INSTANCE, CONFLICT, meta)
        receipt = Receipt(
            association_id=sender.exchange_id,
            calling_ae=sender.calling_ae,
            called_ae=sender.called_ae,
            transfer_syntax_uid=str(transfer_syntax),
            size_bytes=len(header) + len(dataset),
            received_at=utcnow(),
            source=sender.source,
            sha256=content_hash((header, body)) if outcome is WriteOutcome.CREATED else None,
        )
        opening = None
        if not delivery.recorded:
            opening = AssociationRecord(
                sender.exchange_id,
                sender.calling_ae,
                sender.called_ae,
                sender.address,
                sender.source,
            )
        try:
            self._catalog.record_instance(
                meta,
                receipt,
                content_changed=outcome is WriteOutcome.CREATED,
                link=meta.key.series_uid not in delivery.series_linked,
                opening=opening,
            )
        except Exception as exc:  # the database refused or is unreachable: nothing kept
            if outcome is WriteOutcome.CREATED:
                self._store.remove(meta.key)
            log.error("%s: %s not recorded: %s", sender.label, uid, exc)
            return Answer(Status.OUT_OF_RESOURCES, "database unavailable, send again later", meta)
        with delivery.lock:
            delivery.recorded = True
            delivery.series_linked.add(meta.key.series_uid)
            delivery.studies.add(meta.key.study_uid)
            delivery.instances += 1
            delivery.duplicates += outcome is not WriteOutcome.CREATED
        log.debug("%s: stored %s (%s)", sender.label, uid, outcome.value)
        return Answer(Status.SUCCESS, meta=meta)

    def close(self, delivery: Delivery, released: bool) -> None:
        """Record the end of an exchange that delivered something (a clean end releases its
        series for completion), and log it."""
        sender = delivery.sender
        studies = sorted(delivery.studies)
        facts = Received(
            source=sender.source.value,
            exchange=sender.exchange_id,
            address=sender.address,
            instances=delivery.instances,
            duplicates=delivery.duplicates,
            conflicts=delivery.conflicts,
            studies=studies,
            series=sorted(delivery.series_linked),
            released=released,
        )
        study = studies[0] if len(studies) == 1 else None
        if delivery.recorded:

            def audit(conn: Connection) -> None:
                record(conn, sender.calling_ae, facts, study)

            try:
                self._catalog.close_association(
                    sender.exchange_id, released, delivery.instances, audit
                )
            except Exception as exc:  # the database is down: completion waits for the restart
                log.error("%s: cannot record its end: %s", sender.label, exc)
        elif delivery.conflicts:
            record_quietly(self._catalog.engine, sender.calling_ae, facts, study)
        log.info(
            "%s %s after %.1f s: %d instances (%d already held, %d conflicting refused) from %s",
            sender.label,
            "released" if released else "aborted",
            time.monotonic() - delivery.opened,
            delivery.instances,
            delivery.duplicates,
            len(delivery.conflicts),
            sender.calling_ae,
        )
