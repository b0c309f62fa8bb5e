"""Left and right lungs without weights (threshold and morphology, after Hu et al., IEEE TMI
2001), on the working grid:
1. body: the largest connected structure above -500 HU, holes filled slice by slice;
2. aerated tissue inside the body below -400 HU;
3. the airway (`pipelines.anatomy.airway`) removed;
4. left and right lungs: the two largest aerated components; if they touch (anterior
   junction) they are eroded apart and grown back inside the original mask; gas that hangs
   on a lung's lower half by a thin bridge (partial volume through the diaphragm, cut by an
   erosion of two voxels in-plane and one slice) and holds no lung tissue (its mean below
   -950 HU) is bowel under the diaphragm, not lung;
5. each lung closed and filled, so vessels and dense infiltrates inside it count as lung;
6. the pleural surface reconstructed: each lung closed with a 25 mm ball (on a ~3.5 mm grid),
   so dense tissue the lung encloses or abuts (juxtapleural tumours, peripheral
   consolidation) joins it, except bone, the airway, the other lung and what lies outside the
   body; what it adds is opened (6 mm), so strips along the mediastinum do not join, and
   lies nearer this lung than the other.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipelines.anatomy.airway import segment_airway
from pipelines.anatomy.grid import WorkingGrid, downsample, upsample
from pipelines.base import BadInput
from pipelines.morphology import (
    close_ball,
    closing,
    components,
    depth,
    dilate,
    erode,
    fill_holes_per_slice,
    largest_component,
    opening,
)
from pipelines.volume import Volume

BODY_HU = -500
BONE_HU = 150
"""Pathology the pleural reconstruction adds is below this (ribs, spine and calcium are not)."""
PLEURAL_RADIUS_MM = 25.0
"""Gaps in the lung narrower than 50 mm are bridged: a tumour or consolidation the lung
wraps; the heart's and the liver's much wider impressions are not."""
PLEURAL_GRID_MM = 3.5
PLEURAL_OPENING_MM = 6.0
"""What the closing adds is opened by this radius in-plane: strips along the mediastinum
(fat beside the trachea, the azygos arch) and the coarse grid's rims along the pleura go,
lesions of 12 mm and more stay."""
AERATED_HU = -400
"""Aerated lung (and any air) is below this; soft tissue above."""
MIN_LUNG_ML = 100.0
GAS_HU = -950
"""Gas with no lung tissue in it (bowel gas; aerated lung with its vessels is denser)."""
MIN_GAS_ML = 1.0


class Lungs(NamedTuple):
    """Masks on the full grid (slice, row, column); the airway is the trachea and main
    bronchi the lungs exclude; `aerated` is both lungs before the pleural reconstruction
    (step 6): the aerated lung with the vessels and infiltrates it encloses."""

    left: torch.Tensor
    right: torch.Tensor
    airway: torch.Tensor
    aerated: torch.Tensor


def segment_lungs(hu: torch.Tensor, volume: Volume, pathology: bool = True) -> Lungs:
    """The lungs and airway of `hu` (slice, row, column); without `pathology`, the aerated
    lung only (steps 1-5, for comparison)."""
    grid = WorkingGrid.for_volume(volume)
    full_shape = hu.shape
    coarse = downsample(hu, grid.factor)
    body = torch.from_numpy(
        fill_holes_per_slice(largest_component((coarse > BODY_HU).cpu().numpy()))
    ).to(hu.device)
    air = (coarse < AERATED_HU) & body
    airways = segment_airway(coarse, air, grid, volume)
    candidates = (air & ~dilate(airways, (0, 1, 1))).cpu().numpy()
    left, right = _split_lungs(candidates, grid, volume)
    # From here on, only the lungs' surroundings: every step is local (box radii, distances
    # within the lungs' reach, holes enclosed by them), so cropping changes no voxel.
    working_shape = coarse.shape
    region = _lung_region(left | right, grid)
    left, right = np.ascontiguousarray(left[region]), np.ascontiguousarray(right[region])
    coarse, body = coarse[region].contiguous(), body[region].contiguous()
    coarse_hu = coarse.cpu().numpy()
    (left, left_gas), (right, right_gas) = (
        _without_gas(lung, coarse_hu, grid, volume) for lung in (left, right)
    )
    not_gas = ~torch.from_numpy(left_gas | right_gas).to(hu.device)
    nearer_left = torch.from_numpy(_nearer(left, right, grid)).to(hu.device) if pathology else None
    around_airway = airways[region].contiguous()
    lungs, aerated = [], []
    for lung, other in ((left, right), (right, left)):
        filled = closing(torch.from_numpy(lung).to(hu.device), grid.radii(4.0, 0.0))
        filled = torch.from_numpy(fill_holes_per_slice(filled.cpu().numpy())).to(hu.device)
        allowed = body & ~around_airway & ~torch.from_numpy(other).to(hu.device) & not_gas
        filled &= allowed
        aerated.append(filled)
        if nearer_left is not None:
            own_side = nearer_left if lung is left else ~nearer_left
            filled = with_pathology(filled, allowed & own_side & (coarse < BONE_HU), grid)
        lungs.append(upsample(_placed(filled, region, working_shape), grid.factor, full_shape))
    left_full, right_full = lungs
    overlap = left_full & right_full  # in place from here: a 600-slice mask is 160 MB
    left_full ^= overlap
    right_full ^= overlap
    del overlap
    both = left_full | right_full
    airway = upsample(airways, grid.factor, full_shape)
    airway &= ~both
    aerated_both = _placed(aerated[0] | aerated[1], region, working_shape)
    aerated_full = upsample(aerated_both, grid.factor, full_shape)
    aerated_full &= both
    return Lungs(left_full, right_full, airway, aerated_full)


def _lung_region(lungs: np.ndarray, grid: WorkingGrid) -> tuple[slice, slice, slice]:
    """Every slice, and the rows and columns of `lungs` widened by more than any box radius
    the steps after the split use (the 4 mm closing, the 6 mm opening, the gas erosion) and
    a pleural block, the first row and column on the pleural grid's block boundaries (its
    blocks stay the same)."""
    factor = _pleural_factor(grid)
    margin = max(grid.radii(PLEURAL_OPENING_MM, 0.0)) + factor + 2

    def span(axis: int) -> slice:
        present = np.flatnonzero(lungs.any(axis=(0, 3 - axis)))
        start = max(0, int(present[0]) - margin)
        return slice(start - start % factor, int(present[-1]) + 1 + margin)

    return slice(None), span(1), span(2)


def _placed(
    mask: torch.Tensor, region: tuple[slice, slice, slice], shape: torch.Size
) -> torch.Tensor:
    """`mask` of `region` back on the whole working grid."""
    whole = torch.zeros(shape, dtype=torch.bool, device=mask.device)
    whole[region] = mask
    return whole


def _pleural_factor(grid: WorkingGrid) -> int:
    return max(1, round(PLEURAL_GRID_MM / grid.spacing[1]))


def _pleural_grid(
    mask: np.ndarray, grid: WorkingGrid
) -> tuple[np.ndarray, tuple[float, float, float], int]:
    """`mask` on the ~3.5 mm grid of the pleural reconstruction (a voxel is in when most of
    its block is), the grid's spacing and its in-plane factor."""
    factor = _pleural_factor(grid)
    pooled = F.avg_pool2d(torch.from_numpy(mask)[:, None].float(), factor, ceil_mode=True)
    spacing = (grid.spacing[0], grid.spacing[1] * factor, grid.spacing[2] * factor)
    return pooled[:, 0].numpy() >= 0.5, spacing, factor


def _to_working_grid(mask: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    grown = mask.repeat(factor, axis=1).repeat(factor, axis=2)
    return grown[:, : shape[1], : shape[2]]


def _nearer(left: np.ndarray, right: np.ndarray, grid: WorkingGrid) -> np.ndarray:
    """Where the left lung is nearer than the right one: what the pleural reconstruction of
    one lung may add never lies on the other's side of the mediastinum."""
    small_left, spacing, factor = _pleural_grid(left, grid)
    small_right, _, _ = _pleural_grid(right, grid)
    to_left, to_right = depth(~small_left, spacing), depth(~small_right, spacing)
    return _to_working_grid(to_left <= to_right, factor, left.shape)


def with_pathology(lung: torch.Tensor, allowed: torch.Tensor, grid: WorkingGrid) -> torch.Tensor:
    """The lung and the `allowed` tissue its 25 mm ball closing adds (step 6)."""
    small, spacing, factor = _pleural_grid(lung.cpu().numpy(), grid)
    closed = _to_working_grid(close_ball(small, spacing, PLEURAL_RADIUS_MM), factor, lung.shape)
    added = torch.from_numpy(closed).to(lung.device) & allowed & ~lung
    radii = grid.radii(PLEURAL_OPENING_MM, 0.0)
    added &= dilate(opening(added, radii), radii)  # the cores and what lies within reach
    filled = fill_holes_per_slice((lung | added).cpu().numpy())
    return torch.from_numpy(filled).to(lung.device) & (allowed | lung)


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


def _without_gas(
    lung: np.ndarray, coarse_hu: np.ndarray, grid: WorkingGrid, volume: Volume
) -> tuple[np.ndarray, np.ndarray]:
    """(`lung` without the gas that hangs on its lower half, that gas): parts the erosion cuts
    off, of at least MIN_GAS_ML, below GAS_HU on average, their centre below the lung's
    (feet-wards), with the voxels of `lung` nearer to them than to the rest of it."""
    labels, sizes = components(erode(torch.from_numpy(lung), (1, 2, 2)).numpy())
    main = int(np.argmax(sizes))

    def height(part: np.ndarray) -> float:  # patient z (LPS: towards the head) of its centre
        return float(volume.to_patient((np.nonzero(part)[0].mean(), 0, 0))[2])

    lung_height = height(labels == main)
    gas = []
    for number in np.flatnonzero(sizes * grid.voxel_ml() >= MIN_GAS_ML).tolist():
        part = labels == number
        if number != main and coarse_hu[part].mean() < GAS_HU and height(part) < lung_height:
            gas.append(number)
    if not gas:
        return lung, np.zeros_like(lung)
    to_lung = depth(labels != main, grid.spacing)
    to_gas = depth(~np.isin(labels, gas), grid.spacing)
    hanging = lung & (to_gas < to_lung)
    return lung & ~hanging, hanging


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
