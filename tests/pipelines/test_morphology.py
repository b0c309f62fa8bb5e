"""The morphology the lung segmentation builds on, against SciPy's reference operations."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipelines.morphology import IN_PLANE, close_ball, depth, fill_holes_per_slice


def test_holes_are_filled_slice_by_slice_as_scipy_fills_them() -> None:
    rng = np.random.default_rng(7)
    mask = ndimage.binary_opening(rng.random((12, 60, 70)) > 0.45)
    mask[3] = False
    mask[3, 10:30, 10:30] = True
    mask[3, 15:25, 15:25] = False  # a hole in the slice
    mask[4, 0:20, 0:20] = True
    mask[4, 0:10, 5:10] = False  # a notch open to the slice's edge: no hole
    expected = ndimage.binary_fill_holes(mask, structure=IN_PLANE)
    filled = fill_holes_per_slice(mask)
    assert filled[3, 15:25, 15:25].all() and not filled[4, 0:10, 5:10].any()
    np.testing.assert_array_equal(filled, expected)


def test_depth_is_the_euclidean_distance_on_anisotropic_voxels() -> None:
    rng = np.random.default_rng(3)
    mask = ndimage.binary_dilation(rng.random((20, 40, 30)) > 0.97, iterations=3)
    spacing = (5.0, 0.8, 1.7)
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)
    np.testing.assert_allclose(depth(mask, spacing), expected, atol=1e-4)


def test_a_ball_closing_bridges_gaps_narrower_than_its_diameter() -> None:
    spacing = (2.0, 1.0, 1.0)
    mask = np.zeros((30, 60, 120), dtype=bool)
    mask[5:25, 10:50, 10:40] = True
    mask[5:25, 10:50, 48:78] = True  # 8 mm from the first block
    mask[5:25, 10:50, 100:110] = True  # 22 mm from the second
    closed = close_ball(mask, spacing, radius_mm=6.0)
    assert closed[15, 30, 40:48].all()
    assert not closed[15, 30, 78:100].any()
    assert (closed & mask).sum() == mask.sum()
