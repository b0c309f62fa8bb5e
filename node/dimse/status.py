"""C-STORE response statuses the node answers (PS3.4 B.2.3, PS3.7 C)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
"""The dataset cannot be parsed."""
INVALID_UID = 0xC001
"""A study, series or SOP Instance UID is missing or not a UID (Cannot Understand range)."""
