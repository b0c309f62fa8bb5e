"""DIMSE constants the node uses: the SOP class it verifies with, and the C-STORE response
statuses it answers (PS3.4 B.2.3, PS3.7 C)."""

from pydicom.uid import UID

VERIFICATION = UID("1.2.840.10008.1.1")
"""The Verification SOP Class (C-ECHO)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
"""The dataset cannot be parsed."""
INVALID_UID = 0xC001
"""A study, series or SOP Instance UID is missing or not a UID (Cannot Understand range)."""
