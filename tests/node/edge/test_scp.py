"""The storage SCP as a real server (`ainode serve`), fed by DCMTK storescu and pynetdicom."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests.peers import DCMTK_ENV, NodeProcess, dcmtk, storescu, wait_until

StartNode = Callable[..., NodeProcess]


def assert_same_dataset(sent: Path, stored: Path) -> None:
    """Element by element (DCMTK may re-encode sequence lengths in transit)."""
    original = pydicom.dcmread(sent)
    received = pydicom.dcmread(stored)
    assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert received.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert list(received.keys()) == list(original.keys())
    for element in original:
        assert received[element.tag] == element, f"{sent.name}: {element.tag} differs"


def stored_path(node: NodeProcess, source: Path) -> Path:
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def ct_dataset(sop_uid: str, study_uid: str | None = None) -> Dataset:
    """A small CT image that pynetdicom sends without checking its UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "Test^Phantom"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    return ds


def phantom_file(folder: Path, name: str = "one.dcm") -> Path:
    """A small CT image written as a Part 10 file."""
    path = folder / name
    ct_dataset(generate_uid()).save_as(path, enforce_file_format=True)
    return path


def send_with_pynetdicom(port: int, dataset: Dataset, folder: Path) -> int:
    """C-STORE one dataset whose own UIDs may be broken, as real senders do: the command's
    Affected SOP Instance UID is valid, the dataset's is whatever it is."""
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.preamble = b"\0" * 128
    path = folder / "outgoing.dcm"
    dataset.save_as(path, enforce_file_format=False)
    return send_raw_file(port, path)


def send_raw_file(port: int, path: Path) -> int:
    """C-STORE a file as TESTSCU without pynetdicom decoding it; the node's status code.

    Chunked sending takes the command's UIDs from the file meta and streams the rest as is.
    """
    saved = (_config.ENFORCE_UID_CONFORMANCE, _config.STORE_SEND_CHUNKED_DATASET)
    _config.ENFORCE_UID_CONFORMANCE, _config.STORE_SEND_CHUNKED_DATASET = False, True
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        try:
            response = assoc.send_c_store(path)
        finally:
            assoc.release()
        return int(response.Status)
    finally:
        _config.ENFORCE_UID_CONFORMANCE, _config.STORE_SEND_CHUNKED_DATASET = saved


@pytest.mark.slow
def test_real_series_stored_exactly_and_complete_soon_after_release(
    start_node: StartNode, real_series: dict[str, list[Path]], database_url: str
) -> None:
    node = start_node(database_url)
    files = real_series["covid"] + real_series["lung-kernel"]  # JPEG Lossless + Implicit VR
    storescu(node.port, files)
    released = time.monotonic()
    expected = {
        series_uid(real_series["covid"][0]): 148,
        series_uid(real_series["lung-kernel"][0]): 64,
    }

    def all_complete() -> bool:
        series = node.series()
        return all(series.get(uid, {}).get("state") == "complete" for uid in expected)

    wait_until(all_complete, timeout=10, interval=0.05)
    assert time.monotonic() - released < 2.0, "complete within 2 s of the release"
    for path in files:
        assert_same_dataset(path, stored_path(node, path))
    status = node.status()
    by_uid = {s["series_instance_uid"]: s for s in status["series"]}
    for uid, count in expected.items():
        assert by_uid[uid]["instances"] == count
        assert by_uid[uid]["state"] == "complete"
        assert by_uid[uid]["modality"] == "CT"
        assert by_uid[uid]["calling_ae"] == "STORESCU"
    assert not list((node.storage / ".incoming").iterdir())


@pytest.mark.slow
def test_four_parallel_associations_store_every_series(
    start_node: StartNode, real_series: dict[str, list[Path]]
) -> None:
    node = start_node()
    batches = [real_series[name] for name in ("covid", "cap", "normal", "body-kernel")]
    errors: list[BaseException] = []

    def send(files: list[Path]) -> None:
        try:
            storescu(node.port, files)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(files,)) for files in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    expected = {series_uid(files[0]): len(files) for files in batches}

    def counts() -> dict[str, int] | None:
        series = node.series()
        done = all(series.get(uid, {}).get("state") == "complete" for uid in expected)
        return {uid: series[uid]["instances"] for uid in expected} if done else None

    assert wait_until(counts, timeout=15) == expected
    for files in batches:
        for path in files[:: max(1, len(files) // 10)]:
            assert_same_dataset(path, stored_path(node, path))


def test_unknown_calling_ae_is_rejected_at_association(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    phantom = phantom_file(tmp_path)
    result = storescu(node.port, [phantom], calling_ae="INTRUDER", check=False)
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr + result.stdout
    assert echo(node.port, calling="INTRUDER").returncode != 0
    assert node.series() == {}
    known = echo(node.port)
    assert known.returncode == 0, known.stderr


@pytest.mark.parametrize(
    ("sop_uid", "study_uid"),
    [
        ("", None),  # empty SOP Instance UID: real files like this exist
        ("1.2.3.abc", None),
        (None, "../../../../tmp/escape"),
    ],
)
def test_invalid_uids_get_an_error_status_and_nothing_is_stored(
    start_node: StartNode, sop_uid: str | None, study_uid: str | None, tmp_path: Path
) -> None:
    node = start_node()
    dataset = ct_dataset(sop_uid if sop_uid is not None else generate_uid(), study_uid)
    status = send_with_pynetdicom(node.port, dataset, tmp_path)
    assert status == 0xC001
    assert list(node.storage.rglob("*.dcm")) == []
    assert not (node.storage.parent / "tmp").exists()
    assert not Path("/tmp/escape").exists()
    assert node.series() == {}
    assert "instance refused" in node.log()


def test_unparseable_dataset_gets_cannot_understand(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node()
    dataset = ct_dataset(generate_uid())
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.preamble = b"\0" * 128
    path = tmp_path / "broken.dcm"
    dataset.save_as(path, enforce_file_format=False)
    # An element (0010,0010) claiming 4 GB of value: no parser can read past it.
    path.write_bytes(path.read_bytes() + b"\x10\x00\x10\x00PN\xff\xff")
    assert send_raw_file(node.port, path) == 0xC000
    assert list(node.storage.rglob("*.dcm")) == []
    assert "dataset refused" in node.log()


def test_duplicate_instance_is_idempotent(
    start_node: StartNode, real_series: dict[str, list[Path]]
) -> None:
    node = start_node()
    files = real_series["lung-kernel"][:5]
    storescu(node.port, files)
    first = {p: stored_path(node, p).stat().st_mtime_ns for p in files}
    storescu(node.port, files)
    uid = series_uid(files[0])
    series = wait_until(
        lambda: node.series().get(uid, {}).get("state") == "complete" and node.series()[uid], 10
    )
    assert series["instances"] == 5
    assert series["revision"] == 1
    assert {p: stored_path(node, p).stat().st_mtime_ns for p in files} == first


def test_changed_instance_after_completion_opens_a_revision(
    start_node: StartNode, real_series: dict[str, list[Path]], tmp_path: Path
) -> None:
    node = start_node()
    files = real_series["lung-kernel"][:3]
    storescu(node.port, files)
    uid = series_uid(files[0])
    wait_until(lambda: node.series().get(uid, {}).get("state") == "complete", 10)
    late = pydicom.dcmread(real_series["lung-kernel"][3])
    late.SeriesInstanceUID = uid
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path)
    storescu(node.port, [late_path])
    series = wait_until(
        lambda: (s := node.series()[uid])["state"] == "complete" and s["revision"] == 2 and s, 10
    )
    assert series["instances"] == 4


@pytest.mark.slow
def test_series_split_over_two_associations_is_one_series(
    start_node: StartNode, real_series: dict[str, list[Path]]
) -> None:
    node = start_node(completion={"quiet_seconds": 10, "release_grace_seconds": 5})
    files = real_series["lung-kernel"]
    storescu(node.port, files[:30])
    time.sleep(3)
    storescu(node.port, files[30:])
    uid = series_uid(files[0])
    series = wait_until(lambda: (s := node.series()[uid])["state"] == "complete" and s, 15)
    assert series["instances"] == 64
    assert series["revision"] == 1
    assert len(node.series()) == 1


@pytest.fixture
def tiny_storage(tmp_path: Path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def acknowledged(storescu_output: str) -> list[Path]:
    """Files that `storescu -v` reports as stored with success, in sending order."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif line.startswith("I: Received Store Response (Success") and current is not None:
            done.append(current)
    return done


def test_full_disk_answers_out_of_resources_and_loses_nothing_acknowledged(
    start_node: StartNode, real_series: dict[str, list[Path]], tiny_storage: Path
) -> None:
    # no watermark: the disk itself runs out (the watermark has its own test)
    node = start_node(storage={"path": str(tiny_storage), "min_free_mb": 0})
    files = real_series["lung-kernel"]  # ~520 KB each: a 4 MiB disk takes a few
    result = storescu(node.port, files, check=False)
    output = result.stdout + result.stderr
    assert "Refused: OutOfResources" in output
    stored = sorted(tiny_storage.rglob("*.dcm"))
    assert 0 < len(stored) < len(files)
    uid = series_uid(files[0])
    assert node.series()[uid]["instances"] == len(stored)
    by_name = {stored_path(node, f).name: f for f in files}
    for path in stored:
        assert_same_dataset(by_name[path.name], path)
    assert not list((tiny_storage / ".incoming").iterdir())
    assert "storage full" in node.log()


@pytest.mark.slow
def test_sigkill_mid_transfer_keeps_every_acknowledged_instance(
    start_node: StartNode, real_series: dict[str, list[Path]]
) -> None:
    node = start_node(
        completion={"quiet_seconds": 2, "release_grace_seconds": 1}, workers={"count": 1}
    )
    files = real_series["covid"] + real_series["cap"]
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", "AINODE", "-R", "-xs"]
        + ["127.0.0.1", str(node.port)]
        + [str(p) for p in files],
        env=DCMTK_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: len(list(node.storage.rglob("*.dcm"))) >= 60, timeout=60, interval=0.01)
    children = node.children()
    assert children, "the node runs its worker in a child process"
    node.kill()
    output, _ = sender.communicate(timeout=60)
    acked = acknowledged(output)
    assert 50 <= len(acked) < len(files)
    # Orphaned children stop by themselves; none goes on beside the restarted node.
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), timeout=30)

    node.start()
    for path in acked:
        assert_same_dataset(path, stored_path(node, path))
    uid = series_uid(files[0])
    series = wait_until(lambda: (s := node.series()[uid])["state"] == "complete" and s, 10)
    assert series["instances"] >= min(len(acked), len(real_series["covid"]))
    assert "did not stop cleanly" in node.log()
    # Finding 8: whatever was written but not yet recorded when the node died is recorded
    # now (the same boot: no reboot check), and no temp file is left.
    on_disk = len(list(node.storage.glob("*/*/*.dcm")))
    recorded = sum(series["instances"] for series in node.series().values())
    assert on_disk == recorded
    assert not list((node.storage / ".incoming").iterdir())


def test_sigterm_stops_cleanly(start_node: StartNode) -> None:
    node = start_node()
    assert node.stop(signal.SIGTERM) == 0
    assert "node stopped" in node.log()
    assert echo(node.port).returncode != 0


def test_logs_carry_no_patient_identifiers(
    start_node: StartNode, real_series: dict[str, list[Path]]
) -> None:
    node = start_node(logging={"level": "DEBUG"})
    files = real_series["lung-kernel"][:3]
    storescu(node.port, files)
    uid = series_uid(files[0])
    wait_until(lambda: node.series().get(uid, {}).get("state") == "complete", 10)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    log = node.log()
    assert uid in log
    for identifier in (str(source.PatientName), str(source.PatientID)):
        assert identifier and identifier not in log


def echo(
    port: int, calling: str = "STORESCU", called: str = "AINODE"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
    )


def test_the_called_ae_and_the_peers_address_are_checked(start_node: StartNode) -> None:
    """Finding 6: an RQ for another AE title is rejected (reason 7); a listed AE title that
    connects from elsewhere than its peer's host is rejected (reason 3), with a log line."""
    node = start_node(
        peers={
            "modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
            "elsewhere": {"ae_title": "FARAWAY", "host": "192.0.2.1", "port": 104},
        }
    )
    wrong_called = echo(node.port, called="NOTME")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    far = echo(node.port, calling="FARAWAY")
    assert far.returncode != 0
    assert "Calling AE Title Not Recognized" in far.stdout + far.stderr
    assert "FARAWAY connected from 127.0.0.1, but its peer entry's host resolves to 192.0.2.1" in (
        node.log()
    )
    assert echo(node.port).returncode == 0


def test_a_dataset_that_contradicts_its_command_is_refused(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Finding 6: the command's Affected SOP Instance UID is not the dataset's."""
    node = start_node()
    status = send_with_pynetdicom(node.port, ct_dataset(generate_uid()), tmp_path)
    assert status == 0xA900
    assert list(node.storage.rglob("*.dcm")) == []
    assert "differs from the Affected SOP Instance UID" in node.log()


def test_a_locked_database_answers_a700_fast_and_the_node_recovers(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Finding 7: with the catalog locked by another process, C-ECHO still answers, each
    C-STORE gets A700 within the receive path's busy timeout and leaves no file; once the
    lock is gone, stores succeed again."""
    node = start_node()
    database = Path(node.settings["database"]["url"].removeprefix("sqlite:///"))
    phantom = phantom_file(tmp_path)
    # The node's own scheduler may be mid-commit: wait for it, then hold the lock.
    holder = sqlite3.connect(database, timeout=30, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert echo(node.port).returncode == 0
        refused = storescu(node.port, [phantom], check=False)
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert list(node.storage.rglob("*.dcm")) == []
    assert "not recorded" in node.log()
    storescu(node.port, [phantom])
    assert len(list(node.storage.rglob("*.dcm"))) == 1


def test_below_the_disk_watermark_associations_are_refused(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node(storage={"min_free_mb": 1e12})
    refused = echo(node.port)
    assert refused.returncode != 0
    assert "Rejected Transient" in refused.stdout + refused.stderr
    status = node.cli("status")
    assert "below storage.min_free_mb" in status.stdout
    assert node.status()["disk"]["accepting"] is False


def test_what_the_node_writes_is_private_to_its_owner_and_group(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Finding 9: database, instance files and their folders are not readable by others."""
    node = start_node()
    phantom = phantom_file(tmp_path)
    storescu(node.port, [phantom])
    database = Path(node.settings["database"]["url"].removeprefix("sqlite:///"))
    written = [database, *node.storage.rglob("*")]
    assert len(written) > 4
    for path in written:
        assert path.stat().st_mode & 0o007 == 0, f"{path} is open to others"


@pytest.mark.slow
def test_immutable_database_files_are_named_not_a_silent_death(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Finding 7 and issue 25's 15: SQLite files made immutable while the node is idle would
    kill it with SIGBUS at its next write (nothing in Python can catch that): the node notices
    first and stops cleanly, exit status 1, the file named. A restart refuses with the file
    named, and once the files are writable the node starts again."""
    node = start_node(workers={"count": 0})
    database = Path(node.settings["database"]["url"].removeprefix("sqlite:///"))
    phantoms = []
    for index in range(3):
        phantom = tmp_path / f"{index}.dcm"
        ct_dataset(generate_uid()).save_as(phantom, enforce_file_format=True)
        phantoms.append(phantom)
    storescu(node.port, phantoms[:1])
    files = [str(p) for p in (database, Path(f"{database}-wal"), Path(f"{database}-shm"))]
    if subprocess.run(["chattr", "+i", *files], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here")
    try:
        wait_until(lambda: node.proc.poll() is not None, timeout=15)
        assert node.proc.returncode == 1
        assert "cannot be opened for writing" in node.log()
        assert "stopping the node before a write fails" in node.log()
        assert "Fatal Python error" not in node.log()
        assert len(list(node.storage.rglob("*.dcm"))) == 1
        restarted = subprocess.run(
            [sys.executable, "-m", "node", "serve", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert restarted.returncode == 1
        assert f"not starting: {database}" in restarted.stderr
        assert "cannot be opened for writing" in restarted.stderr
    finally:
        subprocess.run(["chattr", "-i", *files], capture_output=True)
    node.start()
    storescu(node.port, phantoms[2:])
    assert len(list(node.storage.rglob("*.dcm"))) >= 2


def received_events(node: NodeProcess) -> list[dict]:
    import json

    events = json.loads(node.cli("audit", "list", "--json").stdout)
    return [e["detail"] for e in events if e["kind"] == "received"]


def test_a_conflicting_duplicate_is_refused_and_the_first_copy_kept(
    start_node: StartNode, tmp_path: Path
) -> None:
    """What a sender had acknowledged is never replaced: another instance under a stored SOP
    Instance UID gets 0x0111 (Duplicate SOP Instance) and the audit trail names it; the same
    instance sent again is still a success."""
    import hashlib

    node = start_node()
    first = phantom_file(tmp_path)
    assert send_raw_file(node.port, first) == 0
    stored = stored_path(node, first)
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    other = pydicom.dcmread(first)
    other.PatientName = "Other^Patient"
    other.PixelData = b"\1" * 8
    other_path = tmp_path / "other.dcm"
    other.save_as(other_path, enforce_file_format=True)
    assert send_raw_file(node.port, other_path) == 0x0111
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    assert send_raw_file(node.port, first) == 0
    uid = str(other.SOPInstanceUID)
    events = wait_until(lambda: len(received_events(node)) == 3 and received_events(node), 10)
    refused, again = (
        next(e for e in events if e["conflicts"]),
        next(e for e in events if e["duplicates"]),
    )
    assert (refused["conflicts"], refused["instances"]) == ([uid], 0)
    assert (again["duplicates"], again["instances"]) == (1, 1)
    assert "refused: another instance with this SOP Instance UID is stored" in node.log()
