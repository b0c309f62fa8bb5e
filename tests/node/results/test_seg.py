"""The SEG of a real lung-quant result: in the source study, one frame per source slice and
segment (empty ones kept), each mask where it was, the pipeline named."""

from __future__ import annotations

import highdicom as hd


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
