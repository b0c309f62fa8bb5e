"""Volume loading: ordering, rescaling, geometry defects, localizers, multi-frame, real series."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.base import BadInput, Requirements
from pipelines.volume import GeometryError, VolumeOptions, load_volume
from tests.phantoms import Geometry, sphere, write_enhanced, write_series

BALL = sphere(center=(0.0, 2.0, -5.0), radius=12.0, inside=60.0, outside=-900.0)


def test_slices_are_ordered_by_position_and_the_affine_places_them(tmp_path: Path) -> None:
    geometry = Geometry()
    files = write_series(tmp_path, geometry, BALL)
    volume = load_volume(list(reversed(files)))
    assert volume.voxels.shape == (geometry.slices, geometry.rows, geometry.columns)
    assert volume.voxels.dtype == np.int16
    assert volume.spacing == pytest.approx((2.5, 1.0, 1.25))
    for k in (0, 7, 31):
        assert volume.to_patient((k, 0, 0)) == pytest.approx(geometry.positions[k])
        expected = BALL(geometry.coordinates(geometry.positions[k]))
        np.testing.assert_array_equal(volume.voxels[k], expected)
    assert [s.sop_instance_uid for s in volume.sources] != sorted(
        s.sop_instance_uid for s in volume.sources
    )


def test_a_rotated_descending_stack_lands_in_patient_space(tmp_path: Path) -> None:
    geometry = Geometry(orientation=(0, 1, 0, 0, 0, -1), origin=(40.0, -20.0, 30.0))
    files = write_series(tmp_path, geometry, BALL)
    random.Random(1).shuffle(files)
    volume = load_volume(files)
    center = np.argwhere(volume.voxels > 0).mean(axis=0)
    assert volume.to_patient(center) == pytest.approx((0.0, 2.0, -5.0), abs=1.0)


def test_patient_and_voxel_coordinates_convert_both_ways(tmp_path: Path) -> None:
    geometry = Geometry(orientation=(0, 1, 0, 0, 0, -1), origin=(40.0, -20.0, 30.0))
    volume = load_volume(write_series(tmp_path, geometry, BALL))
    indices = np.array([[0, 0, 0], [3, 7, 11], [5.5, 2.25, 9.0]])
    points = volume.to_patient(indices)
    assert points.shape == (3, 3)
    assert volume.to_voxel(points) == pytest.approx(indices)
    assert volume.to_patient(indices[1]) == pytest.approx(points[1])
    corners = volume.box_corners(points.min(axis=0), points.max(axis=0))
    assert corners.shape == (8, 3)
    assert corners.min(axis=0) == pytest.approx(indices.min(axis=0))
    assert corners.max(axis=0) == pytest.approx(indices.max(axis=0))


def test_rescale_slope_and_intercept_give_hounsfield_units(tmp_path: Path) -> None:
    files = write_series(tmp_path, Geometry(), BALL, slope=0.5, intercept=-1000.0)
    volume = load_volume(files)
    assert volume.voxels.dtype == np.float32
    assert set(np.unique(volume.voxels)) == {-900.0, 60.0}


def test_padding_below_air_reads_as_air(tmp_path: Path) -> None:
    files = write_series(tmp_path, Geometry(), sphere((0, 0, 0), 10, 0.0, -3024.0))
    assert load_volume(files).voxels.min() == -1024


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.pop(10), "missing slices: a gap of 5.00 mm"),
        (lambda p: p.__setitem__(10, p[11]), "duplicate slice position"),
        (lambda p: p.__setitem__(10, p[10] + np.array([0, 0, 0.9])), "non-uniform slice spacing"),
    ],
)
def test_geometry_defects_are_refused_with_the_reason(tmp_path: Path, change, message) -> None:
    geometry = Geometry()
    change(geometry.positions)
    files = write_series(tmp_path, geometry, BALL)
    with pytest.raises(GeometryError, match=message):
        load_volume(files)


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    axial = write_series(tmp_path / "a", Geometry(slices=10), BALL)
    tilted = write_series(tmp_path / "b", Geometry(orientation=(1, 0, 0, 0, 0.8, -0.6)), BALL)
    with pytest.raises(GeometryError, match="mixed orientations"):
        load_volume(axial + tilted[:3])


def test_too_few_slices(tmp_path: Path) -> None:
    files = write_series(tmp_path, Geometry(slices=2), BALL)
    with pytest.raises(GeometryError, match="2 slices"):
        load_volume(files)


def tilted_geometry() -> Geometry:
    """Gantry tilt: the slices are axial, but each is shifted 0.35 mm along y from the last."""
    geometry = Geometry(rows=64, slices=24)
    geometry.positions = [p + np.array([0, 0.35 * k, 0]) for k, p in enumerate(geometry.positions)]
    return geometry


def test_gantry_tilt_is_refused_by_default(tmp_path: Path) -> None:
    files = write_series(tmp_path, tilted_geometry(), BALL)
    with pytest.raises(GeometryError, match=r"gantry tilt of 8\.0 degrees"):
        load_volume(files)


def test_gantry_tilt_resampled_puts_the_ball_where_it_is(tmp_path: Path) -> None:
    files = write_series(tmp_path, tilted_geometry(), BALL)
    volume = load_volume(files, VolumeOptions(gantry_tilt="resample"))
    center = np.argwhere(volume.voxels > -400).mean(axis=0)
    assert volume.to_patient(center) == pytest.approx((0.0, 2.0, -5.0), abs=0.7)
    assert volume.affine[:3, 0] == pytest.approx((0, 0, 2.5))


def test_localizers_and_mixed_in_derived_images_are_dropped(tmp_path: Path) -> None:
    files = write_series(tmp_path / "axial", Geometry(slices=12), BALL)
    localizer = write_series(
        tmp_path / "loc",
        Geometry(slices=1, orientation=(1, 0, 0, 0, 0, -1)),
        BALL,
        image_type=lambda k: ["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    derived = write_series(
        tmp_path / "mpr",
        Geometry(slices=2, origin=(-25.0, -24.0, -39.0)),
        BALL,
        image_type=lambda k: ["DERIVED", "SECONDARY", "AXIAL"],
    )
    volume = load_volume(files + localizer + derived)
    assert volume.voxels.shape[0] == 12
    assert sorted(reason.split(": ")[1] for reason in volume.dropped) == [
        "derived image",
        "derived image",
        "localizer",
    ]


def test_requirements_are_checked_before_decoding(tmp_path: Path) -> None:
    files = write_series(tmp_path / "mr", Geometry(slices=5), BALL, modality="MR")
    with pytest.raises(BadInput, match="modality MR; this pipeline needs CT"):
        load_volume(files, requirements=Requirements())
    ct = write_series(tmp_path / "ct", Geometry(slices=5), BALL)
    with pytest.raises(BadInput, match="5 slices; this pipeline needs at least 20"):
        load_volume(ct, requirements=Requirements(min_slices=20))
    with pytest.raises(BadInput, match=r"slice thickness 2\.5 mm; this pipeline needs at most 1"):
        load_volume(ct, requirements=Requirements(max_slice_thickness_mm=1.0))
    with pytest.raises(BadInput, match="covers 10 mm; this pipeline needs at least 100 mm"):
        load_volume(ct, requirements=Requirements(min_coverage_mm=100))


def test_unreadable_file_is_bad_input(tmp_path: Path) -> None:
    files = write_series(tmp_path, Geometry(slices=5), BALL)
    files[2].write_bytes(b"not dicom at all")
    with pytest.raises(BadInput, match="not a readable DICOM file"):
        load_volume(files)


def test_enhanced_ct_multiframe_equals_the_single_frame_series(tmp_path: Path) -> None:
    geometry = Geometry(orientation=(1, 0, 0, 0, 0.9950042, -0.0998334))
    single = load_volume(write_series(tmp_path / "single", geometry, BALL))
    multi = load_volume([write_enhanced(tmp_path / "enhanced.dcm", geometry, BALL)])
    np.testing.assert_array_equal(multi.voxels, single.voxels)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-3)
    assert [s.frame_number for s in multi.sources] == list(range(32, 0, -1))


def test_real_series_in_shuffled_file_order_gives_the_same_volume(
    real_series: dict[str, list[Path]], tmp_path: Path
) -> None:
    files = real_series["covid"]
    ordered = load_volume(files)
    shuffled = list(files)
    random.Random(7).shuffle(shuffled)
    copies = []
    for index, path in enumerate(shuffled):
        copies.append(tmp_path / f"{index:04d}.dcm")
        shutil.copyfile(path, copies[-1])
    again = load_volume(copies)
    np.testing.assert_array_equal(again.voxels, ordered.voxels)
    np.testing.assert_allclose(again.affine, ordered.affine)
    assert ordered.voxels.shape == (148, 512, 512)
    # slices ascend along the normal: the last slice is the most superior (largest z)
    assert ordered.to_patient((147, 0, 0))[2] > ordered.to_patient((0, 0, 0))[2]
    assert ordered.voxels.min() >= -1024 and -900 < np.median(ordered.voxels) < 100


def test_real_series_of_both_kernels_share_one_geometry(real_series: dict[str, list[Path]]) -> None:
    lung, body = load_volume(real_series["lung-kernel"]), load_volume(real_series["body-kernel"])
    np.testing.assert_allclose(lung.affine, body.affine)
    assert lung.spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
