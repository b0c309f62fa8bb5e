"""thoracic-findings and covid-triage with small networks of the real architectures, saved
as a MONAI bundle, a bare state dict with its network in config, and TorchScript."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import codes
from pipelines.base import Unavailable
from pipelines.classification import CT_RATE_FINDINGS
from pipelines.registry import build_pipelines
from pipelines.volume import Volume, load_volume
from tests.models import (
    ENCODER_ARGS,
    PIPELINE_SETTINGS,
    MeanIntensityClassifier,
    densenet_findings_bundle,
    fixed_classifier,
)
from tests.phantoms import chest, chest_geometry, write_series

SMALL_INPUT = {
    "spacing_mm": [4.0, 4.0, 5.0],
    "intensity_range": [-1000.0, 200.0],
    "crop": "lungs",
    "spatial_size": [48, 40, 40],
}


@pytest.fixture(scope="module")
def chest_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return load_volume(write_series(tmp_path_factory.mktemp("chest"), chest_geometry(), chest()))


def pipeline(name: str, kind: str, model: Path, **extra):
    settings = PIPELINE_SETTINGS.validate_python(
        {"type": kind, "device": "cpu", "model": {"path": str(model)}, **extra}
    )
    return build_pipelines({name: settings})[name]


def state_dict_model(folder: Path, logits: list[float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    torch.save(fixed_classifier(logits).state_dict(), path)
    return path


ENCODER_NETWORK = {
    "target": "pipelines.networks.EncoderClassifier",
    "args": {"out_channels": 3, **ENCODER_ARGS},
}


def test_triage_reports_the_three_probabilities_and_decides_by_the_largest(
    chest_volume: Volume, tmp_path: Path
) -> None:
    model = state_dict_model(tmp_path, [0.2, 1.4, -0.3])
    triage = pipeline(
        "covid-triage", "covid-triage", model, network=ENCODER_NETWORK, preprocessing=SMALL_INPUT
    )
    result = triage.run(chest_volume)
    expected = torch.softmax(torch.tensor([0.2, 1.4, -0.3]), dim=0).tolist()
    assert [f.concept for f in result.findings] == [
        codes.COVID_19,
        codes.COMMUNITY_ACQUIRED_PNEUMONIA,
        codes.NORMAL,
    ]
    assert [f.probability for f in result.findings] == pytest.approx(expected, abs=1e-4)
    assert [f.present for f in result.findings] == [False, True, False]
    assert result.positive  # pneumonia is not "normal"


def test_a_normal_decision_is_not_positive(chest_volume: Volume, tmp_path: Path) -> None:
    model = state_dict_model(tmp_path, [-1.0, -1.0, 2.0])
    triage = pipeline(
        "covid-triage", "covid-triage", model, network=ENCODER_NETWORK, preprocessing=SMALL_INPUT
    )
    result = triage.run(chest_volume)
    assert [f.present for f in result.findings] == [False, False, True]
    assert not result.positive


def test_findings_are_called_at_each_labels_own_threshold(
    chest_volume: Volume, tmp_path: Path
) -> None:
    """A DenseNet bundle with CT-RATE's 18 labels; one threshold set low enough to call."""
    bundle = densenet_findings_bundle(tmp_path / "bundle")
    plain = pipeline("thoracic-findings", "thoracic-findings", bundle)
    first = plain.run(chest_volume)
    assert plain.version == "2.1.0"
    assert [f.concept for f in first.findings] == [c.code.code() for c in CT_RATE_FINDINGS]
    assert all(0 < f.probability < 1 for f in first.findings)
    assert [f.present for f in first.findings] == [f.probability >= 0.5 for f in first.findings]

    lowest = min(range(18), key=lambda k: first.findings[k].probability)
    classes = [c.model_dump() for c in CT_RATE_FINDINGS]
    classes[lowest]["threshold"] = 0.0
    tuned = pipeline("thoracic-findings", "thoracic-findings", bundle, classes=classes)
    second = tuned.run(chest_volume)
    assert second.findings[lowest].present
    assert [f.probability for f in second.findings] == [f.probability for f in first.findings]


@pytest.mark.parametrize("suffix", [".ts", ".pt2"])
def test_a_saved_model_sees_the_cropped_windowed_lungs(tmp_path: Path, suffix: str) -> None:
    """Denser lungs, higher logits: the network is fed the lungs, in the configured window;
    as TorchScript and as a torch.export ExportedProgram."""
    model = tmp_path / f"triage{suffix}"
    network = MeanIntensityClassifier([10.0, 10.0, -10.0], [0.2, 0.3, 0.2]).eval()
    if suffix == ".ts":
        torch.jit.script(network).save(model)
    else:
        example = torch.zeros(1, 1, *SMALL_INPUT["spatial_size"])
        torch.export.save(torch.export.export(network, (example,)), model)
    triage = pipeline("covid-triage", "covid-triage", model, preprocessing=SMALL_INPUT)
    assert triage.source.kind == ("TorchScript" if suffix == ".ts" else "ExportedProgram")
    probabilities = []
    for lung_hu in (-850.0, -500.0):
        base = chest()

        def hu(points: np.ndarray, base=base, lung_hu=lung_hu) -> np.ndarray:
            out = base(points)
            out[out == -850.0] = lung_hu
            return out

        files = write_series(tmp_path / str(lung_hu), chest_geometry(), hu)
        findings = triage.run(load_volume(files)).findings
        probabilities.append([f.probability for f in findings])
    (covid_clear, _, normal_clear), (covid_dense, _, normal_dense) = probabilities
    assert covid_dense > covid_clear and normal_dense < normal_clear


def test_a_class_count_that_does_not_match_the_model_is_an_error(
    chest_volume: Volume, tmp_path: Path
) -> None:
    model = state_dict_model(tmp_path, [0.0, 0.0])
    network = {**ENCODER_NETWORK, "args": {**ENCODER_NETWORK["args"], "out_channels": 2}}
    triage = pipeline(
        "covid-triage", "covid-triage", model, network=network, preprocessing=SMALL_INPUT
    )
    with pytest.raises(RuntimeError, match=r"gives 2 outputs but pipelines\.covid-triage names 3"):
        triage.run(chest_volume)


def test_broken_models_make_the_pipeline_unavailable_with_the_reason(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    broken = pipeline("covid-triage", "covid-triage", garbage, network=ENCODER_NETWORK)
    with pytest.raises(Unavailable, match="cannot load"):
        broken.model(torch.device("cpu"))
    no_network = pipeline("covid-triage", "covid-triage", garbage)
    assert "configure its network" in no_network.problem()
