"""The storage SCP's handler (`node.edge.scp.InstanceHandler`): each association becomes a
delivery of the intake, each C-STORE an instance it stores and records before the SCP answers.

Bytes are stored exactly as received (no decode and re-encode). An association is recorded
with its first instance: a C-ECHO never needs the database, and a database that cannot be
written answers A700 per instance, with nothing left behind.
"""

from __future__ import annotations

import logging
import threading

from node.edge.acceptor import Association
from node.edge.messages import Reply, StoreRequest
from node.edge.status import Status
from node.ingest.intake import Answer, Delivery, Intake, Sender
from node.ingest.metadata import InstanceMetadata
from node.ops.metrics import OPEN_ASSOCIATIONS
from node.store.db.models import Source

log = logging.getLogger(__name__)


class DimseIntake:
    """The intake behind the storage SCP: one delivery per open association."""

    def __init__(self, intake: Intake) -> None:
        self._intake = intake
        self._deliveries: dict[str, Delivery] = {}
        self._lock = threading.Lock()

    def problem(self) -> str | None:
        return self._intake.problem()

    def opened(self, association: Association) -> None:
        sender = Sender(
            association.id,
            association.calling_ae,
            association.called_ae,
            association.address,
            Source.DIMSE,
        )
        with self._lock:
            self._deliveries[association.id] = Delivery(sender)
        OPEN_ASSOCIATIONS.inc()
        log.info(
            "association %s accepted: %s -> %s from %s",
            association.id,
            association.calling_ae,
            association.called_ae,
            association.address,
        )

    def closed(self, association: Association) -> None:
        with self._lock:
            delivery = self._deliveries.pop(association.id, None)
        if delivery is not None:
            OPEN_ASSOCIATIONS.dec()
            self._intake.close(delivery, association.released)

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply:
        with self._lock:
            delivery = self._deliveries[association.id]
        answer = self._intake.accept(
            delivery, dataset, request.transfer_syntax, lambda meta: _mismatch(meta, request)
        )
        return Reply(answer.status, answer.reason)


def _mismatch(meta: InstanceMetadata, request: StoreRequest) -> Answer | None:
    """How the dataset contradicts its C-STORE-RQ, if it does."""
    if meta.sop_class_uid != request.sop_class_uid:
        reason = "SOPClassUID of the dataset differs from the Affected SOP Class UID"
    elif meta.key.sop_instance_uid != request.sop_instance_uid:
        reason = "SOPInstanceUID of the dataset differs from the Affected SOP Instance UID"
    else:
        return None
    return Answer(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, reason)
