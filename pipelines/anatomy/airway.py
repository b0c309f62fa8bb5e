"""Trachea and main bronchi: grown from the trachea (a round air column near the midline in
the top slices) with the strictest threshold that does not leak into the lungs."""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import ndimage

from pipelines.anatomy.grid import WorkingGrid, smooth_in_plane
from pipelines.morphology import components
from pipelines.volume import Volume

log = logging.getLogger(__name__)

TRACHEA_MAX_ML = 120.0


def segment_airway(
    coarse: torch.Tensor, air: torch.Tensor, grid: WorkingGrid, volume: Volume
) -> torch.Tensor:
    """Trachea and main bronchi, grown from the trachea with a threshold that does not leak."""
    seed = _trachea_seed(air.cpu().numpy(), grid, volume)
    if seed is None:
        log.info("no trachea found in the top slices; airways not removed")
        return torch.zeros_like(air)
    hu = smooth_in_plane(coarse).cpu().numpy()
    inside = air.cpu().numpy()
    z, region = seed
    z, row, column = _darkest_below(hu, z, region, grid, volume)
    for threshold in range(-900, -1010, -10):
        labels, _ = components(inside & (hu < threshold))
        label = labels[z, row, column]
        if label == 0:
            continue
        grown = labels == label
        if grown.sum() * grid.voxel_ml() <= TRACHEA_MAX_ML:
            return torch.from_numpy(grown).to(coarse.device)
    return torch.zeros_like(air)


def _darkest_below(
    hu: np.ndarray, z: int, region: np.ndarray, grid: WorkingGrid, volume: Volume
) -> tuple[int, int, int]:
    """The darkest voxel of the trachea's footprint on its seed slice and the slices up to
    15 mm below it: the topmost slice can be partial volume with the neck (above -900 HU)."""
    step = -1 if volume.affine[2, 0] > 0 else 1
    reach = max(1, round(15 / grid.spacing[0]))
    slices = [k for k in range(z, z + step * (reach + 1), step) if 0 <= k < hu.shape[0]]
    values = np.where(region[None], hu[slices], np.inf)
    k, row, column = np.unravel_index(np.argmin(values), values.shape)
    return slices[k], int(row), int(column)


def _trachea_seed(
    air: np.ndarray, grid: WorkingGrid, volume: Volume
) -> tuple[int, np.ndarray] | None:
    """The trachea on one slice: a small air region near the midline in the top slices."""
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
