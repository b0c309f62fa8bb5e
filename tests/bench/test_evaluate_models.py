"""`make eval`'s model table runs with the small test models (its figures mean nothing with
them, but every line from the config to the table runs) and says which pipelines are not
configured. The script runs in the test's process, as `python bench/evaluate_models.py` runs
it (a subprocess would import torch and MONAI again: 10 s a run)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.models import blob_detector_bundle, fixed_classifier

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_model_evaluation_prints_its_table(
    real_series, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    triage = tmp_path / "triage.pt"
    torch.save(fixed_classifier([0.1, 0.2, 1.0]).state_dict(), triage)
    network = {
        "target": "pipelines.networks.EncoderClassifier",
        "args": {"out_channels": 3, "init_filters": 4, "blocks_down": [1, 1, 1]},
    }
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
                "pipelines": {
                    "covid-triage": {
                        "device": "cpu",
                        "model": {"path": str(triage)},
                        "network": network,
                        "preprocessing": {"spacing_mm": [6, 6, 6], "spatial_size": [32, 32, 32]},
                    },
                    "nodule-detection": {
                        "device": "cpu",
                        "model": {"path": str(blob_detector_bundle(tmp_path / "nodules", 3, 4))},
                        "detection": {"threshold": 0.3, "max_detections": 5},
                    },
                },
            }
        )
    )
    table = evaluate_models(capsys, monkeypatch, "--config", str(config))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "sensitivity" in rows["nodule-detection"] and "FP per scan" in rows["nodule-detection"]
    assert "2 scans, 1 tumours" in rows["nodule-detection"]  # one tumour, both kernels
    # the fixed logits always say normal: right on one case of three
    assert "accuracy 0.33 (1/3)" in rows["covid-triage"]
    assert "normal001: Normal" in rows["covid-triage"]

    unconfigured = evaluate_models(capsys, monkeypatch)
    assert "| nodule-detection | - | not configured in config.example.yaml |" in unconfigured


def evaluate_models(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> str:
    """What `python bench/evaluate_models.py ARGS` prints."""
    script = REPO / "bench" / "evaluate_models.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    capsys.readouterr()
    runpy.run_path(str(script), run_name="__main__")
    return capsys.readouterr().out
