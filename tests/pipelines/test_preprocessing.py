"""A model's declared orientation (`preprocessing.orientation`) is what its network gets,
however the scanner stored the series: the same chest stored head first and feet first (its
rows then running from patient left to right) reaches the network as the same tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.preprocessing import configured, to_meta_tensor
from pipelines.settings import PreprocessingSettings
from pipelines.volume import load_volume
from tests.phantoms import Geometry, chest, write_series

HEAD_FIRST = Geometry(
    rows=64,
    columns=80,
    pixel_spacing=(5.0, 5.0),
    origin=(-200.0, -160.0, -140.0),
    slice_step=5.0,
    slices=40,
)
"""The same grid stored head first and feet first: every voxel centre of one is a voxel centre
of the other (`tests/pipelines/test_lung_quant.py`'s pair is the same chest on grids 0.2 mm
apart)."""
FEET_FIRST = Geometry(
    rows=64,
    columns=80,
    pixel_spacing=(5.0, 5.0),
    orientation=(-1, 0, 0, 0, 1, 0),
    origin=(195.0, -160.0, 55.0),
    slice_step=5.0,
    slices=40,
)


@pytest.mark.parametrize("orientation", ["RAS", "SPL", "LPI"])
def test_the_network_sees_the_declared_orientation_however_the_series_was_stored(
    tmp_path: Path, orientation: str
) -> None:
    stored, inputs = [], []
    for name, geometry in (("head-first", HEAD_FIRST), ("feet-first", FEET_FIRST)):
        volume = load_volume(write_series(tmp_path / name, geometry, chest()))
        stored.append(volume.voxels)
        settings = PreprocessingSettings(orientation=orientation)
        inputs.append(configured(settings)({"image": to_meta_tensor(volume)})["image"])
    assert not np.array_equal(*stored)  # as stored, the two differ voxel for voxel
    head_first, feet_first = inputs
    assert head_first.shape == feet_first.shape
    assert torch.equal(head_first.as_tensor(), feet_first.as_tensor())
    assert np.allclose(head_first.affine, feet_first.affine)
