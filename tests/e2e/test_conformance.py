"""A conformance matrix against `ainode serve`: DCMTK storescu and pynetdicom as SCUs, every
transfer syntax family the node accepts (converted with DCMTK from one real slice), and
maximum PDU sizes of 0 (the node's ceiling), 4 KiB, 16 KiB and 1 MiB on the node's side
against 4 KiB and 128 KiB on the sender's. Every instance is stored byte for byte."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID, generate_uid
from pynetdicom import AE

from tests.node.edge.test_scp import StartNode, stored_path
from tests.peers import DCMTK_ENV, NodeProcess, dcmtk

CONVERSIONS = {
    "implicit-le": ["dcmconv", "+ti"],
    "explicit-le": ["dcmconv", "+te"],
    "explicit-be": ["dcmconv", "+tb"],
    "deflated": ["dcmconv", "+td"],
    "jpeg-lossless": ["dcmcjpeg", "+e1"],
    "jpeg-ls": ["dcmcjpls", "+el"],
    "rle": ["dcmcrle"],
}
PROPOSE = {
    "implicit-le": "-xi",
    "explicit-le": "-xe",
    "explicit-be": "-xb",
    "deflated": "-xd",
    "jpeg-lossless": "-xs",
    "jpeg-ls": "-xt",
    "rle": "-xr",
}
"""storescu's option that proposes each syntax (it converts a file to what it proposes)."""


@pytest.fixture(scope="module")
def encodings(real_series: dict[str, list[Path]], tmp_path_factory) -> dict[str, Path]:
    """One real slice in each transfer syntax (from the implicit VR Lung-PET-CT-Dx file)."""
    folder = tmp_path_factory.mktemp("encodings")
    source = real_series["lung-kernel"][0]
    files = {}
    for name, (tool, *options) in CONVERSIONS.items():
        path = folder / f"{name}.dcm"
        subprocess.run(
            [dcmtk(tool), *options, str(source), str(path)],
            env=DCMTK_ENV,
            check=True,
            capture_output=True,
        )
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(path, enforce_file_format=True)
        files[name] = path
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in files.values()
    }
    assert len(syntaxes) == len(CONVERSIONS)
    return files


def send_with_storescu(port: int, encoding: str, path: Path, max_pdu: int) -> None:
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "AINODE", "-R", PROPOSE[encoding],
         "--max-pdu", str(max_pdu), "127.0.0.1", str(port), str(path)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def send_with_pynetdicom(port: int, files: list[Path], max_pdu: int) -> list[int]:
    ae = AE(ae_title="TESTSCU")
    ae.maximum_pdu_size = max_pdu
    datasets = [pydicom.dcmread(path) for path in files]
    for dataset in datasets:
        syntax = UID(dataset.file_meta.TransferSyntaxUID)
        ae.add_requested_context(dataset.SOPClassUID, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(dataset).Status) for dataset in datasets]
    finally:
        assoc.release()


@pytest.mark.slow
@pytest.mark.parametrize("node_pdu", [0, 4096, 16384, 1 << 20])
def test_every_syntax_and_pdu_size_is_stored_exactly(
    start_node: StartNode, encodings: dict[str, Path], node_pdu: int
) -> None:
    node = start_node(node={"max_pdu_size": node_pdu}, workers={"count": 0})
    files = list(encodings.values())
    for sender_pdu in (4096, 131072):
        for encoding, path in encodings.items():
            send_with_storescu(node.port, encoding, path, sender_pdu)
        assert_stored_as_sent(node, files)
        assert send_with_pynetdicom(node.port, files, sender_pdu) == [0] * len(files)
        assert_stored_as_sent(node, files)


def assert_stored_as_sent(node: NodeProcess, files: list[Path]) -> None:
    """Each file stored in its own transfer syntax with its pixel data unchanged; the stored
    copies are then removed for the next sender."""
    for path in files:
        stored = pydicom.dcmread(stored_path(node, path))
        sent = pydicom.dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert stored.PixelData == sent.PixelData, path.name
        stored_path(node, path).unlink()
