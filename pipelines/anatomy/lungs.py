"""Left and right lungs without weights (threshold and morphology, after Hu et al., IEEE TMI
2001), on the working grid:
1. body: the largest connected structure above -500 HU, holes filled slice by slice;
2. aerated tissue inside the body below -400 HU;
3. the airway (`pipelines.anatomy.airway`) removed;
4. left and right lungs: the two largest aerated components; if they touch (anterior
   junction) they are eroded apart and grown back inside the original mask;
5. each lung closed and filled, so vessels and dense infiltrates inside it count as lung.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pipelines.anatomy.airway import segment_airway
from pipelines.anatomy.grid import WorkingGrid, downsample, upsample
from pipelines.base import BadInput
from pipelines.morphology import (
    closing,
    components,
    dilate,
    erode,
    fill_holes_per_slice,
    largest_component,
)
from pipelines.volume import Volume

BODY_HU = -500
AERATED_HU = -400
"""Aerated lung (and any air) is below this; soft tissue above."""
MIN_LUNG_ML = 100.0


def segment_lungs(hu: torch.Tensor, volume: Volume) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right lung masks on the full grid of `hu` (slice, row, column)."""
    grid = WorkingGrid.for_volume(volume)
    coarse = downsample(hu, grid.factor)
    body = torch.from_numpy(
        fill_holes_per_slice(largest_component((coarse > BODY_HU).cpu().numpy()))
    ).to(hu.device)
    air = (coarse < AERATED_HU) & body
    airways = segment_airway(coarse, air, grid, volume)
    candidates = (air & ~dilate(airways, (0, 1, 1))).cpu().numpy()
    left, right = _split_lungs(candidates, grid, volume)
    full_shape = hu.shape
    lungs = []
    for lung, other in ((left, right), (right, left)):
        filled = closing(torch.from_numpy(lung).to(hu.device), grid.radii(4.0, 0.0))
        filled = torch.from_numpy(fill_holes_per_slice(filled.cpu().numpy())).to(hu.device)
        filled &= body & ~airways & ~torch.from_numpy(other).to(hu.device)
        lungs.append(upsample(filled, grid.factor, full_shape))
    left_full, right_full = lungs
    overlap = left_full & right_full
    left_full &= ~overlap
    right_full &= ~overlap
    return left_full, right_full


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
