"""A stored CT series as one 3-D volume in Hounsfield units, with its patient-space geometry.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected
on row x column direction), never by file name, Instance Number or Slice Location. Headers are
read and checked before any pixel is decoded, so a series that cannot be used fails in
milliseconds with a reason a PACS administrator can act on. Localizers (and derived images
mixed with original ones) are dropped with a log line; every other defect is an error.

Voxel array axes are (slice, row, column). `affine` maps homogeneous voxel indices
(slice, row, column, 1) to DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from numpy.typing import ArrayLike
from pydicom.dataset import Dataset

from pipelines import decoding
from pipelines.base import BadInput, Requirements

log = logging.getLogger(__name__)

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ORIENTATION_TOLERANCE = 1e-3
TILT_TOLERANCE_DEGREES = 0.5
AIR_HU = -1024

Progress = Callable[[int, int], None]
FrameReader = Callable[[Path], np.ndarray]
"""A file's stored pixel values as (frames, rows, columns): `stored_frames`, or a cache of it."""


class GeometryError(BadInput):
    """The slices do not form one regular volume."""


@dataclass(frozen=True)
class VolumeOptions:
    """How strict volume loading is (the `volume` section of the node's config)."""

    gantry_tilt: Literal["refuse", "resample"] = "refuse"
    spacing_tolerance: float = 0.1
    min_slices: int = 3
    decode_threads: int = field(default_factory=lambda: os.cpu_count() or 1)


@dataclass(frozen=True)
class SourceFrame:
    """Where one slice of the volume came from: a file and, for multi-frame images, a frame."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None


@dataclass(frozen=True)
class FrameHeader:
    """The header facts of one slice that geometry and rescaling need."""

    source: SourceFrame
    modality: str
    image_type: tuple[str, ...]
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    slice_thickness: float | None
    body_part: str


@dataclass
class Volume:
    """A CT series as voxels in HU, its geometry and its source slices in volume order.

    HU below air (-1024) are padding outside the reconstruction circle and read as air.
    """

    voxels: np.ndarray
    affine: np.ndarray
    sources: tuple[SourceFrame, ...]
    modality: str
    slice_thickness: float | None
    study_instance_uid: str
    series_instance_uid: str
    dropped: tuple[str, ...] = ()
    file_headers: tuple[Dataset, ...] = ()
    """The source files' headers (no pixel data), in volume order, one per file."""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (slice, row, column) in mm."""
        slices, rows, columns = (float(np.linalg.norm(self.affine[:3, axis])) for axis in range(3))
        return slices, rows, columns

    @property
    def voxel_volume_ml(self) -> float:
        return math.prod(self.spacing) / 1000.0

    def to_patient(self, index: ArrayLike) -> np.ndarray:
        """Voxel indices (slice, row, column), shape (..., 3), to patient LPS coordinates in
        mm, same shape."""
        return np.asarray(index, dtype=float) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_voxel(self, point: ArrayLike) -> np.ndarray:
        """Patient LPS coordinates in mm, shape (..., 3), to continuous voxel indices (slice,
        row, column), same shape: the inverse of `to_patient`."""
        inverse = np.linalg.inv(self.affine)
        return np.asarray(point, dtype=float) @ inverse[:3, :3].T + inverse[:3, 3]

    def box_corners(self, low: ArrayLike, high: ArrayLike) -> np.ndarray:
        """The eight corners of a patient-space box (LPS mm, min and max corners) as
        continuous voxel indices, shape (8, 3)."""
        (x0, y0, z0), (x1, y1, z1) = np.asarray(low, float), np.asarray(high, float)
        corners = [[x, y, z] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)]
        return self.to_voxel(corners)


def load_volume(
    files: Sequence[Path],
    options: VolumeOptions | None = None,
    requirements: Requirements | None = None,
    progress: Progress | None = None,
    frames: FrameReader | None = None,
) -> Volume:
    """Read, check and decode a series (`frames` reads each file's pixels: `stored_frames`
    unless given). Raises BadInput (GeometryError) with the reason."""
    options = options or VolumeOptions()
    headers: list[FrameHeader] = []
    datasets: dict[Path, Dataset] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise BadInput(f"{path.name}: not a readable DICOM file ({exc})") from exc
        datasets[path] = ds
        headers.extend(_frame_headers(path, ds))
    kept, dropped = _select_images(headers)
    if requirements is not None:
        _check_requirements(kept, requirements)
    ordered, affine, shifts = _geometry(kept, options)
    voxels = _decode(ordered, shifts, options.decode_threads, progress, frames or stored_frames)
    file_headers = tuple(datasets[path] for path in dict.fromkeys(h.source.path for h in ordered))
    return Volume(
        voxels=voxels,
        affine=affine,
        sources=tuple(h.source for h in ordered),
        modality=ordered[0].modality,
        slice_thickness=ordered[0].slice_thickness,
        study_instance_uid=str(file_headers[0].StudyInstanceUID),
        series_instance_uid=str(file_headers[0].SeriesInstanceUID),
        dropped=tuple(dropped),
        file_headers=file_headers,
    )


def _frame_headers(path: Path, ds: Dataset) -> list[FrameHeader]:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == ENHANCED_CT or "PerFrameFunctionalGroupsSequence" in ds:
        return _multiframe_headers(path, ds)
    if "Rows" not in ds:
        return []
    missing = [
        k
        for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
        if k not in ds
    ]
    if missing and not _is_localizer(tuple(ds.get("ImageType", ()))):
        raise GeometryError(f"{ds.SOPInstanceUID}: no {', '.join(missing)}; cannot place the slice")
    return [
        FrameHeader(
            source=SourceFrame(path, str(ds.SOPInstanceUID), sop_class),
            modality=str(ds.get("Modality", "")),
            image_type=_image_type(ds.get("ImageType", ())),
            position=np.asarray(ds.get("ImagePositionPatient", [0, 0, 0]), dtype=float),
            orientation=np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float),
            pixel_spacing=_pair(ds.get("PixelSpacing", [1, 1])),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            slope=_slope(ds),
            intercept=_intercept(ds),
            slice_thickness=_float_or_none(ds.get("SliceThickness")),
            body_part=str(ds.get("BodyPartExamined", "") or "").upper(),
        )
    ]


def _multiframe_headers(path: Path, ds: Dataset) -> list[FrameHeader]:
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    image_type = _image_type(ds.get("ImageType", ()))
    headers = []
    for number, groups in enumerate(per_frame, start=1):

        def item(sequence: str, groups: Dataset = groups) -> Dataset | None:
            for source in (groups, shared):
                if sequence in source and len(source[sequence].value):
                    return source[sequence][0]
            return None

        position, orientation = item("PlanePositionSequence"), item("PlaneOrientationSequence")
        measures = item("PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise GeometryError(
                f"{ds.SOPInstanceUID} frame {number}: no plane position, "
                "orientation or pixel spacing"
            )
        rescale = item("PixelValueTransformationSequence") or Dataset()
        frame_type = item("CTImageFrameTypeSequence")
        headers.append(
            FrameHeader(
                source=SourceFrame(path, str(ds.SOPInstanceUID), str(ds.SOPClassUID), number),
                modality=str(ds.get("Modality", "")),
                image_type=_image_type(frame_type.FrameType)
                if frame_type is not None and "FrameType" in frame_type
                else image_type,
                position=np.asarray(position.ImagePositionPatient, dtype=float),
                orientation=np.asarray(orientation.ImageOrientationPatient, dtype=float),
                pixel_spacing=_pair(measures.PixelSpacing),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=_slope(rescale),
                intercept=_intercept(rescale),
                slice_thickness=_float_or_none(measures.get("SliceThickness")),
                body_part=str(ds.get("BodyPartExamined", "") or "").upper(),
            )
        )
    return headers


def _is_localizer(image_type: tuple[str, ...]) -> bool:
    return "LOCALIZER" in image_type


def _select_images(headers: list[FrameHeader]) -> tuple[list[FrameHeader], list[str]]:
    """Drop localizers, and derived images when original ones are present."""
    dropped: list[str] = []
    kept = []
    for header in headers:
        if _is_localizer(header.image_type):
            dropped.append(f"{header.source.sop_instance_uid}: localizer")
        else:
            kept.append(header)
    originals = [h for h in kept if h.image_type[:1] == ("ORIGINAL",)]
    if originals and len(originals) < len(kept):
        for header in kept:
            if header.image_type[:1] != ("ORIGINAL",):
                dropped.append(f"{header.source.sop_instance_uid}: derived image")
        kept = originals
    for reason in dropped:
        log.info("dropped from the volume: %s", reason)
    if not kept:
        raise BadInput("the series holds no axial images (only localizers or non-image objects)")
    return kept, dropped


def _check_requirements(headers: list[FrameHeader], requirements: Requirements) -> None:
    modalities = sorted({h.modality for h in headers})
    if any(m not in requirements.modalities for m in modalities):
        raise BadInput(
            f"modality {'/'.join(modalities)}; this pipeline needs "
            f"{' or '.join(requirements.modalities)}"
        )
    if len(headers) < requirements.min_slices:
        raise BadInput(
            f"{len(headers)} slices; this pipeline needs at least {requirements.min_slices}"
        )
    thickness = headers[0].slice_thickness
    limit = requirements.max_slice_thickness_mm
    if limit is not None and thickness is not None and thickness > limit + 1e-6:
        raise BadInput(
            f"slice thickness {thickness:g} mm; this pipeline needs at most {limit:g} mm"
        )
    body_part = headers[0].body_part
    if requirements.body_parts and body_part and body_part not in requirements.body_parts:
        raise BadInput(
            f"body part {body_part}; this pipeline needs {' or '.join(requirements.body_parts)}"
        )
    if requirements.min_coverage_mm:
        normal = np.cross(*headers[0].orientation.reshape(2, 3))
        along = [float(h.position @ normal) for h in headers]
        coverage = max(along) - min(along)
        if coverage < requirements.min_coverage_mm:
            raise BadInput(
                f"the series covers {coverage:.0f} mm; this pipeline needs at least "
                f"{requirements.min_coverage_mm:.0f} mm (a whole chest)"
            )


def _geometry(
    headers: list[FrameHeader], options: VolumeOptions
) -> tuple[list[FrameHeader], np.ndarray, np.ndarray | None]:
    """Sort slices along the normal, check them, and build the affine.

    Returns the ordered headers, the affine and, for a resampled gantry tilt, each slice's
    in-plane shift (rows, columns) that straightens the volume.
    """
    if len(headers) < options.min_slices:
        raise GeometryError(f"{len(headers)} slices; a volume needs at least {options.min_slices}")
    reference = headers[0]
    for header in headers:
        if not np.allclose(header.orientation, reference.orientation, atol=ORIENTATION_TOLERANCE):
            raise GeometryError(
                f"mixed orientations: {_fmt(reference.orientation)} and "
                f"{_fmt(header.orientation)} in one series"
            )
        if (header.rows, header.columns) != (reference.rows, reference.columns) or not np.allclose(
            header.pixel_spacing, reference.pixel_spacing, atol=1e-4
        ):
            raise GeometryError("mixed image sizes or pixel spacings in one series")
    row_dir, col_dir = reference.orientation.reshape(2, 3)
    normal = np.cross(row_dir, col_dir)
    ordered = sorted(headers, key=lambda h: float(h.position @ normal))
    along = np.array([float(h.position @ normal) for h in ordered])
    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < 1e-3)
    if duplicate.size:
        first = ordered[duplicate[0]].source.sop_instance_uid
        second = ordered[duplicate[0] + 1].source.sop_instance_uid
        raise GeometryError(
            f"duplicate slice position {along[duplicate[0]]:.2f} mm ({first} and {second})"
        )
    spacing = float(np.median(steps))
    tolerance = options.spacing_tolerance * spacing
    for index in np.flatnonzero(np.abs(steps - spacing) > tolerance):
        if steps[index] > spacing * 1.5:
            missing = round(steps[index] / spacing) - 1
            raise GeometryError(
                f"missing slices: a gap of {steps[index]:.2f} mm at {along[index]:.2f} mm "
                f"where the spacing is {spacing:.2f} mm (about {missing} slice(s) missing)"
            )
        raise GeometryError(
            f"non-uniform slice spacing: {steps[index]:.2f} mm at {along[index]:.2f} mm, "
            f"median {spacing:.2f} mm"
        )
    shifts = _tilt_shifts(ordered, normal, spacing, options)
    row_spacing, column_spacing = reference.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = normal * spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = row_dir * column_spacing
    affine[:3, 3] = ordered[0].position
    return ordered, affine, shifts


def _tilt_shifts(
    ordered: list[FrameHeader], normal: np.ndarray, spacing: float, options: VolumeOptions
) -> np.ndarray | None:
    """In-plane offset of each slice from a stack straight along the normal (gantry tilt)."""
    origin = ordered[0].position
    offsets = np.array([h.position - origin for h in ordered])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    extent = float((ordered[-1].position - origin) @ normal)
    drift = float(np.linalg.norm(in_plane[-1]))
    tilt = math.degrees(math.atan2(drift, extent))
    if tilt < TILT_TOLERANCE_DEGREES:
        return None
    if options.gantry_tilt == "refuse":
        raise GeometryError(
            f"gantry tilt of {tilt:.1f} degrees; set volume.gantry_tilt: resample to process "
            "such series"
        )
    log.info("gantry tilt of %.1f degrees: resampling slices onto a straight grid", tilt)
    row_dir, col_dir = ordered[0].orientation.reshape(2, 3)
    row_spacing, column_spacing = ordered[0].pixel_spacing
    return np.stack([in_plane @ col_dir / row_spacing, in_plane @ row_dir / column_spacing], 1)


def _decode(
    ordered: list[FrameHeader],
    shifts: np.ndarray | None,
    threads: int,
    progress: Progress | None,
    frames: FrameReader,
) -> np.ndarray:
    exact = all(h.slope == 1 and float(h.intercept).is_integer() for h in ordered)
    dtype = np.int16 if exact else np.float32
    first = ordered[0]
    voxels = np.empty((len(ordered), first.rows, first.columns), dtype=dtype)
    by_file: dict[Path, list[int]] = {}
    for index, header in enumerate(ordered):
        by_file.setdefault(header.source.path, []).append(index)
    done = 0

    def decode_file(path: Path) -> int:
        pixels = frames(path)
        for index in by_file[path]:
            header = ordered[index]
            frame = pixels[(header.source.frame_number or 1) - 1].astype(np.float32)
            frame = frame * header.slope + header.intercept
            if shifts is not None:
                frame = _shift(frame, shifts[index])
            voxels[index] = np.clip(frame, AIR_HU, 32767 if exact else None)
        return len(by_file[path])

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for count in pool.map(decode_file, by_file):
            done += count
            if progress is not None:
                progress(done, len(ordered))
    return voxels


def stored_frames(path: Path) -> np.ndarray:
    """The file's stored pixel values as (frames, rows, columns), before rescaling."""
    ds = pydicom.dcmread(path)
    pixels = decoding.pixel_array(ds)
    if ds.get("NumberOfFrames", 1) in (None, "", 1) or pixels.ndim == 2:
        pixels = pixels.reshape((1, *pixels.shape[-2:]))
    return pixels


def _shift(frame: np.ndarray, shift: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.shift(frame, shift, order=1, mode="constant", cval=AIR_HU)


def _image_type(values: Sequence[object]) -> tuple[str, ...]:
    return tuple(str(v).upper() for v in values)


def _slope(item: Dataset) -> float:
    """Rescale Slope of an image or a Pixel Value Transformation item (absent or empty: 1)."""
    return float(item.get("RescaleSlope", 1) or 1)


def _intercept(item: Dataset) -> float:
    return float(item.get("RescaleIntercept", 0) or 0)


def _pair(value: Sequence[float]) -> tuple[float, float]:
    return float(value[0]), float(value[1])


def _float_or_none(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _fmt(vector: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in vector) + "]"
