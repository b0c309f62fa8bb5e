"""Small synthetic CT series for unit tests: known geometry, written as real DICOM files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

HuFunction = Callable[[np.ndarray], np.ndarray]
"""Maps patient coordinates (..., 3) in mm (LPS) to HU."""


@dataclass
class Geometry:
    """A stack of slices: `rows` x `columns` pixels, spacing, orientation and slice origins."""

    rows: int = 48
    columns: int = 40
    pixel_spacing: tuple[float, float] = (1.0, 1.25)  # (between rows, between columns)
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)
    origin: tuple[float, float, float] = (-25.0, -24.0, -40.0)
    slice_step: float = 2.5
    slices: int = 32
    positions: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.positions:
            normal = np.cross(*np.reshape(self.orientation, (2, 3)))
            self.positions = [
                np.asarray(self.origin) + k * self.slice_step * normal for k in range(self.slices)
            ]

    def coordinates(self, position: np.ndarray) -> np.ndarray:
        """Patient coordinates (rows, columns, 3) of every pixel of the slice at `position`."""
        row_dir, col_dir = np.reshape(self.orientation, (2, 3))
        r = np.arange(self.rows)[:, None, None] * self.pixel_spacing[0] * col_dir
        c = np.arange(self.columns)[None, :, None] * self.pixel_spacing[1] * row_dir
        return position + r + c


def sphere(center: Sequence[float], radius: float, inside: float, outside: float) -> HuFunction:
    def hu(points: np.ndarray) -> np.ndarray:
        distance = np.linalg.norm(points - np.asarray(center), axis=-1)
        return np.where(distance <= radius, inside, outside)

    return hu


def _base(geometry: Geometry, study: str, series: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "Phantom^Test", "PHANTOM1"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study, "frame-of-reference"])
    ds.Rows, ds.Columns = geometry.rows, geometry.columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.BodyPartExamined = "CHEST"
    return ds


def write_series(
    folder: Path,
    geometry: Geometry,
    hu: HuFunction,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    image_type: Callable[[int], list[str]] = lambda k: ["ORIGINAL", "PRIMARY", "AXIAL"],
    modality: str = "CT",
    names: Callable[[int], str] = lambda k: f"{(k * 7919) % 1000:04d}-{k}.dcm",
) -> list[Path]:
    """One file per slice, in scrambled file-name order; pixel values stored as (HU - b) / m."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k, position in enumerate(geometry.positions):
        ds = _base(geometry, study, series, CT_IMAGE)
        ds.Modality = modality
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = image_type(k)
        ds.InstanceNumber = len(geometry.positions) - k
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = list(geometry.orientation)
        ds.PixelSpacing = list(geometry.pixel_spacing)
        ds.SliceThickness = geometry.slice_step
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu(geometry.coordinates(position)) - intercept) / slope)
        ds.PixelData = stored.astype(np.int16).tobytes()
        path = folder / names(k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced(path: Path, geometry: Geometry, hu: HuFunction) -> Path:
    """The same stack as one Enhanced CT Image (multi-frame) file."""
    ds = _base(geometry, generate_uid(), generate_uid(), ENHANCED_CT)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(geometry.positions)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(geometry.pixel_spacing)
    measures.SliceThickness = geometry.slice_step
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(geometry.orientation)
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, per_frame = [], []
    for position in reversed(geometry.positions):
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [round(float(v), 4) for v in position]
        item.PlanePositionSequence = [plane]
        per_frame.append(item)
        frames.append(np.round(hu(geometry.coordinates(position)) + 1024).astype(np.int16))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def chest_geometry() -> Geometry:
    """A 330 x 260 x 230 mm field of view at 2 x 2 x 5 mm: room for `chest()`."""
    return Geometry(
        rows=130,
        columns=165,
        pixel_spacing=(2.0, 2.0),
        origin=(-164.0, -130.0, -100.0),
        slice_step=5.0,
        slices=47,
    )


def body_without_lungs(points: np.ndarray) -> np.ndarray:
    """`chest()`'s body (soft tissue) with no lungs and no airway in it."""
    return np.where((points[..., 0] / 150) ** 2 + (points[..., 1] / 110) ** 2 <= 1, 40.0, -1000.0)


def chest(
    left_center: Sequence[float] = (60, 0, 0), right_center: Sequence[float] = (-60, 0, 0)
) -> HuFunction:
    """A body (soft tissue) holding two ellipsoid lungs (-850 HU) and a trachea (-1000 HU)."""

    def hu(points: np.ndarray) -> np.ndarray:
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        values = np.full(x.shape, -1000.0)
        values[(x / 150) ** 2 + (y / 110) ** 2 <= 1] = 40.0
        for cx, cy, cz in (left_center, right_center):
            inside = ((x - cx) / 50) ** 2 + ((y - cy) / 70) ** 2 + ((z - cz) / 90) ** 2 <= 1
            values[inside] = -850.0
        values[(x**2 + (y + 40) ** 2 <= 9**2) & (z > 20)] = -1000.0
        return values

    return hu
