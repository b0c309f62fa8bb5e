"""Encode a pipeline result for one series revision: SEG (when there are masks), SR, and
key images (sent only to destinations that ask for them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.work.guard import GuardScore
from node.work.results.files import SEG_FILE, SR_FILE, key_image_file
from node.work.results.identity import ResultIdentity, with_type2_attributes
from node.work.results.key_images import build_key_images
from node.work.results.seg import build_segmentation
from node.work.results.sr import build_report
from node.work.siblings import Reconstruction
from pipelines import codes
from pipelines.result import PipelineResult
from pipelines.volume import Volume


def source_headers(volume: Volume) -> list[Dataset]:
    """The source images' headers in volume order (one per file for multi-frame images),
    with the Type 2 attributes derived objects must carry."""
    return [with_type2_attributes(ds) for ds in volume.file_headers]


CODELESS = frozenset({"PerFrameFunctionalGroupsSequence", "PixelData"})
"""What holds no code of ours: a SEG's per-frame positions and derivations (DCM codes), its
frames. Not walked: they are most of a SEG's elements."""


def declare_private_codes(dataset: Dataset) -> None:
    """Name the private coding scheme in the object when it uses it (PS3.3 C.12.1.1.2)."""
    if not _uses_private_codes(dataset):
        return
    item = Dataset()
    item.CodingSchemeDesignator = codes.PRIVATE_SCHEME
    item.CodingSchemeName = codes.PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "ainode project"
    dataset.CodingSchemeIdentificationSequence = [item]


def _uses_private_codes(dataset: Dataset) -> bool:
    for element in dataset:
        if element.keyword in CODELESS:
            continue
        if element.VR == "SQ":
            if any(_uses_private_codes(item) for item in element.value):
                return True
        elif element.keyword == "CodingSchemeDesignator" and element.value == codes.PRIVATE_SCHEME:
            return True
    return False


SEG_TRANSFER_SYNTAX = DeflatedExplicitVRLittleEndian
"""The SEG's bit-packed frames are mostly zeros: deflated, lung-quant's SEG of 148 slices is
0.22 MB instead of 24.6 MB (`bench/seg_encoding.py`). A peer that does not take it gets it
inflated, in Explicit VR Little Endian (`node.edge.scu.store`, STOW-RS, WADO-RS)."""


def encode_result(
    result: PipelineResult,
    volume: Volume,
    identity: ResultIdentity,
    folder: Path,
    guard: GuardScore | None = None,
    siblings: Sequence[Reconstruction] = (),
) -> list[Path]:
    """Write seg.dcm, sr.dcm and key-image-N.dcm to `folder` (each when there is something
    for it); returns the files written in the order they are sent: the SR (small, what the
    radiologist reads first), the SEG, the key images. `guard`: the series' input-guard
    score, and `siblings`: the acquisition's other reconstructions, for the SR."""
    sources = source_headers(volume)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    segmentation = None
    if result.masks:
        segmentation = build_segmentation(result, volume, sources, identity)
        declare_private_codes(segmentation)
        segmentation.file_meta.TransferSyntaxUID = SEG_TRANSFER_SYNTAX
        segmentation.save_as(folder / SEG_FILE, enforce_file_format=True)
        written.append(folder / SEG_FILE)
    if result.reportable:
        report = build_report(result, volume, sources, segmentation, identity, guard, siblings)
        declare_private_codes(report)
        report.save_as(folder / SR_FILE, enforce_file_format=True)
        written.insert(0, folder / SR_FILE)
    for number, image in enumerate(build_key_images(result, volume, sources, identity), 1):
        path = folder / key_image_file(number)
        image.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
