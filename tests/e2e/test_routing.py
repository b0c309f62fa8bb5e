"""Routing, queue and workers inside a real `ainode serve`, fed by DCMTK storescu."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.dicom_checks import dciodvfy_errors
from tests.peers import NodeProcess, storescu, wait_until

ECHO_LUNG_KERNEL = """
rules:
  - name: lung-kernel
    match: {Modality: CT, ConvolutionKernel: {regex: "^L$"}}
    pipelines: [echo]
    destinations: [origin]
"""
ECHO_BODY_KERNEL = ECHO_LUNG_KERNEL.replace('"^L$"', '"^B$"').replace("lung-kernel", "body")


def uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def jobs_of(node: NodeProcess, series_uid: str) -> list[dict]:
    return [j for j in node.status()["jobs"] if j["series_instance_uid"] == series_uid]


def finished_job(node: NodeProcess, series_uid: str) -> dict | None:
    jobs = jobs_of(node, series_uid)
    return jobs[0] if jobs and jobs[0]["state"] == "succeeded" else None


@pytest.mark.slow
def test_routed_series_runs_its_pipeline_and_the_other_does_not(
    start_node: Callable[..., NodeProcess], real_series: dict[str, list[Path]], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ECHO_LUNG_KERNEL)
    node = start_node(routing={"rules_file": str(rules)})
    lung, body = real_series["lung-kernel"], real_series["body-kernel"]
    storescu(node.port, lung + body)
    job = wait_until(lambda: finished_job(node, uid_of(lung)), timeout=30, interval=0.5)
    assert job["pipeline"] == "echo"
    assert job["destinations"] == ["origin"]
    geometry = {
        m["concept"]["value"]: m["value"] for m in job["result"]["regions"][0]["measurements"]
    }
    assert geometry == {"SLICES": 64.0, "112226": 5.0, "EXTENT": 315.0}
    assert jobs_of(node, uid_of(body)) == []
    series = node.series()[uid_of(body)]
    assert series["state"] == "complete"

    explain = node.cli("rules", "explain", "--series", uid_of(body))
    assert explain.returncode == 0, explain.stderr
    assert "[no ] ConvolutionKernel regex '^L$'  (actual: 'B')" in explain.stdout
    assert "jobs at series completion: none" in explain.stdout

    job_id = str(job["id"])
    retried = subprocess.run(
        [sys.executable, "-m", "node", "jobs", "retry", "--config", str(node.config_path), job_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert retried.returncode == 0, retried.stdout
    rerun = wait_until(lambda: finished_job(node, uid_of(lung)), timeout=30, interval=0.5)
    assert rerun["id"] == job["id"] and rerun["attempts"] == 2  # the count goes on
    cancelled = subprocess.run(
        [sys.executable, "-m", "node", "jobs", "cancel", "--config", str(node.config_path), job_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cancelled.returncode == 1  # a finished job cannot be cancelled
    assert f"job {job_id} has finished" in cancelled.stderr


@pytest.mark.slow
def test_rules_reload_on_change_and_a_broken_file_keeps_the_last_good_rules(
    start_node: Callable[..., NodeProcess], real_series: dict[str, list[Path]], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ECHO_LUNG_KERNEL)
    node = start_node(routing={"rules_file": str(rules)})
    lung, body = real_series["lung-kernel"], real_series["body-kernel"]

    rules.write_text(ECHO_BODY_KERNEL)
    storescu(node.port, body)
    wait_until(lambda: finished_job(node, uid_of(body)), timeout=30, interval=0.5)

    rules.write_text(ECHO_BODY_KERNEL + "  - name: broken\n    match: {Modalty: CT}\n")
    time.sleep(0.5)
    status = node.status()
    assert "unknown DICOM keyword 'Modalty'" in status["rules"]["error"]
    storescu(node.port, lung)
    wait_until(lambda: node.series().get(uid_of(lung), {}).get("state") == "complete", 15)
    time.sleep(1.5)  # routing runs on the next sweep
    assert jobs_of(node, uid_of(lung)) == []  # the body-kernel rules are still in force
    assert "keeping the last good ones" in node.log()
    text = node.cli("status")
    assert "routing rules INVALID" in text.stdout


@pytest.mark.slow
def test_the_sr_lists_the_other_reconstructions_of_the_acquisition_as_evidence(
    start_node: Callable[..., NodeProcess], real_series: dict[str, list[Path]], tmp_path: Path
) -> None:
    """Issue 29: two reconstructions of one acquisition (Lung-PET-CT-Dx A0001, lung and body
    kernels): the result of the one processed names the other in words and lists each of its
    images as evidence; a series of another study is no sibling."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(ECHO_LUNG_KERNEL)
    node = start_node(routing={"rules_file": str(rules)})
    lung, body, other = real_series["lung-kernel"], real_series["body-kernel"], real_series["cap"]
    storescu(node.port, body + other)
    wait_until(
        lambda: all(node.series()[uid_of(s)]["state"] == "complete" for s in (body, other)),
        timeout=60,
        interval=0.5,
    )
    storescu(node.port, lung)
    job = wait_until(lambda: finished_job(node, uid_of(lung)), timeout=60, interval=0.5)

    (sr_path,) = [node.storage / path for path in job["result"]["files"]]
    sr = pydicom.dcmread(sr_path)
    evidence = {
        series.SeriesInstanceUID: {
            item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence
        }
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    body_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in body}
    assert evidence[uid_of(body)] == body_uids
    assert uid_of(other) not in evidence
    notes = [
        item.TextValue
        for item in sr.ContentSequence[-1].ContentSequence
        if item.ValueType == "TEXT" and "Other reconstructions" in item.TextValue
    ]
    kernel = pydicom.dcmread(body[0], stop_before_pixels=True).ConvolutionKernel
    assert len(notes) == 1 and f"kernel {kernel}" in notes[0], notes
    assert f"({len(body)} images)" in notes[0]
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(sr_path) == []
