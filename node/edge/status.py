"""Every DIMSE status the node answers or reads, for every side: the storage SCP, the SCUs
that send and retrieve, and STOW-RS, whose Failure Reasons are the same codes (PS3.4 B.2.3,
PS3.4 C.4, PS3.7 C, PS3.18 I.2.2). Named once, as pynetdicom's `status` module does."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """The statuses the node answers, over DIMSE and as STOW-RS Failure Reasons
    (PS3.4 B.2.3, PS3.7 C, PS3.18 I.2.2)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    UNRECOGNIZED_OPERATION = 0x0211
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    """The dataset cannot be parsed, or is not whole, or not in its context's syntax."""
    INVALID_UID = 0xC001
    """A study, series or SOP Instance UID is missing or not a UID (Cannot Understand range)."""
    DUPLICATE_SOP_INSTANCE = 0x0111
    """Another instance with this SOP Instance UID is stored, with other attributes: the first
    is kept (PS3.7 C.4 general status; a re-send in another transfer syntax is a duplicate)."""
    STUDY_MISMATCH = 0xC409
    """STOW-RS to a study's URL with an instance of another study (Cannot Understand range,
    the code dcm4chee-arc uses)."""


class RetrieveStatus(enum.IntEnum):
    """Statuses of C-FIND, C-MOVE and C-GET responses beside success (PS3.4 C.4), and the
    general one for a peer that may not query (PS3.7 C)."""

    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    CANNOT_CALCULATE_MATCHES = 0xA701
    CANNOT_PERFORM_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000
    CANCELED = 0xFE00

    SUBOPERATIONS_WARNING = 0xB000
    """Sub-operations complete, one or more failed or warned."""
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    """Pending, an optional key not supported."""


class StoreWarning(enum.IntEnum):
    """C-STORE response statuses that still mean stored (PS3.4 B.2.3, PS3.7 C)."""

    WARNING = 0x0001
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
