import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.store.storage import (
    DirectorySync,
    InstanceKey,
    InstanceStore,
    InvalidUID,
    StorageFull,
    WriteOutcome,
    check_uid,
)

KEY = InstanceKey.validated("1.2.3", "1.2.3.4", "1.2.3.4.5")


@pytest.mark.parametrize(
    "value",
    ["", None, "../../etc", "1.2.3/../4", "1.2..3", ".1.2", "1.2.", "1.2.a", "1" * 65, "1.2 3"],
)
def test_invalid_uids_never_become_paths(value: object) -> None:
    with pytest.raises(InvalidUID):
        check_uid(value, "SOPInstanceUID")


def test_valid_uid_keeps_its_text_and_strips_padding() -> None:
    assert check_uid("1.2.840.10008.5.1.4.1.1.2\0", "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.2"


def test_write_places_exact_bytes_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.prepare()
    assert store.write(KEY, (b"head", b"body")) is WriteOutcome.CREATED
    assert (tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm").read_bytes() == b"headbody"
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_duplicate_is_idempotent_and_changed_content_never_overwrites(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.prepare()
    store.write(KEY, (b"one",))
    before = os.stat(store.path_of(KEY)).st_ino
    assert store.write(KEY, (b"one",)) is WriteOutcome.IDENTICAL
    assert os.stat(store.path_of(KEY)).st_ino == before
    assert store.write(KEY, (b"two",)) is WriteOutcome.DIFFERS
    assert store.path_of(KEY).read_bytes() == b"one"
    assert os.stat(store.path_of(KEY)).st_ino == before


def test_prepare_clears_temp_files_left_by_a_crash(tmp_path: Path) -> None:
    (tmp_path / ".incoming").mkdir()
    (tmp_path / ".incoming" / "dead.part").write_bytes(b"half")
    InstanceStore(tmp_path).prepare()
    assert list((tmp_path / ".incoming").iterdir()) == []


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs the right to mount; skipped otherwise)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_raises_storage_full_and_keeps_earlier_files(tiny_filesystem: Path) -> None:
    store = InstanceStore(tiny_filesystem)
    store.prepare()
    block = os.urandom(200_000)
    written = []
    with pytest.raises(StorageFull):
        for index in range(20):
            key = InstanceKey.validated("1.2", "1.2.3", f"1.2.3.{index + 1}")
            store.write(key, (block,))
            written.append(key)
    assert 0 < len(written) < 20
    for key in written:
        assert store.path_of(key).read_bytes() == block
    assert list((tiny_filesystem / ".incoming").iterdir()) == []
    stored = sorted(tiny_filesystem.rglob("*.dcm"))
    assert len(stored) == len(written)


def test_concurrent_writers_into_one_series_all_land(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.prepare()
    keys = [InstanceKey.validated("1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(160)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(
            pool.map(lambda key: store.write(key, (key.sop_instance_uid.encode(),)), keys)
        )
    assert outcomes == [WriteOutcome.CREATED] * len(keys)
    for key in keys:
        assert store.path_of(key).read_bytes() == key.sop_instance_uid.encode()


def test_a_directory_that_cannot_be_flushed_fails_only_its_own_writers(tmp_path: Path) -> None:
    sync = DirectorySync()
    present, gone = tmp_path / "present", tmp_path / "gone"
    present.mkdir()

    def flush(directory: Path) -> str:
        try:
            sync.sync(directory)
        except FileNotFoundError:
            return "failed"
        return "flushed"

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(flush, [present, gone] * 100))
    assert results == ["flushed", "failed"] * 100
    sync.sync(present)  # a failed round leaves nothing behind for the next


def test_a_series_folder_removed_behind_the_store_is_made_again(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.prepare()
    store.write(KEY, (b"first",))
    shutil.rmtree(tmp_path / KEY.study_uid)  # as retention does
    second = InstanceKey.validated(KEY.study_uid, KEY.series_uid, "1.2.3.4.6")
    assert store.write(second, (b"second",)) is WriteOutcome.CREATED
    assert store.path_of(second).read_bytes() == b"second"
    assert list((tmp_path / ".incoming").iterdir()) == []


@pytest.mark.parametrize("control", [chr(c) for c in (*range(0x20), 0x7F)])
def test_a_uid_with_any_control_character_is_refused(control: str) -> None:
    """Finding 5: "1.2.3.4\\n" once passed (`$` matches before a final newline)."""
    ends = () if control == "\0" else (f"1.2.3.4{control}", f"{control}1.2.3")  # NUL: padding
    for uid in (f"1.2{control}.3", *ends):
        with pytest.raises(InvalidUID):
            check_uid(uid, "StudyInstanceUID")
