from datetime import timedelta
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import Engine, select, update

from node.config import CompletionSettings
from node.flow.completion import SeriesCompletionTracker, StudyCompletionTracker
from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.ingest.metadata import InstanceMetadata
from node.store.catalog import Catalog, Receipt
from node.store.db.engine import make_session_factory
from node.store.db.models import Instance, Job, Study, utcnow
from node.store.retention import RetentionSweeper
from node.store.storage import InstanceStore


def receive_study(engine: Engine, store: InstanceStore, study_uid: str, at) -> int:
    """A one-instance study, stored and recorded, then completed; returns its series id."""
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, f"{study_uid}.1"
    ds.SOPInstanceUID, ds.SOPClassUID = f"{study_uid}.1.1", "1.2.840.10008.5.1.4.1.1.2"
    meta = InstanceMetadata.from_dataset(ds)
    store.write(meta.key, (b"dicom bytes",))
    catalog = Catalog(engine)
    catalog.open_association(f"a{study_uid[-1]}", "CT", "AINODE", None)
    receipt = Receipt(f"a{study_uid[-1]}", "CT", "AINODE", "1.2.840.10008.1.2.1", 11, at)
    recorded = catalog.record_instance(meta, receipt, content_changed=True, link=True)
    catalog.close_association(f"a{study_uid[-1]}", released=True, instances=1)
    settings = CompletionSettings(quiet_seconds=1, study_quiet_seconds=1)
    sessions = make_session_factory(engine)
    SeriesCompletionTracker(sessions, settings).sweep(at + timedelta(seconds=5))
    StudyCompletionTracker(sessions, settings).sweep(at + timedelta(seconds=5))
    return recorded.series_id


def test_old_finished_studies_go_recent_or_busy_ones_stay(engine: Engine, tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.prepare()
    old = utcnow() - timedelta(days=40)
    done = receive_study(engine, store, "1.2.3.1", old)
    busy = receive_study(engine, store, "1.2.3.2", old)
    receive_study(engine, store, "1.2.3.3", utcnow() - timedelta(days=1))
    queue = JobQueue(engine)
    request = JobRequest("x", "echo", ("origin",), Priority.ROUTINE, ("r",))
    [finished] = queue.enqueue(done, 1, [request])
    queue.enqueue(busy, 1, [request])
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == finished).values(state="succeeded"))

    deleted = RetentionSweeper(engine, tmp_path, retention_days=30).sweep()

    assert deleted == ["1.2.3.1"]
    assert not (tmp_path / "1.2.3.1").exists()
    assert (tmp_path / "1.2.3.2").exists() and (tmp_path / "1.2.3.3").exists()
    with engine.connect() as conn:
        studies = set(conn.execute(select(Study.study_instance_uid)).scalars())
        instances = conn.execute(select(Instance.sop_instance_uid)).scalars().all()
        jobs = conn.execute(select(Job.id)).scalars().all()
    assert studies == {"1.2.3.2", "1.2.3.3"}
    assert sorted(instances) == ["1.2.3.2.1.1", "1.2.3.3.1.1"]
    assert finished not in jobs
