"""What a job's success leaves in the database (`node.work.outcome`), in one transaction: its
summary; a positive triage raises the study's waiting jobs and its own dispatches to the
rule's priority; embeddings are stored per series and searched by cosine similarity; a job
that was no longer the worker's leaves nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select

from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.store.db.models import Dispatch, Embedding, Job, WorkState
from node.work.embeddings import NoEmbedding, most_similar
from tests.rows import add_series, finish


def triage_then_quant(engine: Engine, positive: bool) -> tuple[int, int, list[int]]:
    """Series 1 gets a triage job that escalates to stat; both series get a lung-quant job."""
    triage_series, other_series = add_series(engine, 2)
    queue = JobQueue(engine)
    queue.enqueue(
        triage_series,
        1,
        [JobRequest("x", "covid-triage", ("origin",), Priority.ROUTINE, ("r",), Priority.STAT)],
    )
    waiting = [
        queue.enqueue(
            series, 1, [JobRequest("x", "lung-quant", ("origin",), Priority.LOW, ("r",))]
        )[0]
        for series in (triage_series, other_series)
    ]
    job = queue.claim("w", 30)
    assert job is not None and job.pipeline == "covid-triage"
    assert finish(engine, job.id, positive=positive, objects=(Path("/tmp/sr.dcm"),))
    return job.id, triage_series, waiting


@pytest.mark.parametrize("positive", [True, False])
def test_a_positive_result_makes_the_study_stat(engine: Engine, positive: bool) -> None:
    job_id, _, waiting = triage_then_quant(engine, positive)
    with engine.connect() as conn:
        priorities = conn.execute(select(Job.priority).where(Job.id.in_(waiting))).scalars()
        dispatch = conn.execute(select(Dispatch.priority).where(Dispatch.job_id == job_id)).scalar()
    expected = Priority.STAT if positive else Priority.LOW
    assert list(priorities) == [expected, expected]
    assert dispatch == (Priority.STAT if positive else Priority.ROUTINE)


def test_similar_series_by_cosine(engine: Engine) -> None:
    series = add_series(engine, 4)
    queue = JobQueue(engine)
    vectors = [
        np.array([1, 0, 0]),
        np.array([0.9, 0.1, 0]),
        np.array([0, 1, 0]),
        np.array([-1, 0, 0]),
    ]
    for series_id, vector in zip(series, vectors, strict=True):
        queue.enqueue(series_id, 1, [JobRequest("x", "ct-embedding", (), Priority.ROUTINE, ("r",))])
        job = queue.claim("w", 30)
        unit = (vector / np.linalg.norm(vector)).astype(np.float32)
        assert finish(engine, job.id, embedding=unit)
    found = most_similar(engine, "1.2.3.1", top=2)
    assert [f.series_instance_uid for f in found] == ["1.2.3.2", "1.2.3.3"]
    assert found[0].similarity == pytest.approx(0.9 / np.linalg.norm([0.9, 0.1]), abs=1e-4)
    with pytest.raises(NoEmbedding):
        most_similar(engine, "9.9.9")


def test_a_job_no_longer_ours_leaves_nothing(engine: Engine) -> None:
    [series] = add_series(engine, 1)
    queue = JobQueue(engine)
    queue.enqueue(
        series, 1, [JobRequest("x", "ct-embedding", ("origin",), Priority.ROUTINE, ("r",))]
    )
    job = queue.claim("w", 30)
    assert job is not None and queue.cancel(job.id)
    vector = np.ones(4, dtype=np.float32) / 2
    assert not finish(engine, job.id, objects=(Path("/tmp/sr.dcm"),), embedding=vector)
    with engine.connect() as conn:
        assert conn.execute(select(Dispatch.id)).all() == []
        assert conn.execute(select(Embedding.id)).all() == []
        state, result = conn.execute(select(Job.state, Job.result)).one()
    assert (state, result) == (WorkState.CANCELLED, None)


def test_the_summary_is_recorded_and_a_rerun_resends(engine: Engine) -> None:
    [series] = add_series(engine, 1)
    queue = JobQueue(engine)
    queue.enqueue(series, 1, [JobRequest("x", "echo", ("pacs",), Priority.ROUTINE, ("r",))])
    job = queue.claim("w", 30)
    assert job is not None
    assert finish(engine, job.id, objects=(Path("/tmp/sr.dcm"),), dispatch_attempts=3)
    with engine.begin() as conn:  # the PACS refused it three times
        conn.execute(Dispatch.__table__.update().values(state=WorkState.DEAD, attempts=3))
    assert queue.retry(job.id)
    again = queue.claim("w", 30)
    assert again is not None and again.id == job.id
    assert finish(engine, job.id, objects=(Path("/tmp/sr.dcm"),), dispatch_attempts=3)
    [view] = queue.list(state="succeeded")
    with engine.connect() as conn:
        dispatch = conn.execute(
            select(Dispatch.state, Dispatch.attempts, Dispatch.max_attempts)
        ).one()
    assert view.result is not None and view.result["version"] == "1.0"
    assert tuple(dispatch) == (WorkState.QUEUED, 0, 3)
