"""Sending to a DICOMweb server: STOW-RS of result objects (dicomweb-client)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests
from pydicom.uid import ExplicitVRLittleEndian

from node.config import DicomWebDestination
from node.delivery.webclient import dicomweb_client
from node.edge.scu import StoreResult


def stow(destination: DicomWebDestination, files: Sequence[Path], timeout: float) -> StoreResult:
    """Store the files in one STOW-RS request; ok only when the server lists each as stored
    (some servers answer 200 with a FailedSOPSequence). A deflated object goes inflated: an
    origin server must take Explicit VR Little Endian, not Deflate (PS3.18 10.5)."""
    datasets = [_inflated(pydicom.dcmread(path)) for path in files]
    client = dicomweb_client(destination, timeout)
    try:
        response = client.store_instances(datasets)
    except requests.RequestException as exc:
        return StoreResult(False, f"STOW-RS to {destination.url} failed: {exc}")
    stored = {
        str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])
    }
    failed = [
        f"{item.ReferencedSOPInstanceUID}: failure reason {item.get('FailureReason', '?')}"
        for item in response.get("FailedSOPSequence", [])
    ]
    sent = tuple(str(ds.SOPInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) in stored)
    missing = [str(ds.SOPInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) not in stored]
    counts = f"{len(sent)} of {len(datasets)} stored"
    if failed or missing:
        detail = "; ".join(failed) or f"not acknowledged: {', '.join(missing)}"
        return StoreResult(False, f"{counts}; {detail}", sent)
    return StoreResult(True, counts, sent)


def _inflated(dataset: pydicom.Dataset) -> pydicom.Dataset:
    if dataset.file_meta.TransferSyntaxUID.is_deflated:
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset
