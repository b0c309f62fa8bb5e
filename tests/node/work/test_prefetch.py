"""CT series decoded as they arrive: what the prefetcher decodes (receiving CT series only),
that a job reads those pixels rather than decoding again and gets the same volume, that a
file changed since is decoded afresh, and the memory bound."""

from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import Engine, select, update

from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.store.db.models import Instance, Series, SeriesState
from node.store.storage import InstanceStore
from node.work.prefetch import DecodedFrames, Prefetcher
from node.work.worker import Worker
from pipelines.registry import build_pipelines
from pipelines.volume import load_volume, stored_frames
from tests.node.work.test_worker import store_phantom, worker_settings


def stored_files(engine: Engine, root: Path, series_id: int) -> list[Path]:
    with engine.connect() as conn:
        paths = conn.execute(select(Instance.path).where(Instance.series_id == series_id))
        return [root / path for path in paths.scalars()]


def test_receiving_ct_series_are_decoded_and_their_volume_is_the_same(
    engine: Engine, tmp_path: Path
) -> None:
    store = InstanceStore(tmp_path / "store")
    store.prepare()
    cache = DecodedFrames(256 * 2**20)
    prefetcher = Prefetcher(engine, store.root, cache)
    store_phantom(engine, store, tmp_path / "before")  # stored before it started: not its work
    assert prefetcher.decode_arrived() == 0
    done_id, _ = store_phantom(engine, store, tmp_path / "done")
    with engine.begin() as conn:  # completed before the prefetcher looked: its job decodes
        conn.execute(update(Series).where(Series.id == done_id).values(state=SeriesState.COMPLETE))
    ct_id, _ = store_phantom(engine, store, tmp_path / "ct")
    store_phantom(engine, store, tmp_path / "mr", modality="MR")
    ct = stored_files(engine, store.root, ct_id)

    assert prefetcher.decode_arrived() == len(ct)
    assert prefetcher.decode_arrived() == 0  # each file once
    assert cache.held_bytes == sum(stored_frames(path).nbytes for path in ct)

    volume = load_volume(ct, frames=cache.frames)
    assert cache.hits == len(ct)
    np.testing.assert_array_equal(volume.voxels, load_volume(ct).voxels)

    changed = ct[0]  # rewritten since it was decoded: read again
    dataset = pydicom.dcmread(changed)
    dataset.PixelData = (dataset.pixel_array + 7).astype(dataset.pixel_array.dtype).tobytes()
    dataset.save_as(changed)
    np.testing.assert_array_equal(cache.frames(changed)[0], dataset.pixel_array)
    assert cache.hits == len(ct)


def test_the_least_recently_used_frames_go_first_past_the_bound(tmp_path: Path) -> None:
    frame = np.zeros((1, 64, 64), np.int16)  # 8 KiB
    cache = DecodedFrames(3 * frame.nbytes)
    paths = []
    for name in "abcd":
        path = tmp_path / name
        path.write_bytes(b"")
        paths.append(path)
    for path in paths[:3]:
        cache.add(path, (0, path.stat().st_mtime_ns), frame)
    cache.frames(paths[0])  # used: kept over b
    cache.add(paths[3], (0, paths[3].stat().st_mtime_ns), frame)
    assert cache.held_bytes == 3 * frame.nbytes
    assert cache.hits == 1
    for path in (paths[0], paths[2], paths[3]):
        cache.frames(path)
    assert cache.hits == 4
    cache.add(tmp_path / "big", (0, 0), np.zeros((4, 64, 64), np.int16))  # over the bound
    assert cache.held_bytes == 3 * frame.nbytes


def test_a_worker_runs_its_job_on_the_series_it_decoded_while_it_arrived(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    storage = tmp_path / "store"
    settings = worker_settings(storage, database_url)
    store = InstanceStore(storage)
    store.prepare()
    cache = DecodedFrames(256 * 2**20)
    worker = Worker(settings, "test-worker", build_pipelines(None), cache)
    prefetcher = Prefetcher(engine, storage, cache)
    assert prefetcher.decode_arrived() == 0  # where the catalog stands
    series_id, _ = store_phantom(engine, store, tmp_path / "ct")
    files = stored_files(engine, storage, series_id)
    assert prefetcher.decode_arrived() == len(files)
    JobQueue(engine).enqueue(series_id, 1, [JobRequest("x", "echo", (), Priority.ROUTINE, ("r",))])
    assert worker.run_once()
    (job,) = worker.queue.list()
    assert job.state == "succeeded", job.error
    assert cache.hits == len(files)
