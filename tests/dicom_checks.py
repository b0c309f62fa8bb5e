"""What a reader of the node's objects checks: dciodvfy (dicom3tools) finds no error, and
what an SR's Qualitative Evaluations say."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors."""
    return [line for line in _dciodvfy(path).splitlines() if line.startswith("Error")]


def dciodvfy_unknown_schemes(path: Path) -> list[str]:
    """The coding scheme designators dciodvfy does not know, once per use."""
    return re.findall(
        r"CodingSchemeDesignator\(0008,0102\)\[1\]> - Unrecognized defined term = <([^>]*)>",
        _dciodvfy(path),
    )


def _dciodvfy(path: Path) -> str:
    """What dciodvfy prints of `path`; a deflated file (which the 2022 dicom3tools cannot
    read) is checked as the same dataset inflated to Explicit VR Little Endian, as pydicom
    reads it."""
    with tempfile.TemporaryDirectory() as folder:
        report = subprocess.run(
            ["dciodvfy", "-new", str(_readable(path, Path(folder)))],
            capture_output=True,
            text=True,
        )
    return report.stdout + report.stderr


def _readable(path: Path, folder: Path) -> Path:
    dataset = pydicom.dcmread(path)
    if not dataset.file_meta.TransferSyntaxUID.is_deflated:
        return path
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inflated = folder / path.name
    dataset.save_as(inflated, enforce_file_format=True)
    return inflated


def validate(path: Path) -> None:
    """Fail on any dciodvfy error; skip where dicom3tools is not installed."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    errors = dciodvfy_errors(path)
    assert not errors, "\n".join(errors)


def qualitative_evaluations(report: hd.sr.Comprehensive3DSR) -> dict[str, tuple[str, float]]:
    """TID 1500's Qualitative Evaluations: finding -> (Present or Absent, probability); the
    notes in words (TEXT items) left out."""
    (container,) = [
        item
        for item in report.content[0].ContentSequence
        if item.name.meaning == "Qualitative Evaluations"
    ]
    return {
        item.name.meaning: (
            item.value.meaning,
            float(item.ContentSequence[0].MeasuredValueSequence[0].NumericValue),
        )
        for item in container.ContentSequence
        if item.ValueType == "CODE"
    }
