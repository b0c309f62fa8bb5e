"""`lung-quant`: lungs (with the pathology they hold) and the airway segmented without
weights (`pipelines.anatomy.lungs`), and the densitometry a chest radiologist uses.

Measured per lung and in total: volume (mL), mean lung density (HU), LAA-950 (%), the 15th
percentile density (HU) and high-attenuation lung (%, -700 to -100 HU, vessels excluded:
thin dense structures and their partial-volume rim are removed), plus a per-slice profile.
High attenuation is looked for in the aerated lung (before the pleural reconstruction): the
dense lesions the reconstruction adds count in the lung's volume, and their partial-volume
rims are not parenchyma of high attenuation (on COVID-CT-MD's labels the per-slice profile
ranks infected slices better so: `make eval`).

Densitometry (LAA-950, Perc15, high attenuation, their masks and profile) is measured only on
a soft or standard reconstruction kernel (`pipelines.kernel`); on a sharp one the report says
why it is not, and on a kernel it does not recognise it says what it assumed.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipelines import codes
from pipelines.anatomy.grid import SLAB, WorkingGrid, bounding_box
from pipelines.availability import LUNG_QUANT
from pipelines.base import BadInput, DevicePreference, Requirements, Stage
from pipelines.context import Context, Need, context_for
from pipelines.device import run_on
from pipelines.kernel import KernelClass, Reconstruction, reconstruction
from pipelines.morphology import dilate, erode, opening
from pipelines.result import (
    Mask,
    Measurement,
    Note,
    PipelineResult,
    Region,
    Segment,
    SliceProfile,
)
from pipelines.settings import PipelineSettings
from pipelines.volume import Volume

LAA_HU = -950
HAA_RANGE_HU = (-700, -100)
VESSEL_HU = -300
HISTOGRAM_MIN, HISTOGRAM_MAX = -1024, 3071

LEFT = Segment("Left lung", codes.ANATOMICAL_STRUCTURE, codes.LEFT_LUNG, None, (80, 160, 255))
RIGHT = Segment("Right lung", codes.ANATOMICAL_STRUCTURE, codes.RIGHT_LUNG, None, (255, 170, 60))
LOW = Segment(
    "Low attenuation area",
    codes.MORPHOLOGICALLY_ALTERED_STRUCTURE,
    codes.PULMONARY_EMPHYSEMA,
    codes.LUNG,
    (40, 220, 220),
)
SPANS_BOTH = (LEFT.label, RIGHT.label)
AIRWAY = Segment(
    "Trachea and main bronchi",
    codes.ANATOMICAL_STRUCTURE,
    codes.TRACHEA_AND_BRONCHUS,
    None,
    (250, 250, 210),
)
HIGH = Segment(
    "High attenuation area",
    codes.MORPHOLOGICALLY_ALTERED_STRUCTURE,
    codes.ABNORMAL_OPACITY,
    codes.LUNG,
    (240, 40, 40),
)


class LungQuantPipeline:
    name = "lung-quant"
    version = LUNG_QUANT.version
    requirements = Requirements(
        modalities=("CT",),
        min_slices=20,
        max_slice_thickness_mm=5.0,
        body_parts=("CHEST", "LUNG", "THORAX", "CHEST_ABDOMEN", "CHESTABDOMEN", "CHEST_TO_PELVIS"),
        min_coverage_mm=100.0,
    )
    needs = frozenset({Need.LUNGS})

    def __init__(self, device: DevicePreference = "auto") -> None:
        self.device_preference = device

    @classmethod
    def configured(cls, name: str, settings: PipelineSettings) -> LungQuantPipeline:
        """As the registry builds it: only the device is configurable."""
        return cls(settings.device)

    def problem(self) -> str | None:
        return LUNG_QUANT.problem

    def run(self, volume: Volume, context: Context | Stage | None = None) -> PipelineResult:
        job = context_for(self, context)
        return run_on(
            self.device_preference, self.name, lambda device: self._run(volume, device, job)
        )

    def _run(self, volume: Volume, device: torch.device, context: Context) -> PipelineResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        context("segment lungs")
        hu = torch.from_numpy(volume.voxels).to(device)
        left, right, airway, aerated = context.lungs(volume, device)
        timings["segmentation"] = time.perf_counter() - started
        started = time.perf_counter()
        context("measure")
        recon = reconstruction(volume.file_headers[0] if volume.file_headers else None)
        lungs = left | right
        segments = [(LEFT, left), (RIGHT, right)]
        profiles = []
        high = None
        if recon.kind != KernelClass.SHARP:
            high = high_attenuation(hu, aerated, WorkingGrid.for_volume(volume))
            percent, area = _slice_profiles(lungs, high, volume)
            profiles = [
                SliceProfile("High attenuation lung per slice", codes.PERCENT, percent),
                SliceProfile("High attenuation area per slice", codes.SQUARE_CENTIMETER, area),
            ]
            segments += [(LOW, lungs & (hu < LAA_HU)), (HIGH, high)]
        del aerated  # a 600-slice mask is 160 MB
        regions = [
            _region("Left lung", codes.LEFT_LUNG, hu, left, high, volume, LEFT.label),
            _region("Right lung", codes.RIGHT_LUNG, hu, right, high, volume, RIGHT.label),
            _region("Both lungs", codes.LUNG, hu, lungs, high, volume, None, SPANS_BOTH),
        ]
        if airway.any():
            segments.append((AIRWAY, airway))
        masks = [Mask(segment, mask.cpu().numpy()) for segment, mask in segments]
        timings["measurement"] = time.perf_counter() - started
        return PipelineResult(
            pipeline=self.name,
            version=self.version,
            masks=masks,
            regions=regions,
            profiles=profiles,
            notes=[Note(codes.COMMENT, densitometry_note(recon))],
            timings=timings,
        )


def high_attenuation(hu: torch.Tensor, lungs: torch.Tensor, grid: WorkingGrid) -> torch.Tensor:
    """Lung from -700 to -100 HU that is not a vessel, a vessel's partial-volume rim or the
    lung's own boundary voxels (partial volume with chest wall and diaphragm). Computed in
    the lungs' box widened by one voxel (each step's box reaches past it only through that
    rim of background, as over the whole volume), a slab of slices at a time (with one slice
    of overlap) to bound memory."""
    out = torch.zeros_like(lungs)
    box = bounding_box(lungs, (1, 1, 1))
    if box is None:
        return out
    (z0, z1), (y0, y1), (x0, x1) = box
    region = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    hu, lungs, inside = hu[region], lungs[region], out[region]
    for start in range(0, hu.shape[0], SLAB):
        low, high = max(0, start - 1), min(hu.shape[0], start + SLAB + 1)
        slab = _high_attenuation_slab(hu[low:high], lungs[low:high], grid)
        inside[start : start + SLAB] = slab[start - low : start - low + SLAB]
    return out


def _high_attenuation_slab(
    hu: torch.Tensor, lungs: torch.Tensor, grid: WorkingGrid
) -> torch.Tensor:
    low, high = HAA_RANGE_HU
    candidate = lungs & (hu >= low) & (hu <= high) & erode(lungs, (1, 1, 1))
    full = (0, max(1, grid.factor // 2), max(1, grid.factor // 2))
    dense = lungs & (hu > VESSEL_HU)
    thin_dense = dense & ~opening(dense, (0, 2 * full[1], 2 * full[2]))
    candidate &= ~dilate(thin_dense, full)
    return opening(candidate, full)


def densitometry_note(recon: Reconstruction) -> str:
    """What the report says of the reconstruction its densitometry was (not) measured on."""
    if recon.kind == KernelClass.SHARP:
        return (
            f"LAA-950, Perc15 and high attenuation not measured: reconstruction kernel "
            f"{recon.described} is sharp, and its noise biases lung density; they need a soft "
            "or standard kernel (QIBA lung density profile). Volumes and masks are valid."
        )
    if recon.kind == KernelClass.SOFT:
        return f"Densitometry measured on a soft or standard kernel: {recon.described}."
    return (
        f"Densitometry measured on reconstruction kernel {recon.described}, not recognised as "
        "soft or sharp: it assumes a soft or standard kernel; on a sharp one LAA-950 reads high."
    )


def _region(
    name: str,
    site: codes.Code,
    hu: torch.Tensor,
    mask: torch.Tensor,
    high: torch.Tensor | None,
    volume: Volume,
    segment: str | None,
    spans: tuple[str, ...] = (),
) -> Region:
    """The region's volume and mean attenuation; with `high` (a soft or unknown kernel), its
    densitometry too."""
    histogram = _histogram(hu, mask)
    voxels = int(histogram.sum())
    if voxels == 0:
        raise BadInput(f"{name.lower()}: empty after segmentation")
    values = torch.arange(HISTOGRAM_MIN, HISTOGRAM_MIN + len(histogram), dtype=torch.float64)
    mean = float((histogram * values).sum()) / voxels
    perc15 = float(values[int(torch.searchsorted(histogram.cumsum(0), 0.15 * voxels))])
    below = int(histogram[: LAA_HU - HISTOGRAM_MIN].sum())
    measurements: tuple[Measurement, ...] = (
        Measurement(codes.VOLUME, round(voxels * volume.voxel_volume_ml, 1), codes.MILLILITER),
        Measurement(codes.MEAN_ATTENUATION, round(mean, 1), codes.HOUNSFIELD_UNIT),
    )
    if high is not None:
        measurements += (
            Measurement(codes.PERC15, round(perc15, 1), codes.HOUNSFIELD_UNIT),
            Measurement(codes.LAA950, round(100.0 * below / voxels, 2), codes.PERCENT),
            Measurement(
                codes.HIGH_ATTENUATION,
                round(100.0 * int(torch.count_nonzero(high & mask)) / voxels, 2),
                codes.PERCENT,
            ),
        )
    return Region(name, site, measurements, segment, spans)


def _histogram(hu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Counts of HU (rounded, from -1024 to 3071) inside `mask`, slab by slab."""
    bins = HISTOGRAM_MAX - HISTOGRAM_MIN + 1
    counts = torch.zeros(bins, dtype=torch.float64, device=hu.device)
    for start in range(0, hu.shape[0], SLAB):
        inside = hu[start : start + SLAB][mask[start : start + SLAB]]
        index = (inside.float().round().long() - HISTOGRAM_MIN).clamp(0, bins - 1)
        counts += torch.bincount(index, minlength=bins).double()
    return counts.cpu()


def _count_per_slice(mask: torch.Tensor) -> torch.Tensor:
    """True voxels per slice, counted by NumPy (torch's count over two of three axes of a
    boolean volume is 20 times slower on the CPU)."""
    flat = mask.cpu().numpy().reshape(mask.shape[0], -1)
    return torch.from_numpy(np.count_nonzero(flat, axis=1)).double()


def _slice_profiles(
    lungs: torch.Tensor, high: torch.Tensor, volume: Volume
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """High-attenuation lung per slice: as % of the slice's lung, and as area in cm²."""
    lung_per_slice = _count_per_slice(lungs)
    high_per_slice = _count_per_slice(high & lungs)
    percent = torch.where(
        lung_per_slice > 0, 100.0 * high_per_slice / lung_per_slice.clamp(min=1), 0.0
    )
    _, dy, dx = volume.spacing
    area = high_per_slice * (dy * dx / 100.0)
    return (
        tuple(round(float(v), 2) for v in percent.cpu()),
        tuple(round(float(v), 2) for v in area.cpu()),
    )
