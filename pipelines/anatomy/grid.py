"""The working grid anatomy is segmented on: about 1.5 mm in-plane, the slices as they are.
Volumes are (slice, row, column) tensors; masks go back to the full grid by upsampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.volume import Volume

WORKING_SPACING_MM = 1.5
SLAB = 48  # slices processed at a time at full resolution


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


def downsample(hu: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean HU over factor x factor pixels, a slab of slices at a time."""
    slabs = []
    for start in range(0, hu.shape[0], SLAB):
        values = hu[start : start + SLAB, None].float()
        if factor > 1:
            values = F.avg_pool2d(values, factor, ceil_mode=True)
        slabs.append(values[:, 0])
    return torch.cat(slabs)


def upsample(mask: torch.Tensor, factor: int, shape: torch.Size) -> torch.Tensor:
    """Bilinear upsampling of a coarse mask to the full grid, a slab of slices at a time, over
    the mask's bounding box only (a voxel beyond it is 0 either way)."""
    if factor == 1:
        return mask
    out = torch.zeros(shape, dtype=torch.bool, device=mask.device)
    box = bounding_box(mask, (0, 1, 1))  # bilinear upsampling reads one neighbour
    if box is None:
        return out
    (z0, z1), (y0, y1), (x0, x1) = box
    rows, columns = slice(y0 * factor, y1 * factor), slice(x0 * factor, x1 * factor)
    height = min(shape[1], y1 * factor) - y0 * factor
    width = min(shape[2], x1 * factor) - x0 * factor
    for start in range(z0, z1, SLAB):
        stop = min(start + SLAB, z1)
        slab = mask[start:stop, None, y0:y1, x0:x1].float()
        smooth = F.interpolate(slab, scale_factor=factor, mode="bilinear")
        out[start:stop, rows, columns] = smooth[:, 0, :height, :width] >= 0.5
    return out


def bounding_box(
    mask: torch.Tensor, margins: tuple[int, int, int]
) -> tuple[tuple[int, int], ...] | None:
    """(start, stop) per axis of the voxels set in `mask`, widened by `margins` and kept
    inside the mask's shape; None when none is set."""
    spans = []
    for axis, widen in enumerate(margins):
        others = tuple(a for a in range(3) if a != axis)
        (present,) = torch.nonzero(mask.any(dim=others[1]).any(dim=others[0]), as_tuple=True)
        if present.numel() == 0:
            return None
        start = max(0, int(present[0]) - widen)
        stop = min(mask.shape[axis], int(present[-1]) + 1 + widen)
        spans.append((start, stop))
    return tuple(spans)


def smooth_in_plane(hu: torch.Tensor) -> torch.Tensor:
    """3x3 in-plane mean: sharp-kernel noise in the lung no longer reaches airway HU."""
    return F.avg_pool2d(hu[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
