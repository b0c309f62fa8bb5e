"""The SEG of a real lung-quant result: in the source study, one frame per source slice and
segment (empty ones kept), each mask where it was, the pipeline named."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import JPEGLSLossless

from node.work.results.encode import source_headers
from node.work.results.seg import build_segmentation


def test_seg_frames_reference_the_source_slices_in_order(encoded) -> None:
    volume, result, _, seg, _ = encoded
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.SeriesDescription == "AI: lung-quant 1.0"
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [m.segment.label for m in result.masks]
    assert all("RecommendedDisplayCIELabValue" in s for s in seg.SegmentSequence)
    assert seg.NumberOfFrames == len(result.masks) * len(volume.sources)  # empty ones kept
    parsed = hd.seg.Segmentation.from_dataset(seg)
    for segment_number, mask in enumerate(result.masks, start=1):
        uids = [s.sop_instance_uid for s in volume.sources]
        pixels = parsed.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[segment_number]
        )
        assert (pixels[..., 0] > 0).sum() == mask.array.sum()
        assert ((pixels[..., 0] > 0) == mask.array).all()
    ours = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "ainode"]
    assert [(e.ManufacturerModelName, e.SoftwareVersions) for e in ours] == [("lung-quant", "1.0")]


def test_a_labelmap_seg_holds_the_last_segment_of_each_pixel(encoded) -> None:
    """The LABELMAP encoding `bench/seg_encoding.py` measures against BINARY (JPEG-LS
    lossless): each source slice's pixels carry the number of the last segment that covers
    them (highdicom orders the frames by position, so they are read by source)."""
    volume, result, identity, _, _ = encoded
    labelmap = build_segmentation(
        result,
        volume,
        source_headers(volume),
        identity,
        hd.seg.SegmentationTypeValues.LABELMAP,
        JPEGLSLossless,
    )
    parsed = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(_written(labelmap))))
    assert parsed.file_meta.TransferSyntaxUID == JPEGLSLossless
    decoded = parsed.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.sop_instance_uid for s in volume.sources],
        combine_segments=True,
    )
    expected = np.zeros(volume.voxels.shape, dtype=np.uint8)
    for number, mask in enumerate(result.masks, start=1):
        expected[mask.array] = number
    assert decoded.shape == expected.shape
    assert (decoded == expected).all()


def _written(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
