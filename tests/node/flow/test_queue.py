"""The job queue on a real database (SQLite and PostgreSQL) with real worker processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from datetime import timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.store.db.engine import make_engine
from node.store.db.models import Job, WorkState, utcnow
from node.store.leased import RetryPolicy
from tests.rows import add_series, finish


def request(pipeline: str = "echo", priority: Priority = Priority.ROUTINE) -> JobRequest:
    return JobRequest("unused", pipeline, ("origin",), priority, ("rule",))


def work(
    url: str, name: str, out: str, stop_after_idle: float, start: Barrier | None = None
) -> None:
    """A worker process: claim, note the job id, succeed, until the queue stays empty;
    with `start`, all begin together (a process spawned late under load would find the
    queue already empty)."""
    engine = make_engine(url)
    queue = JobQueue(engine)
    if start is not None:
        start.wait(timeout=120)
    idle_since = time.monotonic()
    with open(out, "a") as log:
        while time.monotonic() - idle_since < stop_after_idle:
            job = queue.claim(name, lease_seconds=30)
            if job is None:
                time.sleep(0.01)
                continue
            log.write(f"{job.id}\n")
            log.flush()
            assert finish(engine, job.id, name)
            idle_since = time.monotonic()
    engine.dispose()


def hang(url: str) -> None:
    """A worker that claims one job and never finishes it."""
    queue = JobQueue(make_engine(url))
    assert queue.claim("doomed", lease_seconds=2) is not None
    time.sleep(600)


@pytest.mark.slow
def test_500_jobs_4_worker_processes_each_job_runs_once(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    queue = JobQueue(engine)
    for series_id in add_series(engine, 500):
        queue.enqueue(series_id, 1, [request()])
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(4)
    outputs = [tmp_path / f"worker{i}.txt" for i in range(4)]
    workers = [
        spawn.Process(target=work, args=(database_url, f"w{i}", str(out), 2.0, start))
        for i, out in enumerate(outputs)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=300)
        assert process.exitcode == 0
    ran = [int(line) for out in outputs if out.exists() for line in out.read_text().split()]
    assert len(ran) == 500
    assert len(set(ran)) == 500
    assert sum(1 for out in outputs if out.exists() and out.read_text()) >= 2
    states = {job.state for job in queue.list(limit=1000)}
    assert states == {WorkState.SUCCEEDED}


def test_enqueue_is_idempotent_per_revision_and_pipeline(engine: Engine) -> None:
    queue = JobQueue(engine)
    [series] = add_series(engine, 1)
    assert len(queue.enqueue(series, 1, [request("a"), request("b")])) == 2
    assert queue.enqueue(series, 1, [request("a")]) == []
    assert len(queue.enqueue(series, 2, [request("a")])) == 1


def test_stat_jobs_overtake_routine_ones(engine: Engine) -> None:
    queue = JobQueue(engine)
    routine, stat = add_series(engine, 2)
    queue.enqueue(routine, 1, [request(priority=Priority.ROUTINE)])
    queue.enqueue(stat, 1, [request(priority=Priority.STAT)])
    first = queue.claim("w", 30)
    assert first is not None and first.series_id == stat


@pytest.mark.slow
def test_killed_worker_job_runs_again_after_lease_and_nothing_is_lost(
    engine: Engine, database_url: str
) -> None:
    queue = JobQueue(engine)
    first, second = add_series(engine, 2)
    queue.enqueue(first, 1, [request()])
    queue.enqueue(second, 1, [request()])
    doomed = multiprocessing.get_context("spawn").Process(target=hang, args=(database_url,))
    doomed.start()
    deadline = time.monotonic() + 60
    while not any(j.state == WorkState.RUNNING for j in queue.list()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join()
    other = queue.claim("survivor", 30)
    assert other is not None and finish(engine, other.id, "survivor")
    assert queue.claim("survivor", 30) is None  # the lost job is still leased
    assert queue.requeue_expired() == 0
    time.sleep(2.1)
    assert queue.requeue_expired() == 1
    again = queue.claim("survivor", 30)
    assert again is not None and again.attempt == 2
    assert finish(engine, again.id, "survivor")
    assert {j.state for j in queue.list()} == {WorkState.SUCCEEDED}


def test_failures_retry_with_growing_delays_then_die(engine: Engine) -> None:
    queue = JobQueue(engine, RetryPolicy(max_attempts=4, base_seconds=10, max_seconds=1000))
    [series] = add_series(engine, 1)
    [job_id] = queue.enqueue(series, 1, [request()])
    delays = []
    for attempt in range(1, 5):
        with engine.begin() as conn:  # make it runnable now instead of waiting the backoff
            conn.execute(Job.__table__.update().values(run_after=utcnow() - timedelta(seconds=1)))
        job = queue.claim("w", 30)
        assert job is not None and job.attempt == attempt
        failed_at = utcnow()
        state = queue.fail(job_id, "w", f"boom {attempt}", permanent=False)
        with engine.connect() as conn:
            run_after = conn.execute(select(Job.run_after).where(Job.id == job_id)).scalar_one()
        if attempt < 4:
            assert state == WorkState.RETRYING
            delays.append((run_after - failed_at).total_seconds())
        else:
            assert state == WorkState.DEAD
    assert 7.5 <= delays[0] <= 12.5 and 15 <= delays[1] <= 25 and 30 <= delays[2] <= 50
    [view] = queue.list()
    assert (view.state, view.attempts, view.error) == ("dead", 4, "boom 4")
    # retried by hand: a fresh set of 4 attempts, backing off from the start again, and
    # the count goes on (a job retried, then cancelled, shows that it ran before)
    assert queue.retry(job_id)
    job = queue.claim("w", 30)
    assert job is not None and job.attempt == 5
    failed_at = utcnow()
    assert queue.fail(job_id, "w", "boom 5", permanent=False) == WorkState.RETRYING
    with engine.connect() as conn:
        run_after = conn.execute(select(Job.run_after).where(Job.id == job_id)).scalar_one()
    assert 7.5 <= (run_after - failed_at).total_seconds() <= 12.5
    assert queue.cancel(job_id)
    [view] = queue.list()
    assert (view.state, view.attempts) == ("cancelled", 5)


def test_bad_input_fails_at_once_and_cancel_stops_a_running_job(engine: Engine) -> None:
    queue = JobQueue(engine)
    first, second = add_series(engine, 2)
    [bad] = queue.enqueue(first, 1, [request()])
    [cancelled] = queue.enqueue(second, 1, [request()])
    job = queue.claim("w", 30)
    assert job is not None and job.id == bad
    assert queue.fail(bad, "w", "not a CT", permanent=True) == WorkState.FAILED
    running = queue.claim("w", 30)
    assert running is not None and running.id == cancelled
    assert queue.cancel(cancelled)
    assert not queue.leased.renew(cancelled, "w", 30)
    assert not finish(engine, cancelled, "w")
    states = {view.id: view.state for view in queue.list()}
    assert states == {bad: "failed", cancelled: "cancelled"}
