"""The numbers of the DICOM protocol the node speaks, named once: upper-layer PDU types and
their reject and abort codes (PS3.8 9.3), DIMSE command fields and statuses (PS3.7), and the
SOP class it verifies with."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.uid import UID

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = UID("1.2.840.10008.1.1")
"""The Verification SOP Class (C-ECHO)."""


class PduType(enum.IntEnum):
    """PS3.8 9.3.1."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class AssociateResult(enum.IntEnum):
    """PS3.8 9.3.4."""

    ACCEPTED = 0x00
    REJECTED_PERMANENT = 0x01
    REJECTED_TRANSIENT = 0x02


class ResultSource(enum.IntEnum):
    """Who rejects an association (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ's result, source and reason (PS3.8 9.3.4), and what it means."""

    result: AssociateResult
    source: ResultSource
    reason: int
    meaning: str

    @property
    def transient(self) -> bool:
        return self.result == AssociateResult.REJECTED_TRANSIENT


_PERMANENT, _TRANSIENT = AssociateResult.REJECTED_PERMANENT, AssociateResult.REJECTED_TRANSIENT
_USER = ResultSource.SERVICE_USER
UNSUPPORTED_APPLICATION_CONTEXT = Rejection(
    _PERMANENT, _USER, 0x02, "application context name not supported"
)
CALLING_AE_NOT_RECOGNIZED = Rejection(_PERMANENT, _USER, 0x03, "calling AE title not recognised")
CALLED_AE_NOT_RECOGNIZED = Rejection(_PERMANENT, _USER, 0x07, "called AE title not recognised")
TEMPORARILY_UNAVAILABLE = Rejection(_TRANSIENT, _USER, 0x01, "temporarily unable to accept")
LOCAL_LIMIT_EXCEEDED = Rejection(
    _TRANSIENT,
    ResultSource.SERVICE_PROVIDER_PRESENTATION,
    0x02,
    "local limit of associations exceeded",
)
ADDRESS_LIMIT_EXCEEDED = Rejection(
    _TRANSIENT,
    ResultSource.SERVICE_PROVIDER_PRESENTATION,
    0x02,
    "this address already holds node.max_associations_per_address associations",
)


class AbortReason(enum.IntEnum):
    """A-ABORT reasons of the service provider (PS3.8 9.3.8)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER = 0x06


class AbortSource(enum.IntEnum):
    SERVICE_USER = 0x00
    SERVICE_PROVIDER = 0x02


class CommandField(enum.IntEnum):
    """PS3.7 E.1."""

    C_STORE_RQ = 0x0001
    C_GET_RQ = 0x0010
    C_FIND_RQ = 0x0020
    C_MOVE_RQ = 0x0021
    C_ECHO_RQ = 0x0030
    N_EVENT_REPORT_RQ = 0x0100
    N_ACTION_RQ = 0x0130
    C_CANCEL_RQ = 0x0FFF
    RESPONSE = 0x8000
    """Set in the response to a request."""


class CommandTag(enum.IntEnum):
    """Command set elements (group 0000, PS3.7 E.1)."""

    GROUP_LENGTH = 0x00000000
    AFFECTED_SOP_CLASS_UID = 0x00000002
    COMMAND_FIELD = 0x00000100
    MESSAGE_ID = 0x00000110
    MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
    PRIORITY = 0x00000700
    COMMAND_DATA_SET_TYPE = 0x00000800
    STATUS = 0x00000900
    ERROR_COMMENT = 0x00000902
    MOVE_DESTINATION = 0x00000600
    AFFECTED_SOP_INSTANCE_UID = 0x00001000
    EVENT_TYPE_ID = 0x00001002
    REMAINING_SUBOPERATIONS = 0x00001020
    COMPLETED_SUBOPERATIONS = 0x00001021
    FAILED_SUBOPERATIONS = 0x00001022
    WARNING_SUBOPERATIONS = 0x00001023
    MOVE_ORIGINATOR_AE_TITLE = 0x00001030
    MOVE_ORIGINATOR_MESSAGE_ID = 0x00001031


NO_DATA_SET = 0x0101
"""Command Data Set Type: the message has no dataset."""
DATA_SET = 0x0001
"""Command Data Set Type: a dataset follows (any value but `NO_DATA_SET` says so)."""
COMMAND_GROUP = 0x0000
"""Every element of a command set is in this group."""


class MessageControl(enum.IntFlag):
    """The message control header of a presentation data value (PS3.8 E.2)."""

    COMMAND = 0x01
    """The fragment is of a command set (else of a dataset)."""
    LAST = 0x02
    """The last fragment of its command set or dataset."""
