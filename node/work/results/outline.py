"""A representative 2-D outline of a 3-D region: where viewers draw an SR measurement group.

Viewers such as OHIF draw a measurement only from a SCOORD on a source image; a group that
references just a SEG segment shows nothing (OHIF 3.13 even fails on it). So each region also
gets its outline on the slice where it is largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import measure

from pipelines.result import Detection
from pipelines.volume import Volume

TOLERANCE_PIXELS = 1.0


@dataclass(frozen=True)
class Outline:
    slice_index: int
    points: np.ndarray  # (n, 2) column, row in DICOM image coordinates, closed


def representative_outline(mask: np.ndarray) -> Outline | None:
    """The outline of the largest part of `mask` on the slice where the mask is largest."""
    areas = mask.sum(axis=(1, 2))
    if not areas.any():
        return None
    index = int(np.argmax(areas))
    contours = measure.find_contours(np.pad(mask[index], 1).astype(np.uint8), 0.5)
    contour = max(contours, key=lambda c: _area(c))
    polygon = measure.approximate_polygon(contour, tolerance=TOLERANCE_PIXELS)
    # back from the padded grid; +0.5: SCOORD (0,0) is the top left corner of the top left pixel
    points = polygon[:, ::-1] - 1 + 0.5
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return Outline(index, points.astype(np.float32))


def _area(contour: np.ndarray) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def source_of(volume: Volume, slice_index: int) -> tuple[str, str, int | None]:
    """(SOP Class UID, SOP Instance UID, frame number) of a slice of the volume."""
    source = volume.sources[slice_index]
    return source.sop_class_uid, source.sop_instance_uid, source.frame_number


@dataclass(frozen=True)
class DetectionBox:
    slice_index: int
    points: np.ndarray  # closed rectangle, (column, row) image coordinates
    long_axis_mm: float  # the box's longer in-plane side


def detection_box(detection: Detection, volume: Volume) -> DetectionBox:
    """A patient-space box as a rectangle on the source slice through its centre."""
    indices = volume.box_corners(detection.box_min, detection.box_max)  # (slice, row, column)
    last = volume.voxels.shape[0] - 1
    slice_index = int(np.clip(round(float(indices[:, 0].mean())), 0, last))
    row0, row1 = indices[:, 1].min(), indices[:, 1].max()
    col0, col1 = indices[:, 2].min(), indices[:, 2].max()
    rectangle = (
        np.array(
            [[col0, row0], [col1, row0], [col1, row1], [col0, row1], [col0, row0]], dtype=np.float32
        )
        + 0.5
    )
    _, row_mm, column_mm = volume.spacing
    long_axis = float(max((row1 - row0) * row_mm, (col1 - col0) * column_mm))
    return DetectionBox(slice_index, rectangle, long_axis)
