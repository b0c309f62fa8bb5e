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
    """Bilinear upsampling of a coarse mask to the full grid, a slab of slices at a time."""
    if factor == 1:
        return mask
    out = torch.empty(shape, dtype=torch.bool, device=mask.device)
    for start in range(0, shape[0], SLAB):
        slab = mask[start : start + SLAB, None].float()
        smooth = F.interpolate(slab, scale_factor=factor, mode="bilinear")
        out[start : start + SLAB] = smooth[:, 0, : shape[1], : shape[2]] >= 0.5
    return out


def smooth_in_plane(hu: torch.Tensor) -> torch.Tensor:
    """3x3 in-plane mean: sharp-kernel noise in the lung no longer reaches airway HU."""
    return F.avg_pool2d(hu[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
