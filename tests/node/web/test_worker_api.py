"""The worker API and `ainode worker --node URL` against a real node (issue 26): a worker with
only the URL and a worker token runs a job whose SR reaches the PACS; the API refuses callers
without the role, malformed and oversized bodies, another worker's lease, and objects that are
not results of the job; a worker that stopped renewing loses its job to another, and only the
holder's result is recorded, once."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.work.protocol import Work
from tests.node.web.conftest import TOKENS, WebNode, trickled_until_closed
from tests.peers import ECHO_TO_PACS, free_port, storescp, storescu, wait_until
from tests.phantoms import chest, chest_geometry, write_series


def worker_node(
    start_web_node: Callable[..., WebNode], tmp_path: Path, **overrides: Any
) -> WebNode:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ECHO_TO_PACS)
    peers = {
        "modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": overrides.pop("pacs_port", 104)},
    }
    return start_web_node(
        peers=peers, routing={"rules_file": str(rules)},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2}, **overrides,
    )  # fmt: skip


def api(
    web: WebNode, method: str, path: str, token: str = "gpu-host", worker: str = "w1", **kwargs: Any
) -> requests.Response:
    headers = {**WebNode.auth(token), **kwargs.pop("headers", {})}
    return requests.request(
        method, f"{web.url}/api/v1/worker{path}", params={"worker": worker}, headers=headers,
        timeout=30, **kwargs,
    )  # fmt: skip


def claim(web: WebNode, token: str = "gpu-host", worker: str = "w1") -> requests.Response:
    body = {"worker": worker, "pipelines": ["echo"], "device": "cpu"}
    return api(web, "POST", "/claim", token, worker, json=body)


def a_job_waits(web: WebNode, tmp_path: Path) -> list[Path]:
    files = write_series(tmp_path / "ct", chest_geometry(), chest())
    storescu(web.node.port, files)
    wait_until(lambda: any(j["state"] == "queued" for j in web.node.status()["jobs"]), 60, 0.5)
    return files


def test_a_worker_with_only_the_url_and_a_token_sends_its_result_to_the_pacs(
    start_web_node: Callable[..., WebNode], tmp_path: Path
) -> None:
    pacs_port = free_port()
    web = worker_node(start_web_node, tmp_path, workers={"count": 0}, pacs_port=pacs_port)
    received = tmp_path / "pacs"
    env = {**os.environ, "AINODE_WORKER_TOKEN": TOKENS["gpu-host"][0]}
    env.pop("AINODE_CONFIG", None)
    log = (tmp_path / "worker.log").open("wb")
    remote = subprocess.Popen(
        [sys.executable, "-m", "node", "worker", "--node", web.url, "--name", "gpu-1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        files = write_series(tmp_path / "ct", chest_geometry(), chest())
        with storescp(pacs_port, received):
            storescu(web.node.port, files)
            wait_until(lambda: len(list(received.iterdir())) == 1, timeout=120, interval=0.5)
        (sr,) = [pydicom.dcmread(path) for path in received.iterdir()]
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert sr.Modality == "SR" and sr.ContributingEquipmentSequence[0].StationName == "AINODE"
        assert evidence[0].SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
        (job,) = web.node.status()["jobs"]
        assert job["state"] == "succeeded" and job["attempts"] == 1
        (seen,) = web.node.status()["remote_workers"]
        assert seen["owner"] == "gpu-host/gpu-1" and seen["device"] == "cpu"
        assert set(seen["pipelines"]) == {"echo", "lung-quant"} and seen["job"] is None
        audit = web.node.cli("audit", "list", "--json").stdout
        assert "gpu-host/gpu-1" in audit and "worker-secret" not in audit
    finally:
        remote.send_signal(signal.SIGTERM)
        assert remote.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()


def test_callers_without_the_worker_role_and_malformed_claims_are_refused(
    start_web_node: Callable[..., WebNode], tmp_path: Path
) -> None:
    web = worker_node(start_web_node, tmp_path, workers={"count": 0})
    body = {"worker": "w1", "pipelines": ["echo"]}
    anonymous = requests.post(f"{web.url}/api/v1/worker/claim", json=body, timeout=30)
    assert anonymous.status_code == 401
    for role in ("viewer", "modality-web", "records-clerk"):
        assert claim(web, token=role).status_code == 403
    malformed: list[Any] = [
        {"worker": "../etc", "pipelines": ["echo"]},
        {"worker": "w" * 33, "pipelines": ["echo"]},
        {"worker": "w1", "pipelines": []},
        {"worker": "w1", "pipelines": ["echo"], "extra": 1},
        {"worker": "w1", "pipelines": ["x" * 10_000]},
        ["not", "an", "object"],
    ]
    for bad in malformed:
        assert api(web, "POST", "/claim", json=bad).status_code == 422, bad
    assert (
        api(
            web, "POST", "/claim", data=b"{", headers={"Content-Type": "application/json"}
        ).status_code
        == 422
    )
    assert claim(web).status_code == 204  # nothing queued
    for path in ("/jobs/1/lease", "/jobs/99999/lease"):
        assert api(web, "PUT", path).status_code == 409
    assert api(web, "PUT", f"/jobs/{2**64}/lease").status_code == 422
    assert api(web, "PUT", "/jobs/1/lease", worker="a b").status_code == 422


def test_a_lease_is_its_holder_s_and_an_upload_must_be_a_result_of_the_job(
    start_web_node: Callable[..., WebNode], tmp_path: Path
) -> None:
    web = worker_node(start_web_node, tmp_path, workers={"count": 0})
    files = a_job_waits(web, tmp_path)
    taken = claim(web)
    assert taken.status_code == 200
    work = Work.model_validate_json(taken.content)
    assert work.pipeline == "echo" and len(work.instances) == len(files)
    assert claim(web, worker="w2").status_code == 204  # the only job is leased
    listed = requests.get(f"{web.url}/api/v1/workers", headers=WebNode.auth("viewer"), timeout=30)
    assert sorted((w["owner"], w["pipelines"], w["device"], w["job"]) for w in listed.json()) == [
        ("gpu-host/w1", ["echo"], "cpu", work.job),
        ("gpu-host/w2", ["echo"], "cpu", None),
    ]

    job = work.job
    for token, worker in (("gpu-host", "w2"), ("other-gpu-host", "w1")):
        assert api(web, "PUT", f"/jobs/{job}/lease", token, worker).status_code == 409
        failure = {"detail": "not mine", "permanent": True}
        assert (
            api(web, "POST", f"/jobs/{job}/failure", token, worker, json=failure).status_code == 409
        )
        assert (
            api(
                web, "PUT", f"/jobs/{job}/objects", token, worker, data=b"x", headers=dicom()
            ).status_code
            == 409
        )
    assert api(web, "PUT", f"/jobs/{job}/lease").status_code == 204

    upload = lambda data, **kw: api(web, "PUT", f"/jobs/{job}/objects", data=data, **kw)  # noqa: E731
    assert (
        upload(files[0].read_bytes(), headers={"Content-Type": "application/json"}).status_code
        == 415
    )
    assert upload(b"\0" * 200 + b"garbage", headers=dicom()).status_code == 400
    image = upload(files[0].read_bytes(), headers=dicom())  # an image, not a result
    assert image.status_code == 422 and "not a result" in image.json()["detail"]
    assert (
        upload(sr_of(files, tmp_path, study="1.2.3.4").read_bytes(), headers=dicom()).status_code
        == 422
    )
    assert (
        upload(sr_of(files, tmp_path, series="1.2.3.5").read_bytes(), headers=dicom()).status_code
        == 422
    )
    oversized = declared_too_big(web, f"/api/v1/worker/jobs/{job}/objects?worker=w1")
    assert oversized == 413

    summary = {"pipeline": "echo", "version": "1", "positive": False}
    unknown = {"summary": summary, "objects": ["1.2.3.999"]}
    assert api(web, "POST", f"/jobs/{job}/result", json=unknown).status_code == 422
    assert api(web, "POST", f"/jobs/{job}/result", json={"summary": {}}).status_code == 422
    huge = {"summary": summary, "objects": [], "embedding": [0.5] * 3_000_000}
    assert api(web, "POST", f"/jobs/{job}/result", json=huge).status_code == 413

    stored = upload(sr_of(files, tmp_path).read_bytes(), headers=dicom())
    assert stored.status_code == 201, stored.text
    done = {"summary": summary, "objects": [stored.json()["sop_instance_uid"]]}
    assert (
        api(web, "POST", f"/jobs/{job}/result", "other-gpu-host", "w1", json=done).status_code
        == 409
    )
    assert api(web, "POST", f"/jobs/{job}/result", json=done).status_code == 200
    assert api(web, "POST", f"/jobs/{job}/result", json=done).status_code == 409  # once
    (row,) = web.node.status()["jobs"]
    assert row["state"] == "succeeded"
    assert [d["job_id"] for d in web.node.status()["dispatches"]] == [job]
    assert "worker-secret" not in web.node.log()


def test_a_foreign_host_and_a_trickling_upload_reach_no_lease(
    start_web_node: Callable[..., WebNode], tmp_path: Path
) -> None:
    """DNS rebinding claims nothing (400 for a Host that is not the node); an upload that
    trickles below node.min_transfer_kbps is cut and stores nothing, and its worker still
    holds the job; a result declared over its limit is refused before it is read."""
    web = worker_node(
        start_web_node, tmp_path, workers={"count": 0},
        http_extra={"body_idle_seconds": 1}, node={"min_transfer_kbps": 1},
    )  # fmt: skip
    files = a_job_waits(web, tmp_path)
    rebound = api(web, "POST", "/claim", json={"worker": "w1", "pipelines": ["echo"]},
                  headers={"Host": "evil.example"})  # fmt: skip
    assert rebound.status_code == 400
    assert claim(web, worker="w2").status_code == 200  # the job was still there to claim
    job = web.node.status()["jobs"][0]["id"]

    sr = sr_of(files, tmp_path).read_bytes()
    port = web.node.settings["http"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(
            f"PUT /api/v1/worker/jobs/{job}/objects?worker=w2 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKENS['gpu-host'][0]}\r\n"
            f"Content-Type: application/dicom\r\nContent-Length: {len(sr)}\r\n\r\n".encode()
            + sr[:256]
        )
        closed = trickled_until_closed(sock, sr[256:316])
        assert closed, "the node kept reading an upload that trickled"
    assert "below node.min_transfer_kbps" in web.node.log()
    assert api(web, "PUT", f"/jobs/{job}/lease", worker="w2").status_code == 204
    assert declared_too_big(web, f"/api/v1/worker/jobs/{job}/result?worker=w2", "POST") == 413
    stored = api(web, "PUT", f"/jobs/{job}/objects", worker="w2", data=sr, headers=dicom())
    assert stored.status_code == 201, stored.text


@pytest.mark.slow
def test_a_worker_that_stops_renewing_loses_the_job_and_only_the_holder_records_it(
    start_web_node: Callable[..., WebNode], tmp_path: Path
) -> None:
    from node.config import Settings
    from node.work.remote import NodeClient, RemoteWorker
    from pipelines.registry import build_pipelines

    web = worker_node(start_web_node, tmp_path, workers={"count": 0, "lease_seconds": 3})
    a_job_waits(web, tmp_path)
    stalled = Work.model_validate_json(claim(web, worker="stalled").content)
    client = NodeClient(web.url, TOKENS["other-gpu-host"][0], "taker")
    taken = wait_until(lambda: client.claim(["echo"], "cpu"), timeout=60, interval=0.5)
    assert taken.job == stalled.job and taken.attempt == 2  # its lease ran out
    assert api(web, "PUT", f"/jobs/{stalled.job}/lease", worker="stalled").status_code == 409

    settings = Settings.model_validate({"node": {"accept_unknown_peers": True}})
    RemoteWorker(client, settings, build_pipelines(None), "cpu").run_job(taken)
    (job,) = web.node.status()["jobs"]
    assert job["state"] == "succeeded" and job["attempts"] == 2
    summary = {"pipeline": "echo", "version": "1", "positive": False}
    late = {"summary": summary, "objects": [sr_uid(web, job["id"])]}
    answer = api(web, "POST", f"/jobs/{stalled.job}/result", worker="stalled", json=late)
    assert answer.status_code == 409
    assert [d["job_id"] for d in web.node.status()["dispatches"]] == [stalled.job]


def sr_uid(web: WebNode, job_id: int) -> str:
    """The SOP Instance UID of the SR a job's result names."""
    from sqlalchemy import select

    from node.store.db.engine import make_engine
    from node.store.db.models import Job

    engine = make_engine(web.node.settings["database"]["url"])
    try:
        with engine.connect() as conn:
            result = conn.execute(select(Job.result).where(Job.id == job_id)).scalar_one()
    finally:
        engine.dispose()
    objects = [pydicom.dcmread(web.node.storage / f) for f in json.loads(result)["files"]]
    return str(next(o.SOPInstanceUID for o in objects if o.Modality == "SR"))


def sr_of(files: list[Path], tmp_path: Path, study: str = "", series: str = "") -> Path:
    """A Comprehensive SR of the series in `files` (or naming another study, or referencing
    another series), as a worker would upload."""
    image = pydicom.dcmread(files[0], stop_before_pixels=True)
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID = study or image.StudyInstanceUID
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.PatientID = image.PatientID
    sr.PatientName = image.PatientName
    reference = Dataset()
    reference.SeriesInstanceUID = series or image.SeriesInstanceUID
    reference.ReferencedSOPSequence = []
    evidence = Dataset()
    evidence.StudyInstanceUID = sr.StudyInstanceUID
    evidence.ReferencedSeriesSequence = [reference]
    sr.CurrentRequestedProcedureEvidenceSequence = [evidence]
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    path = tmp_path / f"sr-{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def declared_too_big(web: WebNode, path: str, method: str = "PUT") -> int:
    """The status answered to a body declared one byte past the object limit, of which only
    1 KiB is sent: refused on the declaration, not after reading 256 MiB."""
    port = web.node.settings["http"]["port"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path)
        for name, value in {**WebNode.auth("gpu-host"), **dicom()}.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str((256 << 20) + 1))
        connection.endheaders(b"x" * 1024)
        return connection.getresponse().status
    finally:
        connection.close()


def dicom() -> dict[str, str]:
    return {"Content-Type": "application/dicom"}
