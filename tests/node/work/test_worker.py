"""The worker's outcomes on a real database: success, error (retry), bad input (failed)."""

from pathlib import Path

import pytest
from sqlalchemy import Engine

from node.config import Settings
from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.ingest.metadata import InstanceMetadata
from node.store.catalog import Catalog, Receipt
from node.store.db.models import utcnow
from node.store.storage import InstanceStore
from node.work.worker import Worker
from pipelines.base import BadInput, Requirements
from pipelines.codes import EXTENT, SLICES
from pipelines.registry import build_pipelines
from pipelines.volume import Volume
from tests.models import ct_fm_embedding
from tests.phantoms import chest, chest_geometry, write_series


class Exploding:
    name, version, requirements = "explode", "0", Requirements()

    def problem(self) -> None:
        return None

    def run(self, volume: Volume, stage=None):
        stage("sliding window")
        raise RuntimeError("CUDA error: device-side assert")


class Refusing(Exploding):
    name = "refuse"

    def run(self, volume: Volume, stage=None):
        raise BadInput("not a chest CT")


class WithoutWeights(Exploding):
    name = "no-weights"

    def problem(self) -> str:
        return "model not found at /models/x"


def worker_settings(storage: Path, database_url: str, **sections: object) -> Settings:
    """A worker's settings: its store, its database and any other `sections`."""
    return Settings.model_validate(
        {
            "node": {"accept_unknown_peers": True},
            "storage": {"path": str(storage)},
            "database": {"url": database_url},
            **sections,
        }
    )


@pytest.fixture
def worker(engine: Engine, database_url: str, tmp_path: Path, real_series) -> Worker:
    settings = worker_settings(tmp_path, database_url)
    store = InstanceStore(tmp_path)
    store.prepare()
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT", "AINODE", None)
    import pydicom

    for path in real_series["lung-kernel"][:3]:
        meta = InstanceMetadata.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
        data = path.read_bytes()
        store.write(meta.key, (data,))
        receipt = Receipt("a1", "CT", "AINODE", "1.2.840.10008.1.2", len(data), utcnow())
        recorded = catalog.record_instance(meta, receipt, content_changed=True, link=True)
    queue = JobQueue(engine)
    for pipeline in ("echo", "explode", "refuse", "missing", "no-weights"):
        request = JobRequest("x", pipeline, ("origin",), Priority.ROUTINE, ("r",))
        queue.enqueue(recorded.series_id, 1, [request])
    pipelines = {
        **build_pipelines(None),
        "explode": Exploding(),
        "refuse": Refusing(),
        "no-weights": WithoutWeights(),
    }
    return Worker(settings, "test-worker", pipelines)


def test_worker_records_each_outcome(worker: Worker) -> None:
    for _ in range(5):
        assert worker.run_once()
    assert not worker.run_once()
    jobs = {job.pipeline: job for job in worker.queue.list()}
    assert jobs["echo"].state == "succeeded"
    geometry = {
        m["concept"]["value"]: m["value"] for m in jobs["echo"].result["regions"][0]["measurements"]
    }
    assert geometry == {SLICES.value: 3.0, "112226": 5.0, EXTENT.value: 10.0}
    assert (Path(jobs["echo"].result["output"]) / "result.json").is_file()
    assert jobs["no-weights"].state == "failed"
    assert (
        jobs["no-weights"].error == "pipeline no-weights unavailable: model not found at /models/x"
    )
    assert jobs["explode"].state == "retrying"
    assert "CUDA error" in jobs["explode"].error
    assert jobs["explode"].stage == "sliding window"  # where it stopped
    assert jobs["echo"].stage == "encode"
    assert jobs["refuse"].state == "failed"
    assert jobs["refuse"].error == "bad input: not a chest CT"
    assert jobs["missing"].state == "failed"
    assert "not installed" in jobs["missing"].error


def store_phantom(
    engine: Engine, store: InstanceStore, folder: Path, modality: str = "CT"
) -> tuple[int, str]:
    """A chest phantom series written to `store` and recorded; its id and UID."""
    import pydicom

    catalog = Catalog(engine)
    catalog.open_association(folder.name, "CT", "AINODE", None)
    for path in write_series(folder, chest_geometry(), chest(), modality=modality):
        dataset = pydicom.dcmread(path)
        meta = InstanceMetadata.from_dataset(dataset)
        data = path.read_bytes()
        store.write(meta.key, (data,))
        receipt = Receipt(folder.name, "CT", "AINODE", "1.2.840.10008.1.2.1", len(data), utcnow())
        recorded = catalog.record_instance(meta, receipt, content_changed=True, link=True)
    return recorded.series_id, dataset.SeriesInstanceUID


def test_waiting_series_of_a_batching_pipeline_run_together(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """`batch_size: 2`: the worker takes two embedding jobs at once, and a series the
    pipeline refuses (MR) fails alone without failing the one beside it."""
    storage = tmp_path / "store"
    embedding = {**ct_fm_embedding(tmp_path, 6.0), "batch_size": 2}
    settings = worker_settings(storage, database_url, pipelines={"ct-embedding": embedding})
    store = InstanceStore(storage)
    store.prepare()
    queue = JobQueue(engine)
    series = [
        store_phantom(engine, store, tmp_path / name, modality)
        for name, modality in (("a", "CT"), ("b", "MR"), ("c", "CT"), ("d", "CT"))
    ]
    for series_id, _ in series:
        request = JobRequest("x", "ct-embedding", (), Priority.ROUTINE, ("r",))
        queue.enqueue(series_id, 1, [request])
    worker = Worker(settings, "test-worker", build_pipelines(settings.pipelines))
    assert worker.run_once()  # a and b
    jobs = {job.series_instance_uid: job for job in worker.queue.list()}
    first, refused, third, fourth = (jobs[uid] for _, uid in series)
    assert first.state == "succeeded" and first.result["batch"] == 1
    assert refused.state == "failed" and "MR" in refused.error
    assert third.state == fourth.state == "queued"
    assert worker.run_once()  # c and d
    assert not worker.run_once()
    jobs = {job.series_instance_uid: job for job in worker.queue.list()}
    for _, uid in series[2:]:
        assert jobs[uid].state == "succeeded"
        assert jobs[uid].result["batch"] == 2
        assert jobs[uid].result["embedding_dim"] == 16
