"""lung-quant on a synthetic chest with known truth, and on every real series."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipelines import codes
from pipelines.anatomy.grid import SLAB, WorkingGrid
from pipelines.base import BadInput
from pipelines.lung_quant import (
    HIGH,
    LOW,
    LungQuantPipeline,
    _high_attenuation_slab,
    high_attenuation,
)
from pipelines.result import PipelineResult
from pipelines.volume import Volume, load_volume
from tests.peers import DATA
from tests.phantoms import Geometry, body_without_lungs, chest, chest_geometry, write_series

pytestmark = pytest.mark.xdist_group("real-lungs")  # one worker segments the real series, once
ELLIPSOID_ML = 4 / 3 * np.pi * 50 * 70 * 90 / 1000
GGO_ML = 4 / 3 * np.pi * 15**3 / 1000
SLICE_LABELS = DATA / "covid-ct-md"


def with_ground_glass(hu):
    def values(points: np.ndarray) -> np.ndarray:
        out = hu(points)
        out[np.linalg.norm(points - np.array([70.0, 10.0, -20.0]), axis=-1) <= 15] = -500.0
        return out

    return values


def centroid_x(volume: Volume, mask: np.ndarray) -> float:
    return float(volume.to_patient(np.argwhere(mask).mean(axis=0))[0])


def test_synthetic_chest_volumes_sides_trachea_and_ground_glass(tmp_path: Path) -> None:
    files = write_series(
        tmp_path, chest_geometry(), with_ground_glass(chest((65, 0, 0), (-65, 0, 0)))
    )
    volume = load_volume(files)
    result = LungQuantPipeline("cpu").run(volume)
    left, right = result.mask("Left lung").array, result.mask("Right lung").array
    assert result.region("Left lung").value(codes.VOLUME) == pytest.approx(ELLIPSOID_ML, rel=0.06)
    assert result.region("Right lung").value(codes.VOLUME) == pytest.approx(ELLIPSOID_ML, rel=0.06)
    assert centroid_x(volume, left) > 50 and centroid_x(volume, right) < -50
    trachea = volume.voxels[-1] < -990
    assert trachea.sum() > 50 and not (left[-1] | right[-1])[trachea].any()
    haa_left = result.region("Left lung").value(codes.HIGH_ATTENUATION)
    assert haa_left == pytest.approx(100 * GGO_ML / ELLIPSOID_ML, rel=0.4)
    assert result.region("Right lung").value(codes.HIGH_ATTENUATION) < 0.05
    assert -860 < result.region("Both lungs").value(codes.MEAN_ATTENUATION) < -800
    profile = np.asarray(result.profiles[0].values)
    assert len(profile) == 47 and 2.0 < profile.max() < 4.5  # ~707 of ~21,400 mm² of lung
    assert volume.to_patient((int(profile.argmax()), 0, 0))[2] == pytest.approx(-20, abs=5)


def test_a_sharp_kernel_gets_volumes_and_a_reason_not_densitometry(tmp_path: Path) -> None:
    files = write_series(tmp_path, chest_geometry(), chest((65, 0, 0), (-65, 0, 0)))
    volume = load_volume(files)
    headers = []
    for header in volume.file_headers:
        header.Manufacturer, header.ConvolutionKernel = "SIEMENS", "B70f"
        headers.append(header)
    result = LungQuantPipeline("cpu").run(replace(volume, file_headers=tuple(headers)))
    both = result.region("Both lungs")
    assert [m.concept for m in both.measurements] == [codes.VOLUME, codes.MEAN_ATTENUATION]
    assert both.value(codes.VOLUME) == pytest.approx(2 * ELLIPSOID_ML, rel=0.06)
    assert [m.segment.label for m in result.masks][:2] == ["Left lung", "Right lung"]
    assert not {LOW.label, HIGH.label} & {m.segment.label for m in result.masks}
    assert result.profiles == []
    (note,) = result.notes
    assert note.concept == codes.COMMENT
    assert "not measured" in note.text and "B70f (SIEMENS) is sharp" in note.text


def test_touching_lungs_are_separated(tmp_path: Path) -> None:
    files = write_series(tmp_path, chest_geometry(), chest((49, 0, 0), (-49, 0, 0)))
    volume = load_volume(files)
    result = LungQuantPipeline("cpu").run(volume)
    left, right = result.mask("Left lung").array, result.mask("Right lung").array
    assert not (left & right).any()
    assert centroid_x(volume, left) > 30 and centroid_x(volume, right) < -30
    for region in ("Left lung", "Right lung"):
        assert result.region(region).value(codes.VOLUME) == pytest.approx(ELLIPSOID_ML, rel=0.1)


def test_a_body_without_lungs_is_bad_input(tmp_path: Path) -> None:
    files = write_series(
        tmp_path,
        chest_geometry(),
        body_without_lungs,
    )
    with pytest.raises(BadInput, match="no lungs found"):
        LungQuantPipeline("cpu").run(load_volume(files))


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_high_attenuation_in_the_lungs_box_is_that_of_the_whole_volume(factor: int) -> None:
    """Computed in the lungs' box, slab by slab: the same voxels as one computation over the
    whole volume (blocks of random HU: vessels, their rims and ground glass of every size;
    the lungs a box, whose flat faces an unwidened crop would not erode, across a slab
    boundary)."""
    shape = (SLAB + 20, 90, 100)
    z, y, x = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    lungs = (z >= 5) & (z < SLAB + 12) & (y >= 15) & (y < 55) & (x >= 30) & (x < 90)
    noise = torch.Generator().manual_seed(factor)
    blocks = torch.randint(-1000, 100, (shape[0], 30, 25), generator=noise, dtype=torch.int16)
    hu = blocks.repeat_interleave(3, dim=1).repeat_interleave(4, dim=2)
    grid = WorkingGrid(factor, (1.0, float(factor), float(factor)))
    whole = _high_attenuation_slab(hu, lungs, grid)
    assert whole.any()
    assert torch.equal(high_attenuation(hu, lungs, grid), whole)


RIGHT_CENTRE = np.array([-60.0, 0.0, 0.0])
RIGHT_RADII = np.array([50.0, 70.0, 90.0])
NODULE_CENTRE, NODULE_RADIUS = np.array([-98.0, 0.0, 10.0]), 12.0
"""A solid nodule inside the right lung, touching its lateral pleura."""


def in_right_lung(points: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return (((points - RIGHT_CENTRE) / (RIGHT_RADII * scale)) ** 2).sum(axis=-1) <= 1


def pleural_disease(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodule, wedge): a pleura-based nodule, and a wedge of consolidation (a cone whose
    base, 36 mm across, lies on the posterior pleura and whose apex points to the hilum)."""
    nodule = np.linalg.norm(points - NODULE_CENTRE, axis=-1) <= NODULE_RADIUS
    x, y, z = points[..., 0] - RIGHT_CENTRE[0], points[..., 1], points[..., 2]
    wedge = in_right_lung(points) & (y > 30) & (np.hypot(x, z) <= 18 * (y - 30) / 40)
    return nodule, wedge


def diseased_chest(points: np.ndarray) -> np.ndarray:
    hu = chest()(points)
    nodule, wedge = pleural_disease(points)
    hu[nodule] = 40.0
    hu[wedge] = -50.0
    return hu


HEAD_FIRST = Geometry(
    rows=146,
    columns=150,
    pixel_spacing=(1.8, 2.2),
    origin=(-164.0, -130.0, -140.0),
    slice_step=5.0,
    slices=50,
)
FEET_FIRST = Geometry(
    rows=146,
    columns=150,
    pixel_spacing=(1.8, 2.2),
    orientation=(-1, 0, 0, 0, 1, 0),
    origin=(164.0, -130.0, 105.0),
    slice_step=5.0,
    slices=50,
)
"""The same chest on non-square pixels, stored head first and feet first (rows run from
patient left to right, slices towards the feet)."""


@pytest.mark.parametrize("geometry", [HEAD_FIRST, FEET_FIRST], ids=["head-first", "feet-first"])
def test_pleura_based_disease_stays_in_the_lung_and_the_chest_wall_stays_out(
    tmp_path: Path, geometry: Geometry
) -> None:
    volume = load_volume(write_series(tmp_path, geometry, diseased_chest))
    result = LungQuantPipeline("cpu").run(volume)
    left, right = result.mask("Left lung").array, result.mask("Right lung").array
    points = volume.to_patient(np.stack(np.indices(volume.voxels.shape), axis=-1))
    nodule, wedge = pleural_disease(points)
    assert right[nodule].mean() > 0.9 and not left[nodule].any()
    # the 25 mm ball bridges the wedge's inner half; at the pleura, where the lung's surface
    # is convex, it rolls in (7 % of the wedge is lung without the reconstruction)
    assert right[wedge].mean() > 0.5 and not left[wedge].any()
    body = (points[..., 0] / 150) ** 2 + (points[..., 1] / 110) ** 2 <= 1
    left_lung = in_right_lung(points * np.array([-1, 1, 1]), 1.05)  # mirrored: x = +60
    chest_wall = body & ~in_right_lung(points, 1.05) & ~left_lung
    assert (right & chest_wall).sum() < 0.002 * right.sum()
    airway = result.mask("Trachea and main bronchi").array
    assert airway.any() and not (airway & (left | right)).any()


BOWEL_CENTRE, BOWEL_RADIUS = np.array([70.0, 0.0, -118.0]), 15.0


def with_bowel_gas(points: np.ndarray) -> np.ndarray:
    """The chest with a gas-filled bowel loop under the left lung, which a 6 mm channel of
    air joins to the lung's base through the diaphragm (as partial volume does)."""
    hu = chest()(points)
    bowel = np.linalg.norm(points - BOWEL_CENTRE, axis=-1) <= BOWEL_RADIUS
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    channel = (np.hypot(x - BOWEL_CENTRE[0], y - BOWEL_CENTRE[1]) <= 3) & (z > -110) & (z < -80)
    hu[bowel | channel] = -1000.0
    return hu


BOWEL_HEAD_FIRST = replace(
    chest_geometry(), origin=(-164.0, -130.0, -160.0), slices=59, positions=[]
)
BOWEL_FEET_FIRST = replace(
    BOWEL_HEAD_FIRST, orientation=(-1, 0, 0, 0, 1, 0), origin=(164.0, -130.0, 130.0), positions=[]
)
"""The chest's field of view reaching 60 mm lower, head first and feet first."""


@pytest.mark.parametrize(
    "geometry", [BOWEL_HEAD_FIRST, BOWEL_FEET_FIRST], ids=["head-first", "feet-first"]
)
def test_bowel_gas_joined_to_a_lung_base_is_not_lung(tmp_path: Path, geometry: Geometry) -> None:
    volume = load_volume(write_series(tmp_path, geometry, with_bowel_gas))
    result = LungQuantPipeline("cpu").run(volume)
    left = result.mask("Left lung").array
    points = volume.to_patient(np.stack(np.indices(volume.voxels.shape), axis=-1))
    bowel = np.linalg.norm(points - BOWEL_CENTRE, axis=-1) <= BOWEL_RADIUS
    assert left[bowel].mean() < 0.05
    assert result.region("Left lung").value(codes.VOLUME) == pytest.approx(ELLIPSOID_ML, rel=0.06)


@pytest.fixture(scope="module")
def real_results(real_series) -> dict[str, tuple[Volume, PipelineResult]]:
    pipeline = LungQuantPipeline("cpu")
    out = {}
    for name, files in real_series.items():
        volume = load_volume(files, requirements=pipeline.requirements)
        out[name] = (volume, pipeline.run(volume))
    return out


def outside_air(volume: Volume) -> np.ndarray:
    """Air connected to the image border, slice by slice: where no lung can be."""
    air = volume.voxels < -500
    outside = np.zeros_like(air)
    for z in range(air.shape[0]):
        labels, _ = ndimage.label(air[z])
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        outside[z] = np.isin(labels, border[border > 0])
    return outside


@pytest.mark.slow
@pytest.mark.parametrize("name", ["covid", "cap", "normal", "lung-kernel", "body-kernel"])
def test_real_lungs_are_what_a_radiologist_expects(real_results, name: str) -> None:
    volume, result = real_results[name]
    left, right = result.mask("Left lung").array, result.mask("Right lung").array
    total = result.region("Both lungs").value(codes.VOLUME)
    assert 2000 < total < 8000
    assert result.region("Left lung").value(codes.VOLUME) > 800
    assert result.region("Right lung").value(codes.VOLUME) > 800
    assert centroid_x(volume, left) > 30 and centroid_x(volume, right) < -30
    assert not (left & right).any()
    for mask in (left, right):
        labels, _ = ndimage.label(mask)
        assert np.bincount(labels.ravel())[1:].max() > 0.95 * mask.sum()
    assert not ((left | right) & outside_air(volume)).any()
    lung_slices = np.flatnonzero((left | right).any(axis=(1, 2)))
    top = lung_slices[-max(2, len(lung_slices) // 8)]
    trachea = _central_air_column(volume, top)
    assert trachea.sum() > 20
    assert not (left[top] | right[top])[trachea].any()
    assert -900 < result.region("Both lungs").value(codes.MEAN_ATTENUATION) < -700


def _central_air_column(volume: Volume, z: int) -> np.ndarray:
    """The trachea on slice z: the air lumen (below -950 HU after 5x5 smoothing, which sharp
    kernel noise in the lung does not reach) nearest the image centre line."""
    smooth = ndimage.uniform_filter(volume.voxels[z].astype(np.float32), size=5)
    labels, count = ndimage.label(smooth < -950)
    middle = volume.voxels.shape[2] / 2
    best, distance = np.zeros(volume.voxels.shape[1:], bool), np.inf
    for index in range(1, count + 1):
        region = labels == index
        area_mm2 = region.sum() * volume.spacing[1] * volume.spacing[2]
        if 80 < area_mm2 < 700:
            gap = abs(np.argwhere(region)[:, 1].mean() - middle)
            if gap < distance:
                best, distance = region, gap
    return best


@pytest.mark.slow
def test_both_kernels_of_one_acquisition_give_the_same_lungs(real_results) -> None:
    (_, lung), (_, body) = real_results["lung-kernel"], real_results["body-kernel"]
    for label in ("Left lung", "Right lung"):
        a, b = lung.mask(label).array, body.mask(label).array
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97


@pytest.mark.slow
def test_one_acquisitions_densitometry_comes_from_its_soft_kernel_only(real_results) -> None:
    """A0001's two kernels: the lung kernel (Philips L) once read LAA-950 13 %, the body
    kernel 0.1 %; the sharp one now reports volumes and why it has no densitometry."""
    (_, sharp), (_, soft) = real_results["lung-kernel"], real_results["body-kernel"]
    (note,) = sharp.notes
    assert note.text.startswith("LAA-950, Perc15 and high attenuation not measured")
    assert "L (Philips) is sharp" in note.text
    measured = {m.concept for m in sharp.region("Both lungs").measurements}
    assert measured == {codes.VOLUME, codes.MEAN_ATTENUATION}
    assert soft.notes[0].text == "Densitometry measured on a soft or standard kernel: B (Philips)."
    assert soft.region("Both lungs").value(codes.LAA950) < 2.0
    for name in ("covid", "cap", "normal"):  # Siemens D40s
        assert real_results[name][1].notes[0].text.endswith("kernel: D40s (SIEMENS).")


@pytest.mark.slow
def test_infected_lungs_have_more_high_attenuation_than_the_normal_one(real_results) -> None:
    haa = {
        n: real_results[n][1].region("Both lungs").value(codes.HIGH_ATTENUATION)
        for n in ("covid", "cap", "normal")
    }
    assert haa["covid"] > haa["normal"] and haa["cap"] > haa["normal"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "row"), [("covid", 0), ("cap", 55)])
def test_high_attenuation_profile_ranks_infected_slices(real_results, name: str, row: int) -> None:
    from bench.evaluate import roc_auc, slice_labels

    volume, result = real_results[name]
    labels = slice_labels(SLICE_LABELS, row, volume)
    lungs = (result.mask("Left lung").array | result.mask("Right lung").array).any(axis=(1, 2))
    profile = np.asarray(result.profiles[0].values)
    assert roc_auc(profile[lungs], labels[lungs]) > 0.85


@pytest.mark.slow
def test_the_bowel_gas_under_cap001s_left_lung_is_not_lung(real_results) -> None:
    """cap001's splenic flexure lies under the left lung's base, joined to it by partial
    volume through the diaphragm (slices 18-31 of 168)."""
    volume, result = real_results["cap"]
    points = volume.to_patient(np.stack(np.indices(volume.voxels.shape), axis=-1))
    pocket = np.linalg.norm(points - np.array([69.5, -141.5, -358.4]), axis=-1) <= 8
    assert pocket.sum() > 500 and volume.voxels[pocket].mean() < -900  # gas, where it was seen
    assert not result.mask("Left lung").array[pocket].any()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lung-kernel", "body-kernel"])
def test_the_tumour_of_a0001_is_inside_the_lung_on_its_annotated_slices(
    real_results, name: str
) -> None:
    from bench.evaluate import tumour_boxes

    volume, result = real_results[name]
    annotations = SLICE_LABELS.parent / "lung-pet-ct-dx" / "A0001" / "annotations"
    boxes = tumour_boxes(annotations, volume)
    left = result.mask("Left lung").array
    assert boxes.any()
    # the boxes reach into the chest wall and the spine: about 20 % of their pixels lay in the
    # aerated lung; the tumour the lung wraps now belongs to it
    assert left[boxes].mean() > 0.6
    centres = []
    for z in np.flatnonzero(boxes.any(axis=(1, 2))):
        rows, columns = np.nonzero(boxes[z])
        centres.append(left[z, int(rows.mean()), int(columns.mean())])
    # the tumour's centre on every annotated slice but, in the lung kernel, its topmost
    assert sum(centres) >= len(centres) - 1 and len(centres) >= 9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["covid", "cap", "normal", "lung-kernel", "body-kernel"])
def test_the_airway_is_one_structure_in_the_mediastinum(real_results, name: str) -> None:
    volume, result = real_results[name]
    airway = result.mask("Trachea and main bronchi").array
    left, right = result.mask("Left lung").array, result.mask("Right lung").array
    _, count = ndimage.label(airway, structure=np.ones((3, 3, 3)))
    assert count == 1
    assert not (airway & (left | right)).any()
    assert centroid_x(volume, right) < centroid_x(volume, airway) < centroid_x(volume, left)
    assert 3 < airway.sum() * volume.voxel_volume_ml < 150


def test_the_lungs_of_a_volume_are_segmented_once_and_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lung-quant, the classifiers' lung crop and the nodules' side ask one job context for
    the same series' lungs: the second ask gets the kept masks, a changed volume is
    segmented anew; a pipeline that did not declare it needs lungs is refused them."""
    from pipelines.anatomy import shared
    from pipelines.context import Context, Need

    segmented = []
    real = shared.segment_lungs

    def segment(*args):
        segmented.append(args)
        return real(*args)

    monkeypatch.setattr(shared, "segment_lungs", segment)
    anatomy = shared.Anatomy()
    context = Context("lung-quant", frozenset({Need.LUNGS}), anatomy=anatomy)
    volume = load_volume(write_series(tmp_path / "a", chest_geometry(), chest()))
    first = context.lungs(volume)
    again = context.lungs(volume)
    assert len(segmented) == 1
    for made, kept in zip(first, again, strict=True):
        assert torch.equal(made, kept)
    moved = load_volume(write_series(tmp_path / "b", chest_geometry(), chest((40, 0, 0))))
    other = context.lungs(moved)
    assert len(segmented) == 2 and not torch.equal(other.left, first.left)
    undeclared = Context("echo", anatomy=anatomy)
    with pytest.raises(LookupError, match="echo asked for lungs"):
        undeclared.lungs(volume)
