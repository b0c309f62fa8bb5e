"""STOW-RS into a real node: dicomweb-client and curl, good bodies and broken ones. What is
acknowledged is stored and recorded as over C-STORE; a broken body gets a 4xx and leaves no
partial instance behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import WebNode
from tests.peers import REAL_SERIES, wait_until

BOUNDARY = "a1b2c3"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def part10(dataset: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def body(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    chunks = [
        f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    ]
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


@dataclass
class Answer:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def post(web: WebNode, content: bytes, path: str = "/studies", **headers: str) -> Answer:
    """POST with curl, as a PACS administrator would try the node."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    sent = {"Content-Type": CONTENT_TYPE, **web.auth("modality-web"), **headers}
    header_args = [arg for name, value in sent.items() for arg in ("-H", f"{name}: {value}")]
    with tempfile.TemporaryDirectory() as folder:
        body_file, answer_file = Path(folder) / "body", Path(folder) / "answer"
        body_file.write_bytes(content)
        done = subprocess.run(
            ["curl", "-sS", "-o", str(answer_file), "-w", "%{http_code}", "-X", "POST",
             "--data-binary", f"@{body_file}", *header_args, f"{web.dicomweb}{path}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return Answer(int(done.stdout), answer_file.read_text(errors="replace"))


def stored_files(web: WebNode) -> list[Path]:
    return sorted(web.node.storage.rglob("*.dcm"))


def real_files(count: int) -> list[Path]:
    folder = REAL_SERIES["covid"]
    if not folder.exists():
        pytest.skip("real data (../shared/data) is absent")
    return sorted(folder.iterdir())[:count]


def test_dicomweb_client_stores_a_real_series_like_c_store(web_node: WebNode) -> None:
    files = real_files(12)
    client = DICOMwebClient(web_node.dicomweb, headers=web_node.auth("modality-web"))
    report = client.store_instances([pydicom.dcmread(f) for f in files])

    assert len(report.ReferencedSOPSequence) == len(files)
    assert "FailedSOPSequence" not in report
    assert report.RetrieveURL.startswith(f"{web_node.dicomweb}/studies/")
    stored = stored_files(web_node)
    assert len(stored) == len(files)
    # the dataset as sent, byte for byte, under the node's own file meta
    original = files[0].read_bytes()
    sop_uid = pydicom.dcmread(files[0]).SOPInstanceUID
    kept = next(p for p in stored if p.stem == sop_uid).read_bytes()
    assert kept.endswith(original[-4096:])
    series = wait_until(
        lambda: next(
            (s for s in web_node.node.series().values() if s["state"] == "complete"), None
        ),
        timeout=30,
    )  # the request's clean end released the series: no quiet period needed
    assert series["instances"] == len(files)
    assert series["calling_ae"] == "modality-web"


def test_each_instance_gets_its_own_status(web_node: WebNode, tmp_path: Path) -> None:
    good = ct_dataset(generate_uid())
    study = good.StudyInstanceUID
    bad_uid = ct_dataset(generate_uid(), study_uid=study)
    bad_uid.SeriesInstanceUID = "1.2.abc"
    other_study = ct_dataset(generate_uid())
    response = post(
        web_node,
        body(part10(good), b"not dicom at all", part10(bad_uid), part10(other_study)),
        path=f"/studies/{study}",
    )
    assert response.status_code == 202, response.text
    report = pydicom.Dataset.from_json(response.json())
    assert [item.ReferencedSOPInstanceUID for item in report.ReferencedSOPSequence] == [
        good.SOPInstanceUID
    ]
    reasons = [item.FailureReason for item in report.FailedSOPSequence]
    assert reasons == [0xC000, 0xC001, 0xC409]
    assert [p.stem for p in stored_files(web_node)] == [good.SOPInstanceUID]

    everything_failed = post(web_node, body(b"\0" * 300), Accept="application/dicom+xml")
    assert everything_failed.status_code == 409
    xml = ElementTree.fromstring(everything_failed.text)  # the Native DICOM Model, as asked
    reason = xml.find(".//{*}DicomAttribute[@keyword='FailureReason']/{*}Value")
    assert reason is not None and int(reason.text) == 0xC000
    assert "no DICM prefix" in web_node.node.log()


def test_broken_bodies_get_a_4xx_and_leave_nothing_half_stored(
    start_web_node, tmp_path: Path
) -> None:
    web = start_web_node(workers={"count": 0})
    first, second = ct_dataset(generate_uid()), ct_dataset(generate_uid())
    whole = body(part10(first), part10(second))

    wrong_type = post(web, whole, **{"Content-Type": "application/dicom"})
    assert wrong_type.status_code == 415 and "multipart/related" in wrong_type.json()["detail"]
    no_boundary = post(
        web, whole, **{"Content-Type": 'multipart/related; type="application/dicom"'}
    )
    assert no_boundary.status_code == 400
    other_part_type = post(
        web, whole, **{"Content-Type": f"multipart/related; type=image/jpeg; boundary={BOUNDARY}"}
    )
    assert other_part_type.status_code == 415
    empty = post(web, b"")
    assert empty.status_code == 400
    assert stored_files(web) == []

    cut = whole[: len(whole) - len(part10(second)) // 2]  # inside the second instance
    truncated = post(web, cut)
    assert truncated.status_code == 400
    assert "closing multipart boundary" in truncated.json()["detail"]
    assert [p.stem for p in stored_files(web)] == [first.SOPInstanceUID]  # whole ones only
    assert not list(web.node.storage.rglob("*.tmp*"))

    again = post(web, whole)  # the node goes on serving; the re-send completes the study
    assert again.status_code == 200
    assert len(stored_files(web)) == 2


def test_a_body_over_the_limit_is_refused_without_reading_it(start_web_node) -> None:
    web = start_web_node(workers={"count": 0})
    web.node.stop()
    web.node.settings["http"]["max_request_mb"] = 1
    web.node.start()
    big = ct_dataset(generate_uid())
    big.Rows = big.Columns = 1024
    big.PixelData = b"\0" * (1024 * 1024 * 2)
    response = post(web, body(part10(big)))
    assert response.status_code == 413
    assert stored_files(web) == []


def test_a_stow_request_is_routed_with_its_source(web_node: WebNode) -> None:
    ds = ct_dataset(generate_uid())
    assert post(web_node, body(part10(ds))).status_code == 200
    rows = web_node.node.series()
    assert [s["source"] for s in rows.values()] == ["dicomweb"]


def test_stow_never_replaces_what_a_scanner_sent(web_node: WebNode) -> None:
    """A real JPEG Lossless instance received by C-STORE: the same instance posted again
    decompressed is a duplicate (200, nothing rewritten); posted with other attributes it is
    refused with 0x0111 and the stored file stays; the audit trail says which."""
    import hashlib

    from tests.node.edge.test_scp import received_events, stored_path
    from tests.peers import storescu

    (scanned,) = real_files(1)
    storescu(web_node.node.port, [scanned])
    stored = stored_path(web_node.node, scanned)
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    decompressed = pydicom.dcmread(scanned)
    decompressed.decompress(generate_instance_uid=False)
    assert post(web_node, body(part10(decompressed))).status_code == 200
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    forged = pydicom.dcmread(scanned)
    forged.PatientName = "Someone^Else"
    refused = post(web_node, body(part10(forged)))
    assert refused.status_code == 409
    (failure,) = refused.json()["00081198"]["Value"]
    assert failure["00081197"]["Value"] == [0x0111]
    assert failure["00081155"]["Value"] == [forged.SOPInstanceUID]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    events = wait_until(
        lambda: len(received_events(web_node.node)) == 3 and received_events(web_node.node), 10
    )
    by_source = {(e["source"], e["duplicates"], tuple(e["conflicts"])) for e in events}
    assert by_source == {
        ("dimse", 0, ()),
        ("dicomweb", 1, ()),
        ("dicomweb", 0, (forged.SOPInstanceUID,)),
    }
