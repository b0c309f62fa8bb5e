"""Rows a test needs in the catalog and the queue, written as the node writes them."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import Dataset
from sqlalchemy import Engine, insert

from node.ingest.metadata import InstanceMetadata
from node.store.catalog import Catalog, Receipt, Recorded
from node.store.db.models import Series, Study, utcnow
from node.work.outcome import JobOutcome, OutcomeRecorder, ResultSummary


def add_series(engine: Engine, count: int) -> list[int]:
    now = utcnow()
    with engine.begin() as conn:
        study = conn.execute(
            insert(Study)
            .values(study_instance_uid="1.2.3", first_received_at=now)
            .returning(Study.id)
        ).scalar_one()
        return [
            conn.execute(
                insert(Series)
                .values(
                    study_id=study,
                    series_instance_uid=f"1.2.3.{i + 1}",
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=1,
                    routed_revision=0,
                )
                .returning(Series.id)
            ).scalar_one()
            for i in range(count)
        ]


def finish(
    engine: Engine,
    job_id: int,
    owner: str = "w",
    positive: bool = False,
    objects: tuple[Path, ...] = (),
    embedding: np.ndarray | None = None,
    dispatch_attempts: int = 8,
) -> bool:
    """Record a job's success as a worker would."""
    summary = ResultSummary(pipeline="p", version="1.0", positive=positive)
    outcome = JobOutcome(job_id, owner, summary, objects, embedding)
    return OutcomeRecorder(engine, dispatch_attempts).record(outcome)


T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=utcnow().tzinfo)
SERIES = "1.2.826.0.1.3680043.10.1.2"


def metadata(sop_suffix: int, series: str = SERIES, sop_uid: str | None = None) -> InstanceMetadata:
    """A CT instance of `series` (its SOP Instance UID: `sop_uid`, or the series' + suffix)."""
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1"
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop_uid or f"{series}.{sop_suffix}"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "1.25"
    ds.ConvolutionKernel = "LUNG"
    return InstanceMetadata.from_dataset(ds)


def receive(
    catalog: Catalog, sop: int, association: str, at: datetime, changed: bool = True
) -> Recorded:
    receipt = Receipt(association, "CT01", "AINODE", "1.2.840.10008.1.2.1", 100, at)
    return catalog.record_instance(metadata(sop), receipt, content_changed=changed, link=True)
