"""Storage Commitment Push Model (PS3.4 J) as its SCU: the N-ACTION that asks a peer to
commit the instances just sent, and the N-EVENT-REPORT by which the peer answers, on a
later association of its own (as Orthanc and dcm4chee do: the node releases the one that
carried the request)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Protocol

from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import Association
from pynetdicom.dsutils import decode

from node.edge.messages import Reply

STORAGE_COMMITMENT = UID("1.2.840.10008.1.20.1")
"""The Storage Commitment Push Model SOP Class."""
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
"""Its well-known SOP Instance, the one every request and report names."""
COMMITMENT_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
REQUEST_COMMITMENT = 1
"""The N-ACTION's Action Type ID (PS3.4 J.3.2)."""


class ReportEvent(enum.IntEnum):
    """The N-EVENT-REPORT's Event Type ID (PS3.4 J.3.3)."""

    SUCCESSFUL = 1
    FAILURES_EXIST = 2


class EventReportStatus(enum.IntEnum):
    """N-EVENT-REPORT response statuses the node answers (PS3.7 10.1.1.1.8)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    INVALID_ARGUMENT_VALUE = 0x0115
    NO_SUCH_SOP_CLASS = 0x0118


@dataclass(frozen=True)
class Reference:
    """An instance asked to be committed."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitmentReport:
    """A peer's answer to one request: what it committed and what failed, with the
    Failure Reason of each (PS3.3 C.14.1.1)."""

    transaction_uid: str
    committed: tuple[str, ...] = ()
    failed: dict[str, int] = field(default_factory=dict)


class BadReport(ValueError):
    """A report the node cannot take, and the status that says why."""

    def __init__(self, status: EventReportStatus, comment: str) -> None:
        super().__init__(comment)
        self.status = status


class Reports(Protocol):
    """Where reports go (the catalog's dispatches)."""

    def report(self, calling_ae: str, report: CommitmentReport) -> Reply:
        """Record `report` from `calling_ae`; the response's status."""


def report_of(event_type: int, dataset: bytes | None, implicit: bool) -> CommitmentReport:
    """The report in an N-EVENT-REPORT's Event Information; BadReport when it is not one."""
    if event_type not in tuple(ReportEvent):
        raise BadReport(EventReportStatus.NO_SUCH_EVENT_TYPE, f"event type {event_type}")
    if dataset is None:
        raise BadReport(EventReportStatus.INVALID_ARGUMENT_VALUE, "no event information")
    try:
        information = decode(BytesIO(dataset), implicit, True)
        transaction = str(information.get("TransactionUID", "")).strip()
        committed = tuple(_uids(information, "ReferencedSOPSequence"))
        failed = {
            str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0x0110))
            for item in information.get("FailedSOPSequence", [])
        }
    except Exception as exc:  # whatever the peer's bytes provoke in the decoder
        raise BadReport(
            EventReportStatus.INVALID_ARGUMENT_VALUE,
            f"event information cannot be read: {type(exc).__name__}",
        ) from exc
    if not transaction:
        raise BadReport(EventReportStatus.INVALID_ARGUMENT_VALUE, "no Transaction UID")
    return CommitmentReport(transaction, committed, failed)


def _uids(information: Dataset, sequence: str) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in information.get(sequence, [])]


def request_commitment(
    assoc: Association, transaction_uid: str, references: Sequence[Reference]
) -> str | None:
    """Ask the peer to commit `references` (an N-ACTION on an association that accepted
    the Storage Commitment Push Model); why it was not taken, or None."""
    information = Dataset()
    information.TransactionUID = transaction_uid
    information.ReferencedSOPSequence = [_item(reference) for reference in references]
    status, _ = assoc.send_n_action(
        information, REQUEST_COMMITMENT, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
    )
    if "Status" not in status:
        return "no response to the storage commitment request"
    code = int(status.Status)
    return None if code == 0 else f"storage commitment request refused: status 0x{code:04X}"


def _item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    return item
