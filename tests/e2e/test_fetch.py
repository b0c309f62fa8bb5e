"""Pulling from a real PACS: `ainode fetch` from Orthanc by study, accession and patient over
WADO-RS, C-MOVE and C-GET; failures retried and shown; a completed study's priors fetched,
marked, and routed only by rules that ask for priors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from tests.peers import NodeProcess, OrthancServer, free_port, storescu, wait_until

ECHO_ALL_CT = """
rules:
  - name: ct
    match: {Modality: CT}
    pipelines: [echo]
"""


def fetching_node(
    start_node: Callable[..., NodeProcess], orthanc: OrthancServer, tmp_path: Path, rules: str
) -> NodeProcess:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    pacs = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
    return start_node(
        port=orthanc.node_port,  # Orthanc knows the node here, as AINODE (C-MOVE target)
        routing={"rules_file": str(rules_file)},
        peers={
            "pacs": pacs,
            "pacs-get": {**pacs, "retrieve": "get"},
            "down": {"ae_title": "GONE", "host": "127.0.0.1", "port": free_port()},
        },
        dicomweb={"pacs-web": {"url": orthanc.dicomweb_url}},
        dispatch={"retry_base_seconds": 30, "retry_max_seconds": 60},
    )


def copy_as_study(files: list[Path], folder: Path, study_date: str, accession: str) -> list[Path]:
    """The same patient's images as another study (new UIDs, another date)."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = study_date
        ds.AccessionNumber = accession
        copies.append(folder / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def fetch(node: NodeProcess, *args: str) -> tuple[int, str]:
    done = node.cli("fetch", *args)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_fetch_by_study_accession_and_patient_over_wado_move_and_get(
    start_node, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    node = fetching_node(start_node, orthanc, tmp_path, ECHO_ALL_CT)
    lung = real_series["lung-kernel"][:8]
    first = pydicom.dcmread(lung[0], stop_before_pixels=True)
    other = copy_as_study(lung[:5], tmp_path / "other", "20100101", "ACC-MOVE")
    third = copy_as_study(lung[:4], tmp_path / "third", "20110101", "ACC-GET")
    storescu(orthanc.dicom_port, lung + other + third, calling_ae="TESTSCU", called_ae="ORTHANC")

    rc, out = fetch(node, "--from", "pacs-web", "--study", str(first.StudyInstanceUID))
    assert rc == 0, out
    assert "1 studies, 8 instances" in out
    rc, out = fetch(node, "--from", "pacs", "--accession", "ACC-MOVE")
    assert rc == 0, out
    assert "1 studies, 5 instances" in out
    rc, out = fetch(
        node, "--from", "pacs-get", "--patient-id", str(first.PatientID), "--since", "2010-01-01"
    )
    assert rc == 0, out  # the patient's studies since 2010 (the first is of 2007)
    assert "2 studies, 9 instances" in out

    series = node.series()
    by_uid = {uid: s for uid, s in series.items()}
    assert by_uid[str(first.SeriesInstanceUID)]["calling_ae"] == "pacs-web"
    assert by_uid[str(first.SeriesInstanceUID)]["source"] == "dicomweb"
    moved = pydicom.dcmread(other[0], stop_before_pixels=True).SeriesInstanceUID
    assert by_uid[str(moved)]["calling_ae"] == "ORTHANC"  # C-MOVE: Orthanc sends it to us
    got = pydicom.dcmread(third[0], stop_before_pixels=True).SeriesInstanceUID
    assert by_uid[str(got)]["calling_ae"] == "pacs-get" and by_uid[str(got)]["instances"] == 4
    # fetched series are routed like received ones
    wait_until(
        lambda: len([j for j in node.status()["jobs"] if j["state"] == "succeeded"]) == 3,
        timeout=60,
        interval=0.5,
    )
    fetches = node.status()["fetches"]
    assert [(f["source"], f["state"]) for f in fetches] == [
        ("pacs-get", "succeeded"),
        ("pacs", "succeeded"),
        ("pacs-web", "succeeded"),
    ]
    assert "ACC-MOVE" not in node.log() and str(first.PatientID) not in node.log()


@pytest.mark.slow
def test_a_missing_study_fails_a_source_down_or_refusing_is_retried(
    start_node, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    node = fetching_node(start_node, orthanc, tmp_path, ECHO_ALL_CT)
    one = real_series["lung-kernel"][:1]
    storescu(orthanc.dicom_port, one, calling_ae="TESTSCU", called_ae="ORTHANC")
    stranger = tmp_path / "stranger.yaml"  # an AE title Orthanc does not know: no C-MOVE
    settings = yaml.safe_load(node.config_path.read_text())
    settings["node"]["ae_title"] = "STRANGER"
    stranger.write_text(yaml.safe_dump(settings))
    study = str(pydicom.dcmread(one[0], stop_before_pixels=True).StudyInstanceUID)
    refused = subprocess.run(
        [sys.executable, "-m", "node", "fetch", "--config", str(stranger), "--from", "pacs",
         "--study", study],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "C-MOVE answered 0x" in refused.stderr, refused.stderr

    rc, out = fetch(node, "--from", "pacs-web", "--study", "1.2.3.4.5")
    assert rc == 1 and "failed" in out and "no study at pacs-web matches" in out
    rc, out = fetch(node, "--from", "down", "--accession", "A1")
    assert rc == 1 and "retrying" in out and "the running node retries it" in out
    fetches = {f["source"]: f for f in node.status()["fetches"]}
    assert fetches["down"]["state"] == "retrying"
    assert "no association with GONE" in fetches["down"]["error"]
    assert fetches["pacs-web"]["state"] == "failed"
    rc, out = fetch(node, "--from", "nowhere", "--study", "1.2.3")
    assert rc == 2 and "unknown source 'nowhere'" in out


PRIORS = """
rules:
  - name: chest-ct
    match: {Modality: CT, is_prior: false}
    pipelines: [echo]
    fetch_priors: {from: SOURCE, modality: CT, count: 1, within_days: 730}
  - name: priors-echo
    match: {is_prior: true, SeriesDescription: {regex: "never"}}
    pipelines: [echo]
"""


@pytest.mark.slow
@pytest.mark.parametrize("source", ["pacs-web", "pacs"])
def test_a_completed_study_fetches_its_most_recent_prior(
    start_node, orthanc: OrthancServer, real_series, tmp_path: Path, source: str
) -> None:
    node = fetching_node(start_node, orthanc, tmp_path, PRIORS.replace("SOURCE", source))
    files = real_series["covid"][:6]
    current_ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    year = int(current_ds.StudyDate[:4])
    prior = copy_as_study(files, tmp_path / "prior", f"{year - 1}0101", "ACC-PRIOR")
    older = copy_as_study(files, tmp_path / "older", f"{year - 2}0101", "ACC-OLDER")
    ancient = copy_as_study(files, tmp_path / "ancient", f"{year - 9}0101", "ACC-ANCIENT")
    storescu(
        orthanc.dicom_port,
        files + prior + older + ancient,
        calling_ae="TESTSCU",
        called_ae="ORTHANC",
    )

    storescu(node.port, files)  # the current study arrives
    fetched = wait_until(
        lambda: next((f for f in node.status()["fetches"] if f["state"] == "succeeded"), None),
        timeout=90,
        interval=0.5,
    )
    prior_uid = str(pydicom.dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID)
    assert fetched["studies"] == [prior_uid]  # the most recent of the two within 730 days
    assert fetched["prior_of"] == str(current_ds.StudyInstanceUID)
    studies = {s["study_instance_uid"]: s for s in node.status()["studies"]}
    assert studies[prior_uid]["prior_of"] == str(current_ds.StudyInstanceUID)
    assert studies[prior_uid]["instances"] == len(files)

    def settled() -> list[dict] | None:
        series = list(node.series().values())
        return series if all(s["state"] == "complete" and s["routed"] for s in series) else None

    wait_until(settled, timeout=60, interval=0.5)
    jobs = node.status()["jobs"]
    routed = {j["series_instance_uid"] for j in jobs}
    assert routed == {str(current_ds.SeriesInstanceUID)}  # the prior matched no rule
    assert len(node.status()["fetches"]) == 1  # asked once
    assert json.dumps(fetched["query"]).count("ACC") == 0
