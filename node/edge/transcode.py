"""A stored instance for a peer that does not take its transfer syntax: the same UIDs and
attributes, only the pixel encoding changes; pixels decoded from a lossy syntax say so
(PS3.3 C.7.6.1.1.5). WADO-RS and the Query/Retrieve SCP's sub-operations send it so."""

from __future__ import annotations

from pydicom import Dataset
from pydicom.uid import (
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

ALWAYS_LOSSY = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
}
"""Syntaxes whose pixels are never lossless, and the method their decoded pixels are marked
with; JPEG 2000 and the rest may be either, and their files say which."""


def transcoded(dataset: Dataset, target: UID) -> Dataset:
    """`dataset` (read from the store) in the uncompressed `target` syntax, its SOP Instance
    UID kept (pydicom would otherwise make a new one when it decompresses)."""
    stored = UID(dataset.file_meta.TransferSyntaxUID)
    if stored.is_compressed:
        dataset.decompress(generate_instance_uid=False)
        if stored in ALWAYS_LOSSY and dataset.get("LossyImageCompression") != "01":
            dataset.LossyImageCompression = "01"
            if "LossyImageCompressionMethod" not in dataset:
                dataset.LossyImageCompressionMethod = ALWAYS_LOSSY[stored]
    dataset.file_meta.TransferSyntaxUID = target
    return dataset
