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


def test_a_batch_gives_each_series_its_own_embedding(tmp_path: Path) -> None:
    """Series of one input shape go through the network together, others apart; each gets
    the embedding it gets alone."""
    pipeline = embedder(encoder_model(tmp_path / "model"))
    longer = chest_geometry()
    longer.slices += 6
    volumes = [
        load_volume(write_series(tmp_path / "a", chest_geometry(), chest())),
        load_volume(write_series(tmp_path / "b", longer, chest())),
        load_volume(
            write_series(tmp_path / "c", chest_geometry(), chest((40, 20, 30), (-80, 10, -20)))
        ),
    ]
    together = pipeline.run_batch(volumes)
    alone = [pipeline.run(volume) for volume in volumes]
    for batched, single in zip(together, alone, strict=True):
        np.testing.assert_allclose(batched.embedding, single.embedding, atol=1e-5)
    assert not np.allclose(together[0].embedding, together[2].embedding, atol=1e-3)
    assert pipeline.batch_limit() == 1  # on the CPU, unless batch_size says otherwise


def test_a_batch_the_gpu_cannot_hold_is_halved(tmp_path: Path) -> None:
    """A GPU's out-of-memory error cannot be raised on the CPU: the network's batch call
    raises it above two series, as a GPU would."""
    pipeline = embedder(encoder_model(tmp_path / "model"))
    sizes: list[int] = []
    infer_batch = pipeline.infer_batch

    def holding_two(volumes, device, stage):
        sizes.append(len(volumes))
        if len(volumes) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return infer_batch(volumes, device, stage)

    pipeline.infer_batch = holding_two
    volumes = [
        load_volume(write_series(tmp_path / str(k), chest_geometry(), chest((30 + 5 * k, 20, 30))))
        for k in range(4)
    ]
    results = pipeline.run_batch(volumes)
    assert sizes == [4, 2, 2]
    for volume, result in zip(volumes, results, strict=True):
        np.testing.assert_allclose(result.embedding, pipeline.run(volume).embedding, atol=1e-5)


def test_on_the_cpu_the_network_runs_channels_last_and_answers_the_same(tmp_path: Path) -> None:
    pipeline = embedder(encoder_model(tmp_path / "model"))
    cpu = torch.device("cpu")
    network = pipeline.model(cpu).network
    as_saved = pipeline.source.load(cpu).network  # the same weights in torch's default layout
    kernels = [p for p in network.parameters() if p.dim() == 5]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in kernels)
    assert not any(
        p.is_contiguous(memory_format=torch.channels_last_3d)
        for p in as_saved.parameters()
        if p.dim() == 5 and p.shape[1] > 1
    )
    image = torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        for ours, theirs in zip(network(image), as_saved(image), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
