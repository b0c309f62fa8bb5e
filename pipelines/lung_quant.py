"""`lung-quant`: lungs segmented without weights, and the densitometry a chest radiologist uses.

Segmentation (classic threshold-and-morphology, after Hu et al., IEEE TMI 2001), on a working
grid of about 1.5 mm in-plane:
1. body: the largest connected structure above -500 HU, holes filled slice by slice;
2. air inside the body below -400 HU;
3. trachea and main bronchi: grown from the trachea (a round air column near the midline in
   the top slices) with the strictest threshold that does not leak into the lungs, removed;
4. left and right lungs: the two largest air components; if they touch (anterior junction)
   they are eroded apart and grown back inside the original mask;
5. each lung closed and filled, so vessels and dense infiltrates inside it count as lung.

Measured per lung and in total: volume (mL), mean lung density (HU), LAA-950 (%), the 15th
percentile density (HU) and high-attenuation lung (%, -700 to -100 HU, vessels excluded:
thin dense structures and their partial-volume rim are removed), plus a per-slice profile.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import codes
from pipelines.base import BadInput, DevicePreference, Requirements, Stage
from pipelines.device import run_on
from pipelines.morphology import (
    closing,
    components,
    dilate,
    erode,
    fill_holes_per_slice,
    largest_component,
    opening,
)
from pipelines.result import Mask, Measurement, PipelineResult, Region, Segment, SliceProfile
from pipelines.volume import Volume

log = logging.getLogger(__name__)

WORKING_SPACING_MM = 1.5
BODY_HU = -500
AIR_HU = -400
LAA_HU = -950
HAA_RANGE_HU = (-700, -100)
VESSEL_HU = -300
MIN_LUNG_ML = 100.0
SLAB = 48  # slices processed at a time at full resolution
HISTOGRAM_MIN, HISTOGRAM_MAX = -1024, 3071
TRACHEA_MAX_ML = 120.0

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
HIGH = Segment(
    "High attenuation area",
    codes.MORPHOLOGICALLY_ALTERED_STRUCTURE,
    codes.ABNORMAL_OPACITY,
    codes.LUNG,
    (240, 40, 40),
)


@dataclass(frozen=True)
class WorkingGrid:
    """How the full-resolution volume maps to the coarser grid segmentation runs on."""

    factor: int
    spacing: tuple[float, float, float]

    @classmethod
    def for_volume(cls, volume: Volume) -> WorkingGrid:
        dz, dy, dx = volume.spacing
        factor = max(1, round(WORKING_SPACING_MM / min(dy, dx)))
        return cls(factor, (dz, dy * factor, dx * factor))

    def radii(self, mm: float, through_plane_mm: float | None = None) -> tuple[int, int, int]:
        dz, dy, dx = self.spacing
        z_mm = mm if through_plane_mm is None else through_plane_mm
        return (round(z_mm / dz), max(1, round(mm / dy)), max(1, round(mm / dx)))

    def voxel_ml(self) -> float:
        return math.prod(self.spacing) / 1000.0


class LungQuantPipeline:
    name = "lung-quant"
    version = "1.0"
    requirements = Requirements(
        modalities=("CT",),
        min_slices=20,
        max_slice_thickness_mm=5.0,
        body_parts=("CHEST", "LUNG", "THORAX", "CHEST_ABDOMEN", "CHESTABDOMEN", "CHEST_TO_PELVIS"),
        min_coverage_mm=100.0,
    )

    def __init__(self, device: DevicePreference = "auto") -> None:
        self.device_preference = device

    def problem(self) -> str | None:
        return None

    def run(self, volume: Volume, stage: Stage | None = None) -> PipelineResult:
        return run_on(
            self.device_preference,
            self.name,
            lambda device: self._run(volume, device, stage or (lambda _: None)),
        )

    def _run(self, volume: Volume, device: torch.device, stage: Stage) -> PipelineResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        stage("segment lungs")
        hu = torch.from_numpy(volume.voxels).to(device)
        left, right = segment_lungs(hu, volume)
        timings["segmentation"] = time.perf_counter() - started
        started = time.perf_counter()
        stage("measure")
        lungs = left | right
        low = lungs & (hu < LAA_HU)
        high = high_attenuation(hu, lungs, WorkingGrid.for_volume(volume))
        regions = [
            _region("Left lung", codes.LEFT_LUNG, hu, left, high, volume, LEFT.label),
            _region("Right lung", codes.RIGHT_LUNG, hu, right, high, volume, RIGHT.label),
            _region("Both lungs", codes.LUNG, hu, lungs, high, volume, None, SPANS_BOTH),
        ]
        percent, area = _slice_profiles(lungs, high, volume)
        masks = [
            Mask(segment, mask.cpu().numpy())
            for segment, mask in ((LEFT, left), (RIGHT, right), (LOW, low), (HIGH, high))
        ]
        timings["measurement"] = time.perf_counter() - started
        return PipelineResult(
            pipeline=self.name,
            version=self.version,
            masks=masks,
            regions=regions,
            profiles=[
                SliceProfile("High attenuation lung per slice", codes.PERCENT, percent),
                SliceProfile("High attenuation area per slice", codes.SQUARE_CENTIMETER, area),
            ],
            timings=timings,
        )


def segment_lungs(hu: torch.Tensor, volume: Volume) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right lung masks on the full grid of `hu` (slice, row, column)."""
    grid = WorkingGrid.for_volume(volume)
    coarse = _downsample(hu, grid.factor)
    body = torch.from_numpy(
        fill_holes_per_slice(largest_component((coarse > BODY_HU).cpu().numpy()))
    ).to(hu.device)
    air = (coarse < AIR_HU) & body
    airways = _airways(coarse, air, grid, volume)
    candidates = (air & ~dilate(airways, (0, 1, 1))).cpu().numpy()
    left, right = _split_lungs(candidates, grid, volume)
    full_shape = hu.shape
    lungs = []
    for lung, other in ((left, right), (right, left)):
        filled = closing(torch.from_numpy(lung).to(hu.device), grid.radii(4.0, 0.0))
        filled = torch.from_numpy(fill_holes_per_slice(filled.cpu().numpy())).to(hu.device)
        filled &= body & ~airways & ~torch.from_numpy(other).to(hu.device)
        lungs.append(_upsample(filled, grid.factor, full_shape))
    left_full, right_full = lungs
    overlap = left_full & right_full
    left_full &= ~overlap
    right_full &= ~overlap
    return left_full, right_full


def high_attenuation(hu: torch.Tensor, lungs: torch.Tensor, grid: WorkingGrid) -> torch.Tensor:
    """Lung from -700 to -100 HU that is not a vessel, a vessel's partial-volume rim or the
    lung's own boundary voxels (partial volume with chest wall and diaphragm). Computed a slab
    of slices at a time (with one slice of overlap) to bound memory."""
    out = torch.zeros_like(lungs)
    for start in range(0, hu.shape[0], SLAB):
        low, high = max(0, start - 1), min(hu.shape[0], start + SLAB + 1)
        slab = _high_attenuation_slab(hu[low:high], lungs[low:high], grid)
        out[start : start + SLAB] = slab[start - low : start - low + SLAB]
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


def _airways(
    coarse: torch.Tensor, air: torch.Tensor, grid: WorkingGrid, volume: Volume
) -> torch.Tensor:
    """Trachea and main bronchi, grown from the trachea with a threshold that does not leak."""
    seed = _trachea_seed(air.cpu().numpy(), grid, volume)
    if seed is None:
        log.info("lung-quant: no trachea found in the top slices; airways not removed")
        return torch.zeros_like(air)
    hu = _smooth_in_plane(coarse).cpu().numpy()
    inside = air.cpu().numpy()
    z, region = seed
    seed = (z, *np.unravel_index(np.argmin(np.where(region, hu[z], np.inf)), region.shape))
    for threshold in range(-900, -1010, -10):
        labels, _ = components(inside & (hu < threshold))
        label = labels[seed]
        if label == 0:
            continue
        grown = labels == label
        if grown.sum() * grid.voxel_ml() <= TRACHEA_MAX_ML:
            return torch.from_numpy(grown).to(coarse.device)
    return torch.zeros_like(air)


def _trachea_seed(
    air: np.ndarray, grid: WorkingGrid, volume: Volume
) -> tuple[int, np.ndarray] | None:
    """The trachea on one slice: a small air region near the midline in the top slices."""
    from scipy import ndimage

    superior_first = volume.affine[2, 0] > 0
    order = range(air.shape[0] - 1, -1, -1) if superior_first else range(air.shape[0])
    area_mm2 = grid.spacing[1] * grid.spacing[2]
    center_x = air.shape[2] / 2
    searched = 0
    for z in order:
        labels, count = ndimage.label(air[z])
        if count == 0:
            continue
        searched += 1
        if searched > max(3, round(60 / grid.spacing[0])):
            return None
        for index, region in enumerate(ndimage.find_objects(labels), start=1):
            area = float((labels[region] == index).sum()) * area_mm2
            ys, xs = region
            width_mm = (xs.stop - xs.start) * grid.spacing[2]
            height_mm = (ys.stop - ys.start) * grid.spacing[1]
            mid_x = (xs.start + xs.stop) / 2
            if (
                80 <= area <= 700
                and 8 <= width_mm <= 35
                and 8 <= height_mm <= 35
                and abs(mid_x - center_x) * grid.spacing[2] < 40
            ):
                return z, labels == index
    return None


def _split_lungs(
    candidates: np.ndarray, grid: WorkingGrid, volume: Volume
) -> tuple[np.ndarray, np.ndarray]:
    """The left and right lungs among the air components (patient left is +x in LPS)."""
    min_voxels = MIN_LUNG_ML / grid.voxel_ml()
    for erosions in range(0, 12):
        eroded = (
            erode(torch.from_numpy(candidates), (0, erosions, erosions)).numpy()
            if erosions
            else candidates
        )
        labels, sizes = components(eroded)
        big = [i for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= min_voxels / (1 + erosions)]
        if len(big) == 2 and sizes[big[1]] > 0.15 * sizes[big[0]]:
            seeds = [labels == i for i in big]
            if erosions:
                seeds = _grow_back(seeds, _touching(candidates, seeds))
            return _by_side(seeds, grid, volume)
        if len(big) == 1 and erosions == 0 and not _spans_midline(labels == big[0]):
            break
    labels, sizes = components(candidates)
    if sizes.max(initial=0) < min_voxels:
        raise BadInput("no lungs found: no air-filled region of lung size inside the body")
    raise BadInput("only one lung found; the other is missing or fully opacified")


def _spans_midline(mask: np.ndarray) -> bool:
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    middle = mask.shape[2] / 2
    return bool(
        xs.size and xs[0] < middle - mask.shape[2] * 0.1 < middle + mask.shape[2] * 0.1 < xs[-1]
    )


def _touching(mask: np.ndarray, seeds: list[np.ndarray]) -> np.ndarray:
    """The components of `mask` that contain a seed (not the bowel gas beside them)."""
    labels, _ = components(mask)
    kept = np.unique(np.concatenate([labels[seed] for seed in seeds]))
    return np.isin(labels, kept[kept > 0])


def _grow_back(seeds: list[np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """Give every voxel of `mask` to the nearest seed in its slice (seeds were eroded in-plane)."""
    from scipy import ndimage

    labels = np.zeros(mask.shape, dtype=np.uint8)
    for number, seed in enumerate(seeds, start=1):
        labels[seed] = number
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        if not labels[z].any():
            continue
        nearest = ndimage.distance_transform_edt(
            labels[z] == 0, return_distances=False, return_indices=True
        )
        labels[z] = labels[z][nearest[0], nearest[1]] * mask[z]
    return [labels == number for number in range(1, len(seeds) + 1)]


def _by_side(
    seeds: list[np.ndarray], grid: WorkingGrid, volume: Volume
) -> tuple[np.ndarray, np.ndarray]:
    """(left, right): the component whose centre lies further to patient left (+x) is left."""
    xs = []
    for seed in seeds:
        z, y, x = (float(c.mean()) for c in np.nonzero(seed))
        index = (z, y * grid.factor, x * grid.factor)
        xs.append(volume.to_patient(index)[0])
    return (seeds[0], seeds[1]) if xs[0] > xs[1] else (seeds[1], seeds[0])


def _smooth_in_plane(hu: torch.Tensor) -> torch.Tensor:
    """3x3 in-plane mean: sharp-kernel noise in the lung no longer reaches airway HU."""
    return F.avg_pool2d(hu[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]


def _downsample(hu: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean HU over factor x factor pixels, a slab of slices at a time."""
    slabs = []
    for start in range(0, hu.shape[0], SLAB):
        values = hu[start : start + SLAB, None].float()
        if factor > 1:
            values = F.avg_pool2d(values, factor, ceil_mode=True)
        slabs.append(values[:, 0])
    return torch.cat(slabs)


def _upsample(mask: torch.Tensor, factor: int, shape: torch.Size) -> torch.Tensor:
    """Bilinear upsampling of a coarse mask to the full grid, a slab of slices at a time."""
    if factor == 1:
        return mask
    out = torch.empty(shape, dtype=torch.bool, device=mask.device)
    for start in range(0, shape[0], SLAB):
        slab = mask[start : start + SLAB, None].float()
        smooth = F.interpolate(slab, scale_factor=factor, mode="bilinear")
        out[start : start + SLAB] = smooth[:, 0, : shape[1], : shape[2]] >= 0.5
    return out


def _region(
    name: str,
    site: codes.Code,
    hu: torch.Tensor,
    mask: torch.Tensor,
    high: torch.Tensor,
    volume: Volume,
    segment: str | None,
    spans: tuple[str, ...] = (),
) -> Region:
    histogram = _histogram(hu, mask)
    voxels = int(histogram.sum())
    if voxels == 0:
        raise BadInput(f"{name.lower()}: empty after segmentation")
    values = torch.arange(HISTOGRAM_MIN, HISTOGRAM_MIN + len(histogram), dtype=torch.float64)
    mean = float((histogram * values).sum()) / voxels
    perc15 = float(values[int(torch.searchsorted(histogram.cumsum(0), 0.15 * voxels))])
    below = int(histogram[: LAA_HU - HISTOGRAM_MIN].sum())
    measurements = (
        Measurement(codes.VOLUME, round(voxels * volume.voxel_volume_ml, 1), codes.MILLILITER),
        Measurement(codes.MEAN_ATTENUATION, round(mean, 1), codes.HOUNSFIELD_UNIT),
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
    """True voxels per slice (slab by slab: a reduction over a whole volume upcasts it)."""
    return torch.cat(
        [
            torch.count_nonzero(mask[start : start + SLAB], dim=(1, 2))
            for start in range(0, mask.shape[0], SLAB)
        ]
    ).double()


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
