"""The names of the files a job's results are written to (light: dispatch reads them
without importing the encoders)."""

from __future__ import annotations

from pathlib import Path

SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"
KEY_IMAGE_PREFIX = "key-image-"


def key_image_file(number: int) -> str:
    return f"{KEY_IMAGE_PREFIX}{number}.dcm"


def is_key_image(path: Path) -> bool:
    return path.name.startswith(KEY_IMAGE_PREFIX)
