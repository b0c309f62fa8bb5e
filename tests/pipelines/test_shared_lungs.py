"""One segmentation of a series' lungs for every pipeline and worker process that asks."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import pytest
import torch

from pipelines.anatomy import shared
from pipelines.base import BadInput
from pipelines.volume import Volume, load_volume
from tests.phantoms import body_without_lungs, chest, chest_geometry, write_series


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return load_volume(write_series(tmp_path / "series", chest_geometry(), chest()))


@pytest.fixture
def kept(tmp_path: Path) -> Path:
    """Where `keeping` keeps masks on disk."""
    return tmp_path / "kept"


def keeping(folder: Path) -> shared.Anatomy:
    """A worker process's anatomy (a new one: what another process, or this one after a
    restart, has), keeping the masks in `folder`."""
    return shared.Anatomy(lambda _: folder)


def refuse_to_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    def segment(*_):
        raise AssertionError("segmented again")

    monkeypatch.setattr(shared, "segment_lungs", segment)


def test_another_process_reads_the_masks_instead_of_segmenting(
    volume: Volume, kept: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = keeping(kept).lungs(volume)
    assert len(list(kept.glob("lungs-*.npz"))) == 1
    refuse_to_segment(monkeypatch)
    again = keeping(kept).lungs(volume)
    for made, read in zip(first, again, strict=True):
        assert torch.equal(made, read)


def test_unreadable_kept_masks_are_segmented_again_and_replaced(
    volume: Volume, kept: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = keeping(kept).lungs(volume)
    (path,) = kept.glob("lungs-*.npz")
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING):
        again = keeping(kept).lungs(volume)
    assert "unreadable" in caplog.text
    assert torch.equal(first.left, again.left)
    assert torch.equal(keeping(kept).lungs(volume).right, first.right)  # the file was replaced


def test_masks_that_cannot_be_kept_are_still_returned(
    volume: Volume, kept: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keeping(kept).lungs(volume)
    (path,) = kept.glob("lungs-*.npz")
    path.unlink()
    (path / "in-the-way").mkdir(parents=True)  # the file cannot be read or written
    with caplog.at_level(logging.WARNING):
        lungs = keeping(kept).lungs(volume)
    assert lungs.left.any() and lungs.right.any()
    assert "cannot share the lungs" in caplog.text
    assert volume.series_instance_uid in caplog.text


def test_without_a_folder_to_keep_them_in_the_lungs_are_still_segmented(
    volume: Volume, kept: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept.parent.mkdir(exist_ok=True)
    kept.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        lungs = keeping(kept).lungs(volume)
    assert lungs.left.any() and lungs.right.any()
    assert "cannot share the lungs" in caplog.text


def _lungs_in_child(series: Path, folder: Path, log: Path) -> int:
    """In a process of its own: the lungs of `series`, noting each segmentation in `log`."""
    real = shared.segment_lungs

    def segment(*args):
        with log.open("a") as file:
            file.write("segmented\n")
        return real(*args)

    shared.segment_lungs = segment
    return int(keeping(folder).lungs(load_volume(sorted(series.glob("*.dcm")))).left.sum())


def test_two_workers_asking_at_once_segment_once(volume: Volume, tmp_path: Path) -> None:
    log = tmp_path / "segmentations.log"
    series = tmp_path / "series"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        voxels = pool.starmap(_lungs_in_child, [(series, tmp_path / "kept", log)] * 2)
    assert log.read_text().splitlines() == ["segmented"]
    assert voxels[0] == voxels[1] > 0


def test_a_volume_without_lungs_is_segmented_once_too(
    tmp_path: Path, kept: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three pipelines asking for the lungs of a scan that has none get the same answer
    without segmenting it three times; so does another worker process."""
    files = write_series(
        tmp_path / "no-lungs",
        chest_geometry(),
        body_without_lungs,
    )
    volume = load_volume(files)
    anatomy = keeping(kept)
    with pytest.raises(BadInput, match="no lungs found") as first:
        anatomy.lungs(volume)
    refuse_to_segment(monkeypatch)
    with pytest.raises(BadInput) as again:
        anatomy.lungs(volume)
    with pytest.raises(BadInput) as elsewhere:  # another process: the refusal is read from disk
        keeping(kept).lungs(volume)
    assert str(first.value) == str(again.value) == str(elsewhere.value)
