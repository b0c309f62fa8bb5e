"""Site probes (`pipelines.probe`): a logistic head fitted on embeddings with its
leave-one-out metrics, run by `embedding-probe` on a series (a small CT-FM encoder here),
its findings and the guard's evaluation in a dciodvfy-clean SR; a probe fitted on another
model's embeddings, or missing, makes the pipeline unavailable with the reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from node.work.guard import GuardScore
from node.work.results.encode import encode_result
from node.work.results.identity import ResultIdentity
from pipelines import codes
from pipelines.probe import fit_probe, load_probe, save_probe
from pipelines.registry import build_pipelines
from pipelines.volume import load_volume
from tests.dicom_checks import qualitative_evaluations, validate
from tests.models import ENCODER_ARGS, PIPELINE_SETTINGS
from tests.phantoms import chest, chest_geometry, write_series
from tests.pipelines.test_embedding import SMALL, embedder, encoder_model

RNG = np.random.default_rng(11)


def clustered(labels: list[str], dimensions: int) -> dict[str, np.ndarray]:
    centres = {label: RNG.normal(size=dimensions) for label in sorted(set(labels))}
    return {
        f"1.2.{i}": centres[label] + RNG.normal(scale=0.1, size=dimensions)
        for i, label in enumerate(labels)
    }


def test_a_probe_learns_separable_classes_and_reports_its_leave_one_out_metrics() -> None:
    labels = ["covid", "cap", "normal", "effusion"] * 3
    embeddings = clustered(labels, 16)
    by_uid = dict(zip(embeddings, labels, strict=True))
    probe = fit_probe("triage", "ct-embedding", "1.0", embeddings, by_uid, negative="normal")
    assert probe.metrics.series == 12 and probe.metrics.accuracy == 1.0
    assert probe.metrics.per_class["cap"] == {"series": 3, "correct": 3}
    coded = {c.label: (c.code.code(), c.negative) for c in probe.classes}
    assert coded["covid"] == (codes.COVID_19, False)
    assert coded["normal"] == (codes.NORMAL, True)
    assert coded["effusion"][0] == codes.private("EFFUSION", "effusion")
    findings = probe.findings(embeddings["1.2.0"])  # a covid case
    assert [f.present for f in findings] == [f.concept == codes.COVID_19 for f in findings]
    assert sum(f.probability for f in findings) == pytest.approx(1.0, abs=1e-3)


def test_a_two_class_probe_gives_the_logistic_probability() -> None:
    from sklearn.linear_model import LogisticRegression

    labels = ["normal", "nodule"] * 4
    embeddings = clustered(labels, 8)
    probe = fit_probe("n", "e", "1.0", embeddings, dict(zip(embeddings, labels, strict=True)))
    data = np.stack(list(embeddings.values()))
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(data, labels)
    for vector, expected in zip(data, reference.predict_proba(data), strict=True):
        np.testing.assert_allclose(probe.probabilities(vector), expected, atol=1e-6)


def test_a_probe_needs_two_classes_and_three_series() -> None:
    embeddings = clustered(["a", "a", "a"], 4)
    with pytest.raises(ValueError, match="at least three series in two classes"):
        fit_probe("x", "e", "1.0", embeddings, dict.fromkeys(embeddings, "a"))


def probe_pipeline(model: Path, probe: Path):
    settings = PIPELINE_SETTINGS.validate_python(
        {
            "type": "embedding-probe",
            "device": "cpu",
            "probe": str(probe),
            "model": {"path": str(model)},
            "network": {
                "target": "monai.networks.nets.segresnet_ds.SegResEncoder",
                "args": {"spatial_dims": 3, **ENCODER_ARGS},
            },
            "preprocessing": SMALL,
        }
    )
    return build_pipelines({"covid-probe": settings})["covid-probe"]


def test_the_probe_pipeline_reports_its_findings_and_the_guard_in_the_sr(tmp_path: Path) -> None:
    model = encoder_model(tmp_path / "model")
    geometry = chest_geometry()
    shapes = {
        "covid": chest(),
        "cap": chest((40, 20, 30), (-80, 10, -20)),
        "normal": chest((70, -10, 10), (-50, -10, 10)),
    }
    volumes = {
        label: load_volume(write_series(tmp_path / label, geometry, hu))
        for label, hu in shapes.items()
    }
    embedding = embedder(model)
    vectors = {v.series_instance_uid: embedding.run(v).embedding for v in volumes.values()}
    labels = {v.series_instance_uid: label for label, v in volumes.items()}
    probe = fit_probe("covid", "ct-embedding", embedding.version, vectors, labels, "normal")
    assert probe.metrics.series == 3  # one series a class: leave-one-out cannot be right
    assert probe.metrics.correct == 0
    save_probe(probe, tmp_path / "probes" / "covid.json")

    pipeline = probe_pipeline(model, tmp_path / "probes" / "covid.json")
    assert pipeline.problem() is None
    assert pipeline.version.startswith(f"{embedding.version}+probe-")
    volume = volumes["cap"]
    result = pipeline.run(volume)
    assert result.embedding is None and result.reportable
    assert [f.concept.meaning for f in result.findings] == [
        "Community acquired pneumonia",
        "COVID-19",
        "Normal",
    ]
    assert sum(f.present for f in result.findings) == 1

    identity = ResultIdentity(pipeline.name, pipeline.version, volume.series_instance_uid, 1, "N")
    guard = GuardScore(distance=2.25, threshold=1.5, reference_series=5)
    sr = tmp_path / "out" / "sr.dcm"
    assert sr in encode_result(result, volume, identity, tmp_path / "out", guard)
    validate(sr)
    evaluations = qualitative_evaluations(hd.sr.srread(sr))
    assert evaluations["Series like the site's reference series"] == ("Absent", 2.25)
    for finding in result.findings:
        present = "Present" if finding.present else "Absent"
        assert evaluations[finding.concept.meaning] == (present, finding.probability)


def test_a_missing_or_foreign_probe_makes_the_pipeline_unavailable(tmp_path: Path) -> None:
    model = encoder_model(tmp_path / "model")
    missing = probe_pipeline(model, tmp_path / "none.json")
    assert "cannot read the probe" in missing.problem()
    foreign = tmp_path / "foreign.json"
    labels = ["a", "b", "a", "b"]
    embeddings = clustered(labels, 16)
    by_uid = dict(zip(embeddings, labels, strict=True))
    fitted = datetime(2026, 11, 1, tzinfo=UTC)
    probe = fit_probe("f", "ct-embedding", "astra-0.1.1", embeddings, by_uid, None, fitted)
    save_probe(probe, foreign)
    problem = probe_pipeline(model, foreign).problem()
    assert problem == ("the probe was fitted on astra-0.1.1 embeddings; this pipeline computes 1.0")
    not_a_probe = tmp_path / "bad.json"
    not_a_probe.write_text(json.dumps({"name": "x"}))
    assert "is not a probe file" in probe_pipeline(model, not_a_probe).problem()
    assert load_probe(foreign).fitted_at == fitted
