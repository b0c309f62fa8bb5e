"""C-STORE SCU against DCMTK storescp: plain, over TLS with the peer's CA, and refused when the
certificate cannot be verified."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)
from pynetdicom import AE

from node.config import Peer
from node.edge.scu import associate, store
from tests.peers import free_port, storescp


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    files = {
        name: folder / name
        for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "ext.cnf")
    }
    files["ext.cnf"].write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )
    return files


@pytest.fixture
def results(real_series, tmp_path: Path) -> list[Path]:
    """Two real CT slices to send."""
    return real_series["lung-kernel"][:2]


def test_store_sends_every_file(results: list[Path], tmp_path: Path) -> None:
    port = free_port()
    with storescp(port, tmp_path / "out"):
        outcome = store("AINODE", Peer(ae_title="PACS", host="127.0.0.1", port=port), results)
    assert outcome.ok and outcome.detail == "2 of 2 stored"
    received = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "out").iterdir()}
    assert received == {pydicom.dcmread(p).SOPInstanceUID for p in results}


def test_store_over_tls_verifies_the_peer(results: list[Path], tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    port = free_port()
    tls = ("+tls", str(certs["server.key"]), str(certs["server.pem"]), "-ic")
    peer = Peer.model_validate(
        {
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": port,
            "tls": {"ca_file": str(certs["ca.pem"])},
        }
    )
    stranger = Peer.model_validate(
        {
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": port,
            "tls": {"ca_file": str(certs["server.pem"])},
        }  # not the CA that signed the server
    )
    with storescp(port, tmp_path / "out", *tls):
        trusted = store("AINODE", peer, results)
        refused = store("AINODE", stranger, results, timeout=5)
    assert trusted.ok, trusted.detail
    assert not refused.ok and "no association with PACS@127.0.0.1" in refused.detail
    assert len(list((tmp_path / "out").iterdir())) == 2


@pytest.mark.parametrize("accepts_deflate", [True, False])
def test_a_deflated_object_goes_as_stored_or_inflated(
    results: list[Path], tmp_path: Path, accepts_deflate: bool
) -> None:
    """The node's SEG is stored deflated: a peer that takes Deflate gets it so, one that does
    not (storescp's default) gets the same dataset in Explicit VR Little Endian."""
    dataset = pydicom.dcmread(results[0])
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    dataset.save_as(deflated, enforce_file_format=True)
    port = free_port()
    options = ("+xd",) if accepts_deflate else ()
    with storescp(port, tmp_path / "out", *options):
        outcome = store("AINODE", Peer(ae_title="PACS", host="127.0.0.1", port=port), [deflated])
    assert outcome.ok, outcome.detail
    (received,) = [pydicom.dcmread(p) for p in (tmp_path / "out").iterdir()]
    expected = DeflatedExplicitVRLittleEndian if accepts_deflate else ExplicitVRLittleEndian
    assert received.file_meta.TransferSyntaxUID == expected
    assert received == pydicom.dcmread(deflated)  # the dataset itself, element for element


def test_structured_reports_go_first(results: list[Path], tmp_path: Path) -> None:
    """The SR is small and what a viewer opens first: it is sent before the images."""
    report = pydicom.dcmread(results[1])
    report.Modality = "SR"
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = Comprehensive3DSRStorage
    report_path = tmp_path / "sr.dcm"
    report.save_as(report_path)
    port = free_port()
    with storescp(port, tmp_path / "out"):
        outcome = store(
            "AINODE", Peer(ae_title="PACS", host="127.0.0.1", port=port), [results[0], report_path]
        )
    assert outcome.ok, outcome.detail
    assert outcome.stored == (report.SOPInstanceUID, pydicom.dcmread(results[0]).SOPInstanceUID)


class LateCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint as a loaded machine runs it: after a wait that did not
    block, the reactor thread is preempted for 50 ms, so a sender that pauses it reads the
    flag the reactor set before the wait and sends while the reactor is about to poll."""

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        time.sleep(0.05)
        return passed


def test_a_reactor_slow_to_pause_leaves_every_response_to_the_sender(
    results: list[Path], tmp_path: Path
) -> None:
    """The race behind a dispatch that waited out its DIMSE timeout on a loaded machine: the
    reactor took the C-STORE response ("Received unexpected C-STORE service message"). Both
    threads are preempted where a loaded machine did: the reactor after its checkpoint, the
    sender between sending and waiting for the response."""
    port = free_port()
    ae = AE(ae_title="AINODE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(pydicom.dcmread(results[0]).SOPClassUID, ExplicitVRLittleEndian)
    with storescp(port, tmp_path / "received"):
        assoc = associate(ae, Peer(ae_title="PACS", host="127.0.0.1", port=port))
        assert not isinstance(assoc, str), assoc
        assoc._reactor_checkpoint = LateCheckpoint()
        assoc._reactor_checkpoint.set()
        send = assoc.dimse.send_msg

        def send_then_stall(*args: Any) -> None:
            send(*args)
            time.sleep(0.1)

        assoc.dimse.send_msg = send_then_stall
        try:
            statuses = [
                assoc.send_c_store(pydicom.dcmread(path)).get("Status") for path in results * 2
            ]
        finally:
            assoc.release()
    assert statuses == [0x0000] * 4
