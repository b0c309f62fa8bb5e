"""nodule-detection's geometry: a ball of known centre and size, off centre in a chest
phantom with non-square pixels and slices written head first, must come back as a box on
the ball in patient space, on the right source slice, in the result and in the SR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.work.results.encode import encode_result
from node.work.results.identity import ResultIdentity
from pipelines import codes
from pipelines.nodule_detection import NoduleDetectionPipeline
from pipelines.registry import build_pipelines
from pipelines.settings import PipelineSettings
from pipelines.volume import Volume, load_volume
from tests.models import PIPELINE_SETTINGS, blob_detector_bundle
from tests.phantoms import Geometry, chest, write_series

SPACING_MM = 2.0
BALL_CENTER = np.array([-62.0, 14.0, 9.0])  # patient's right lung, off centre
BALL_RADIUS = 7.0
WHOLE_PHANTOM = [168, 136, 80]
"""An inference window holding the resampled phantom whole: one window, not eight overlapping
ones (three times the work)."""
TWO_WINDOWS = [96, 136, 80]
"""Windows that slide along the first axis only: the first test stitches two overlapping
windows, not the bundle's eight."""


def with_ball(hu, center=BALL_CENTER, radius=BALL_RADIUS, inside=30.0):
    def values(points: np.ndarray) -> np.ndarray:
        out = hu(points)
        out[np.linalg.norm(points - center, axis=-1) <= radius] = inside
        return out

    return values


def settings(bundle: Path, **detection) -> PipelineSettings:
    return PIPELINE_SETTINGS.validate_python(
        {
            "type": "nodule-detection",
            "device": "cpu",
            "model": {"path": str(bundle)},
            "detection": {"threshold": 0.5, **detection},
        }
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("detector")
    return blob_detector_bundle(root, 2 * BALL_RADIUS / SPACING_MM, SPACING_MM)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """330 x 260 mm at 2.0 x 1.6 mm pixels, 3 mm slices written head first; the body ends
    inside the field of view (air above and below, as in a real scan's lung apices)."""
    geometry = Geometry(
        rows=130,
        columns=206,
        pixel_spacing=(2.0, 1.6),
        origin=(-164.0, -130.0, -75.0),
        slice_step=3.0,
        slices=50,
    )
    geometry.positions.reverse()
    body = chest()

    def hu(points: np.ndarray) -> np.ndarray:
        out = body(points)
        out[np.abs(points[..., 2]) > 66] = -1000.0
        return out

    files = write_series(tmp_path_factory.mktemp("phantom"), geometry, with_ball(hu))
    return load_volume(files)


def test_the_box_lands_on_the_ball(bundle: Path, phantom: Volume, tmp_path: Path) -> None:
    pipeline = NoduleDetectionPipeline("nodule-detection", settings(bundle, roi_size=TWO_WINDOWS))
    assert pipeline.problem() is None
    result = pipeline.run(phantom)

    assert result.detections, "the ball was not detected"
    top = result.detections[0]
    center = np.asarray(top.center)
    size = np.asarray(top.box_max) - np.asarray(top.box_min)
    assert np.linalg.norm(center - BALL_CENTER) < BALL_RADIUS / 2, (center, BALL_CENTER)
    assert np.all(np.abs(size - 2 * BALL_RADIUS) <= 2 * SPACING_MM), size
    assert top.finding_site == codes.RIGHT_LUNG
    assert top.label == codes.NODULE

    # its segment holds the ball's voxels and its volume is the ball's
    mask = result.mask(top.segment).array
    ball_ml = 4 / 3 * np.pi * BALL_RADIUS**3 / 1000
    assert mask.sum() * phantom.voxel_volume_ml == pytest.approx(ball_ml, rel=0.3)
    volume_mm3 = top.measurements[0].value
    assert volume_mm3 == pytest.approx(ball_ml * 1000, rel=0.3)

    # the SR draws the box on the source slice nearest the ball's centre, around it
    identity = ResultIdentity("nodule-detection", "0.1.0", phantom.series_instance_uid, 1, "T")
    files = encode_result(result, phantom, identity, tmp_path)
    sr = pydicom.dcmread(next(f for f in files if f.name == "sr.dcm"))
    scoord = _first(sr, "SCOORD")
    image = scoord.ContentSequence[0].ReferencedSOPSequence[0]
    by_uid = {s.sop_instance_uid: i for i, s in enumerate(phantom.sources)}
    slice_index = by_uid[image.ReferencedSOPInstanceUID]
    slice_z = phantom.to_patient((slice_index, 0, 0))[2]
    assert abs(slice_z - BALL_CENTER[2]) <= 3.0 / 2 + SPACING_MM
    points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)  # column, row
    inverse = np.linalg.inv(phantom.affine)
    ball_row, ball_column = (inverse @ np.append(BALL_CENTER, 1.0))[1:3]
    assert points[:, 0].min() < ball_column + 0.5 < points[:, 0].max()
    assert points[:, 1].min() < ball_row + 0.5 < points[:, 1].max()
    assert _num(sr, "Volume") == pytest.approx(volume_mm3)


def test_the_operating_threshold_is_config(bundle: Path, phantom: Volume) -> None:
    strict = NoduleDetectionPipeline(
        "nodule-detection", settings(bundle, threshold=0.999, roi_size=WHOLE_PHANTOM)
    )
    assert strict.run(phantom).detections == []


def test_without_a_model_the_pipeline_says_why(tmp_path: Path) -> None:
    pipelines = build_pipelines({"nodules": settings(tmp_path / "missing")})
    assert "model not found" in pipelines["nodules"].problem()


def _first(dataset, value_type: str):
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == value_type:
            return item
        found = _first(item, value_type)
        if found is not None:
            return found
    return None


def _num(dataset, meaning: str) -> float | None:
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            return float(item.MeasuredValueSequence[0].NumericValue)
        found = _num(item, meaning)
        if found is not None:
            return found
    return None


@pytest.mark.slow
def test_a_ball_inserted_in_a_real_scan_is_found_where_it_was_put(bundle: Path, real_series):
    """The normal COVID-CT-MD scan (real Siemens geometry) with a 14 mm ball put in the
    middle of its right lung: a detection lands on it, on its side."""
    import torch

    from pipelines.anatomy.lungs import segment_lungs

    volume = load_volume(real_series["normal"])
    right = segment_lungs(torch.from_numpy(volume.voxels), volume).right
    inside = np.argwhere(right.numpy())
    index = inside[np.argmin(np.linalg.norm(inside - inside.mean(axis=0), axis=1))]
    center = volume.to_patient(index)
    reach = int(np.ceil(2 * BALL_RADIUS / min(volume.spacing)))  # voxels around the centre
    low = np.maximum(index - reach, 0)
    high = np.minimum(index + reach + 1, volume.voxels.shape)
    axes = [np.arange(start, stop) for start, stop in zip(low, high, strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    patient = points @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    ball = points[np.linalg.norm(patient - center, axis=1) <= BALL_RADIUS]
    volume.voxels[tuple(ball.T)] = 30.0

    pipeline = NoduleDetectionPipeline(
        "nodule-detection", settings(bundle, threshold=0.3, max_detections=50)
    )
    result = pipeline.run(volume)
    hits = [
        d
        for d in result.detections
        if np.linalg.norm(np.asarray(d.center) - center) < BALL_RADIUS / 2
    ]
    assert hits, f"no detection on the ball at {center}"
    assert hits[0].finding_site == codes.RIGHT_LUNG


def test_a_state_dict_with_its_network_in_config(tmp_path: Path, phantom: Volume) -> None:
    """The blob detector as a bare state dict: the network named in config, with our
    torchvision-free feature extractor in its expression."""
    import torch

    from tests.models import blob_detector, filter_size

    weights = tmp_path / "retinanet.pt"
    diameter = 2 * BALL_RADIUS / SPACING_MM
    torch.save(blob_detector(diameter).state_dict(), weights)
    size = filter_size(diameter)
    extractor = (
        "$pipelines.detection_network.resnet_fpn_feature_extractor("
        "monai.networks.nets.resnet.ResNet(block='basic',layers=[1,1,1,1],"
        "block_inplanes=[8,16,32,64],spatial_dims=3,n_input_channels=1,"
        f"conv1_t_size=[{size},{size},{size}],conv1_t_stride=[1,1,1]),3,False,[1,2],"
        "fpn_channels=16)"
    )
    settings = PIPELINE_SETTINGS.validate_python(
        {
            "type": "nodule-detection",
            "device": "cpu",
            "model": {"path": str(weights)},
            "network": {
                "target": "monai.apps.detection.networks.retinanet_network.RetinaNet",
                "args": {
                    "spatial_dims": 3,
                    "num_classes": 1,
                    "num_anchors": 1,
                    "size_divisible": [8, 8, 8],
                    "feature_extractor": extractor,
                },
            },
            "preprocessing": {"spacing_mm": [SPACING_MM] * 3, "roi_size": WHOLE_PHANTOM},
            "detection": {
                "threshold": 0.5,
                "anchor_shapes": [[int(np.ceil(diameter))] * 3],
                "feature_map_scales": [1, 1, 1],
            },
        }
    )
    result = NoduleDetectionPipeline("nodule-detection", settings).run(phantom)
    assert result.detections
    center = np.asarray(result.detections[0].center)
    assert np.linalg.norm(center - BALL_CENTER) < BALL_RADIUS / 2
