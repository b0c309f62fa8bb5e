"""ct-embedding with a small SegResEncoder (CT-FM's architecture) saved as a state dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from pipelines.registry import build_pipelines
from pipelines.result import EMBEDDING_FILE
from pipelines.volume import load_volume
from tests.models import ENCODER_ARGS, PIPELINE_SETTINGS
from tests.phantoms import chest, chest_geometry, write_series

SMALL = {"spacing_mm": [6.0, 6.0, 6.0], "orientation": "SPL", "intensity_range": [-1024, 2048]}


def encoder_model(folder: Path) -> Path:
    torch.manual_seed(3)
    net = SegResEncoder(spatial_dims=3, **ENCODER_ARGS)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "ct-fm.pt")
    return folder / "ct-fm.pt"


def embedder(model: Path):
    settings = PIPELINE_SETTINGS.validate_python(
        {
            "type": "ct-embedding",
            "device": "cpu",
            "model": {"path": str(model)},
            "network": {
                "target": "monai.networks.nets.segresnet_ds.SegResEncoder",
                "args": {"spatial_dims": 3, **ENCODER_ARGS},
            },
            "preprocessing": SMALL,
        }
    )
    return build_pipelines({"ct-fm": settings})["ct-fm"]


def test_an_embedding_is_a_unit_vector_that_tells_scans_apart(tmp_path: Path) -> None:
    pipeline = embedder(encoder_model(tmp_path / "model"))
    lungs = load_volume(write_series(tmp_path / "a", chest_geometry(), chest()))
    moved = load_volume(
        write_series(tmp_path / "b", chest_geometry(), chest((40, 20, 30), (-80, 10, -20)))
    )
    first, again, other = (pipeline.run(v) for v in (lungs, lungs, moved))
    assert first.embedding.shape == (4 * 2**2,)  # init_filters x 2^(levels - 1)
    assert np.linalg.norm(first.embedding) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(first.embedding, again.embedding, atol=1e-6)
    assert float(first.embedding @ other.embedding) < float(first.embedding @ again.embedding)
    assert not first.reportable  # nothing for an SR: the node stores the vector instead

    first.save(tmp_path / "out")
    np.testing.assert_allclose(np.load(tmp_path / "out" / EMBEDDING_FILE), first.embedding)


def test_the_default_network_is_ct_fm(tmp_path: Path) -> None:
    settings = PIPELINE_SETTINGS.validate_python(
        {"type": "ct-embedding", "model": {"path": str(tmp_path / "ct_fm.pt")}}
    )
    pipeline = build_pipelines({"ct-embedding": settings})["ct-embedding"]
    assert pipeline.source.network["_target_"].endswith("SegResEncoder")
    assert pipeline.source.network["init_filters"] == 32
    assert pipeline.source.network["blocks_down"] == [1, 2, 2, 4, 4]
    assert "model not found" in pipeline.problem()
