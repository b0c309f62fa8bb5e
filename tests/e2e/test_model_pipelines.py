"""The model pipelines end to end: Orthanc sends a real study to `ainode serve`, which runs
covid-triage, thoracic-findings, nodule-detection and ct-embedding with small models of the
real architectures; the SRs and the nodule SEG arrive in Orthanc's study, dciodvfy-clean,
with the values the jobs recorded; OHIF draws the detection SR and the triage key image; the
embeddings make `ainode similar` answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import torch

from tests.conftest import serve_ohif
from tests.dicom_checks import dciodvfy_errors, qualitative_evaluations
from tests.e2e.test_results_to_pacs import (
    series_by_modality,
    upload_and_send,
    viewer_shot,
)
from tests.e2e.test_routing import uid_of
from tests.models import (
    ENCODER_ARGS,
    blob_detector_bundle,
    ct_fm_embedding,
    densenet_findings_bundle,
    fixed_classifier,
)
from tests.peers import OrthancServer, wait_until

PIPELINES = ("covid-triage", "thoracic-findings", "nodule-detection", "ct-embedding")
RULES = """
rules:
  - name: chest-ct
    match: {Modality: CT}
    pipelines: [covid-triage, thoracic-findings, nodule-detection, ct-embedding]
    destinations: [origin]
    priority_if_positive: stat
"""
SMALL_INPUT = {"spacing_mm": [4.0, 4.0, 5.0], "crop": "lungs", "spatial_size": [48, 40, 40]}


def pipeline_config(models: Path) -> dict[str, object]:
    triage = models / "triage.pt"
    torch.save(fixed_classifier([2.0, 0.5, -1.0]).state_dict(), triage)
    encoder_args = {"out_channels": 3, **ENCODER_ARGS}
    return {
        "covid-triage": {
            "device": "cpu",
            "model": {"path": str(triage)},
            "network": {"target": "pipelines.networks.EncoderClassifier", "args": encoder_args},
            "preprocessing": SMALL_INPUT,
        },
        "thoracic-findings": {
            "device": "cpu",
            "model": {"path": str(densenet_findings_bundle(models / "findings"))},
        },
        "nodule-detection": {
            "device": "cpu",
            "model": {"path": str(blob_detector_bundle(models / "nodules", 3.0, 4.0))},
            "detection": {"threshold": 0.3, "max_detections": 3},
        },
        "ct-embedding": ct_fm_embedding(models, 6.0),
    }


def by_pipeline(orthanc: OrthancServer, study: str, modality: str) -> dict[str, dict]:
    """The result series of one modality in the study, by the pipeline that made them."""
    return {
        s["MainDicomTags"]["SeriesDescription"].split()[1]: s
        for s in series_by_modality(orthanc, study).get(modality, [])
    }


@pytest.mark.slow
def test_model_pipelines_report_to_the_pacs_and_the_radiologist_sees_them_in_ohif(
    start_node, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    node = start_node(
        port=orthanc.node_port,
        routing={"rules_file": str(rules)},
        peers={
            "pacs": {
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "key_images": True,
            }
        },
        pipelines=pipeline_config(models),
    )
    lung, body = real_series["lung-kernel"], real_series["body-kernel"]
    study = upload_and_send(orthanc, lung + body)

    def reported() -> bool:
        jobs = node.status()["jobs"]
        done = [j for j in jobs if j["state"] in ("succeeded", "failed", "dead")]
        return len(done) == 2 * len(PIPELINES) and len(by_pipeline(orthanc, study, "SR")) == 3

    wait_until(reported, timeout=600, interval=2)
    jobs = {(j["pipeline"], j["series_instance_uid"]): j for j in node.status()["jobs"]}
    assert all(j["state"] == "succeeded" for j in jobs.values()), [
        (k, j["error"]) for k, j in jobs.items() if j["state"] != "succeeded"
    ]
    srs = by_pipeline(orthanc, study, "SR")
    assert set(srs) == {"covid-triage", "thoracic-findings", "nodule-detection"}
    assert "ct-embedding" not in by_pipeline(orthanc, study, "SEG")
    segs = by_pipeline(orthanc, study, "SEG")
    assert set(segs) == {"nodule-detection"}

    files = {}
    for name, series in [*srs.items(), ("nodule-seg", segs["nodule-detection"])]:
        paths = []
        for instance in series["Instances"]:
            path = tmp_path / f"{instance}.dcm"
            path.write_bytes(orthanc.get(f"/instances/{instance}/file"))
            paths.append(path)
        files[name] = paths
        if shutil.which("dciodvfy"):
            for path in paths:
                assert dciodvfy_errors(path) == [], (name, path)

    # the triage SR holds the job's three probabilities, and COVID-19 is the decision
    lung_uid = uid_of(lung)
    for path in files["covid-triage"]:
        sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
        source = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        job = jobs[("covid-triage", source.SeriesInstanceUID)]
        expected = {f["concept"]["meaning"]: f for f in job["result"]["findings"]}
        found = qualitative_evaluations(sr)
        assert found.keys() == expected.keys()
        for meaning, (value, probability) in found.items():
            assert probability == pytest.approx(expected[meaning]["probability"], abs=1e-4)
            assert (value == "Present") == expected[meaning]["present"]
        assert expected["COVID-19"]["present"]
        assert job["result"]["positive"]

    # the detection SR: a box per nodule, with the job's score, long axis, side and volume
    for path in files["nodule-detection"]:
        dataset = pydicom.dcmread(path)
        series_uid = dataset.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        report = hd.sr.Comprehensive3DSR.from_dataset(dataset)
        groups = report.content.get_planar_roi_measurement_groups()
        job = next(
            j
            for (p, uid), j in jobs.items()
            if p == "nodule-detection" and uid in {s.SeriesInstanceUID for s in series_uid}
        )
        detections = job["result"]["detections"]
        assert len(groups) == len(detections) > 0
        for group, detection in zip(groups, detections, strict=True):
            values = {m.name.meaning: m.value for m in group.get_measurements()}
            assert values["Probability"] == pytest.approx(detection["score"], abs=1e-4)
            assert values["Volume"] == pytest.approx(detection["measurements"][0]["value"])
            assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    seg = pydicom.dcmread(files["nodule-seg"][0])
    assert seg.SegmentSequence[0].SegmentLabel == "Nodule 1"

    # the embeddings: one per series, and each kernel finds the other as the most similar
    embedded = node.cli("similar", lung_uid, "--json")
    assert embedded.returncode == 0, embedded.stderr
    (nearest,) = json.loads(embedded.stdout)["similar"]
    assert nearest["series_instance_uid"] == uid_of(body)
    assert jobs[("ct-embedding", lung_uid)]["result"]["embedding_dim"] == 16

    # what the radiologist sees: the detection SR's boxes (the SEG is the encoder
    # test_results_to_pacs.py and test_dicomweb.py look at in OHIF); OHIF 3.13 cannot open a
    # measurement report without drawable measurements (it fails on the triage SR, standard as
    # it is): the triage reaches the radiologist as a key image
    def triage_key_images() -> dict[str, dict] | None:
        found = by_pipeline(orthanc, study, "OT")
        return found if "covid-triage" in found else None

    key_images = wait_until(triage_key_images, timeout=60)
    study_uid = str(pydicom.dcmread(lung[0], stop_before_pixels=True).StudyInstanceUID)
    shots = Path(__file__).resolve().parents[2] / "var" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with serve_ohif(orthanc.dicomweb_url, tmp_path / "ohif") as ohif:
        for out, series, options in [
            ("nodules-sr.png", srs["nodule-detection"], ["--yes"]),
            ("triage-key-image.png", key_images["covid-triage"], []),
        ]:
            uid = series["MainDicomTags"]["SeriesInstanceUID"]
            viewer_shot(ohif, study_uid, shots / out, "--series", uid, *options)
