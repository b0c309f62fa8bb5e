"""The worker's outcomes on a real database: success, error (retry), bad input (failed)."""

from pathlib import Path

import pytest
from sqlalchemy import Engine

from node.catalog import Catalog, Receipt
from node.config import Settings
from node.db.models import utcnow
from node.ingest.metadata import InstanceMetadata
from node.queue import JobQueue
from node.routing.engine import JobRequest
from node.routing.rules import Priority
from node.storage import InstanceStore
from node.worker import Worker
from pipelines.base import BadInput, Requirements
from pipelines.codes import EXTENT, SLICES
from pipelines.registry import build_pipelines
from pipelines.volume import Volume


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


@pytest.fixture
def worker(engine: Engine, database_url: str, tmp_path: Path, real_series) -> Worker:
    settings = Settings.model_validate(
        {
            "node": {"accept_unknown_peers": True},
            "storage": {"path": str(tmp_path)},
            "database": {"url": database_url},
        }
    )
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
    assert geometry == {SLICES.value: 3.0, "SLICESPACING": 5.0, EXTENT.value: 10.0}
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
