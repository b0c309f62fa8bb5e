"""The names of the files a job's results are written to, and how a result file is told a
key image (light: dispatch reads them without importing the encoders)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage

SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"
KEY_IMAGE_PREFIX = "key-image-"


def key_image_file(number: int) -> str:
    return f"{KEY_IMAGE_PREFIX}{number}.dcm"


def is_key_image(path: Path) -> bool:
    """A key image: the only Secondary Capture among a job's results (once in the store, a
    result file is named by its SOP Instance UID, not by what it is)."""
    header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return header.get("SOPClassUID") == SecondaryCaptureImageStorage
