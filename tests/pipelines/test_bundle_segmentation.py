"""bundle-segmentation with a real MONAI bundle built here: a fixed-weight 3-D convolution
that segments everything above -200 HU. Exercises bundle loading, the bundle's own
preprocessing (orientation, resampling, intensity), the sliding window and the inverse
transforms back onto the series grid."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import codes
from pipelines.base import Unavailable
from pipelines.bundle_segmentation import BundleSegmentationPipeline
from pipelines.registry import build_pipelines
from pipelines.settings import PipelineSettings
from pipelines.volume import load_volume
from tests.models import PIPELINE_SETTINGS
from tests.phantoms import Geometry, sphere, write_series

CENTER, RADIUS = (6.0, -4.0, 3.0), 11.0
A_MIN, A_MAX, THRESHOLD_HU = -1024.0, 976.0, -200.0


def threshold_net() -> torch.nn.Conv3d:
    """Channel 1 minus channel 0 is positive exactly where the scaled input is above -200 HU."""
    net = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1, 0, 1, 1, 1] = 100.0
        net.bias[1] = -100.0 * (THRESHOLD_HU - A_MIN) / (A_MAX - A_MIN)
    return net


INFERENCE = {
    "bundle_root": ".",
    "network_def": {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": 2,
        "kernel_size": 3,
        "padding": 1,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {
                "_target_": "Spacingd",
                "keys": "image",
                "pixdim": [1.5, 1.5, 1.5],
                "mode": "bilinear",
            },
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": A_MIN,
                "a_max": A_MAX,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    },
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": [24, 24, 24],
        "sw_batch_size": 2,
        "overlap": 0.25,
    },
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": False,
                "to_tensor": True,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "/nonexistent"},
        ],
    },
}


def make_bundle(root: Path, weights: str = "pt", inverse: bool = True) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.3.1"}))
    config = json.loads(json.dumps(INFERENCE))
    if not inverse:
        config["postprocessing"]["transforms"] = [
            t for t in config["postprocessing"]["transforms"] if t["_target_"] != "Invertd"
        ]
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    net = threshold_net()
    if weights == "pt":
        torch.save(net.state_dict(), root / "models" / "model.pt")
    else:
        torch.jit.script(net).save(str(root / "models" / "model.ts"))
    return root


def settings(model: Path, sha256: str | None = None, **extra) -> PipelineSettings:
    return PIPELINE_SETTINGS.validate_python(
        {
            "type": "bundle-segmentation",
            "device": "cpu",
            "model": {"path": str(model), "sha256": sha256},
            "labels": {1: {"name": "Dense", "type": {"value": "85756007", "meaning": "Tissue"}}},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory):
    """Non-square pixels, slices written head first, a dense ball off centre."""
    folder = tmp_path_factory.mktemp("phantom")
    geometry = Geometry(
        rows=40,
        columns=36,
        pixel_spacing=(1.1, 1.4),
        origin=(-25.0, -24.0, -17.0),
        slice_step=2.0,
        slices=20,
    )
    geometry.positions.reverse()
    files = write_series(folder, geometry, sphere(CENTER, RADIUS, 80.0, -950.0))
    volume = load_volume(files)
    truth = volume.voxels > THRESHOLD_HU
    return volume, truth


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize(("weights", "inverse"), [("pt", True), ("ts", True), ("pt", False)])
def test_bundle_segments_onto_the_series_grid(
    tmp_path: Path, phantom, weights: str, inverse: bool
) -> None:
    volume, truth = phantom
    bundle = make_bundle(tmp_path / "bundle", weights, inverse)
    pipeline = BundleSegmentationPipeline("dense-seg", settings(bundle))
    assert pipeline.problem() is None and pipeline.version == "0.3.1"
    result = pipeline.run(volume)
    mask = result.mask("Dense").array
    assert mask.shape == volume.voxels.shape
    assert dice(mask, truth) > 0.9
    expected_ml = 4 / 3 * np.pi * RADIUS**3 / 1000
    assert result.region("Dense").value(codes.VOLUME) == pytest.approx(expected_ml, rel=0.15)
    assert result.timings["inference"] > 0


def test_torchscript_file_with_configured_preprocessing(tmp_path: Path, phantom) -> None:
    volume, truth = phantom
    model = tmp_path / "net.ts"
    torch.jit.script(threshold_net()).save(str(model))
    preprocessing = {
        "spacing_mm": [1.2, 1.2, 1.2],
        "intensity_range": [A_MIN, A_MAX],
        "roi_size": [16, 16, 16],
    }
    pipeline = BundleSegmentationPipeline("dense-seg", settings(model, preprocessing=preprocessing))
    assert dice(pipeline.run(volume).mask("Dense").array, truth) > 0.9


def test_the_model_is_loaded_once_per_process(tmp_path: Path, phantom) -> None:
    volume, _ = phantom
    pipeline = BundleSegmentationPipeline("dense-seg", settings(make_bundle(tmp_path / "b")))
    pipeline.run(volume)
    first = pipeline.model(torch.device("cpu")).network
    pipeline.run(volume)
    assert pipeline.model(torch.device("cpu")).network is first


def test_missing_and_corrupt_models_make_the_pipeline_unavailable(tmp_path: Path, phantom) -> None:
    volume, _ = phantom
    missing = BundleSegmentationPipeline("seg", settings(tmp_path / "nowhere"))
    assert missing.problem() == f"model not found at {tmp_path / 'nowhere'}"
    with pytest.raises(Unavailable, match="model not found"):
        missing.run(volume)
    bundle = make_bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    assert "lacks models/model.ts or models/model.pt" in str(
        BundleSegmentationPipeline("seg", settings(bundle)).problem()
    )
    good = make_bundle(tmp_path / "c")
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(Unavailable, match="does not match its configured sha256"):
        BundleSegmentationPipeline("seg", settings(good, wrong)).run(volume)
    right = hashlib.sha256((good / "models" / "model.pt").read_bytes()).hexdigest()
    assert BundleSegmentationPipeline("seg", settings(good, right)).run(volume).masks
    (good / "models" / "model.pt").write_bytes(b"truncated")
    with pytest.raises(Unavailable, match="cannot load"):
        BundleSegmentationPipeline("seg", settings(good)).run(volume)


def test_registry_builds_configured_pipelines_and_refuses_unknown_types(tmp_path: Path) -> None:
    pipelines = build_pipelines({"lobes": settings(tmp_path / "x")})
    assert {"echo", "lung-quant", "lobes"} <= set(pipelines)
    assert "bundle-segmentation" not in pipelines
    with pytest.raises(ValueError, match="unknown pipeline type 'nope'"):
        build_pipelines({"x": PipelineSettings(type="nope")})
