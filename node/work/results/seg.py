"""A pipeline's masks as one DICOM Segmentation over the source series: BINARY, uncompressed
(every viewer and archive reads it; `bench/seg_encoding.py` measures the alternatives)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.work.results.identity import MANUFACTURER, NOT_FOR_DIAGNOSIS, ResultIdentity
from pipelines.result import Mask, PipelineResult
from pipelines.volume import Volume

SEG_SERIES_NUMBER = 9001


def cielab(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    return hd.color.CIELabColor.from_rgb(*rgb)


def build_segmentation(
    result: PipelineResult,
    volume: Volume,
    sources: list[Dataset],
    identity: ResultIdentity,
    kind: hd.seg.SegmentationTypeValues = hd.seg.SegmentationTypeValues.BINARY,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> hd.seg.Segmentation:
    """One frame per source slice and segment (LABELMAP: per source slice), empty frames
    kept (viewers place frames by their source image; omitting empty ones misplaces
    segments in some of them)."""
    frames = _frames_in_source_order(result.masks, volume, sources)
    if kind is hd.seg.SegmentationTypeValues.LABELMAP:
        frames = _labels(frames)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=mask.segment.label,
            segmented_property_category=mask.segment.category.as_dicom(),
            segmented_property_type=mask.segment.type.as_dicom(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identity.algorithm(),
            tracking_uid=identity.uid(f"segment-{number}"),
            tracking_id=mask.segment.label,
            anatomic_regions=(
                [mask.segment.anatomic_region.as_dicom()] if mask.segment.anatomic_region else None
            ),
            display_color=cielab(mask.segment.color_rgb),
        )
        for number, mask in enumerate(result.masks, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=kind,
        transfer_syntax_uid=transfer_syntax,
        segment_descriptions=descriptions,
        series_instance_uid=identity.uid("seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=identity.uid("seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=identity.pipeline,
        software_versions=identity.version,
        device_serial_number=identity.station,
        content_description=NOT_FOR_DIAGNOSIS,
        content_label=identity.pipeline.upper().replace("-", "_")[:16],
        series_description=identity.series_description,
        omit_empty_frames=False,
        contributing_equipment=[identity.contributing_equipment()],
    )


def _frames_in_source_order(
    masks: list[Mask], volume: Volume, sources: list[Dataset]
) -> np.ndarray:
    """(frames, rows, columns, segments) in the order highdicom pairs frames with sources:
    one frame per single-frame source, or the frames of one multi-frame source in file order."""
    # Each segment's frames contiguous: highdicom's overlap check (a sum over segments)
    # and its per-frame packing run a third faster than on an interleaved stack.
    stacked = np.moveaxis(np.stack([mask.array for mask in masks]), 0, -1)
    if len(sources) == len(volume.sources):
        return stacked
    order = np.argsort([s.frame_number or 0 for s in volume.sources])
    return stacked[order]


def _labels(stacked: np.ndarray) -> np.ndarray:
    """(frames, rows, columns) of segment numbers from one-hot (..., segments) masks; where
    masks overlap, the later segment wins."""
    labels = np.zeros(stacked.shape[:-1], dtype=np.uint8)
    for number in range(stacked.shape[-1]):
        labels[stacked[..., number]] = number + 1
    return labels
