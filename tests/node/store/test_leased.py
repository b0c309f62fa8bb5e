"""The leased queue on dispatch rows (jobs use it through `node.flow.queue`, tested there), on
SQLite and PostgreSQL: batches by urgency, a lease lost is an outcome refused, expired and
interrupted leases come back."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, select, update

from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.store.db.models import Dispatch, WorkState, utcnow
from node.store.leased import Held, Lease, LeasedQueue, LeasedWorkLoop, RetryPolicy, renewing
from node.work.outcome import create_dispatches
from tests.peers import wait_until
from tests.rows import add_series


def dispatches(engine: Engine, priorities: list[int]) -> list[int]:
    """One job per priority, each with one dispatch at that priority; their ids."""
    queue = JobQueue(engine)
    request = JobRequest("x", "echo", ("pacs",), Priority.ROUTINE, ("r",))
    jobs = [
        queue.enqueue(series, 1, [request])[0] for series in add_series(engine, len(priorities))
    ]
    with engine.begin() as conn:
        for job_id, priority in zip(jobs, priorities, strict=True):
            create_dispatches(conn, job_id, ["pacs"], [Path("/tmp/sr.dcm")], 2, priority)
        return list(conn.execute(select(Dispatch.id).order_by(Dispatch.id)).scalars())


def state_of(engine: Engine, row_id: int) -> WorkState:
    with engine.connect() as conn:
        return conn.execute(select(Dispatch.state).where(Dispatch.id == row_id)).scalar_one()


def test_claims_the_most_urgent_first_and_each_row_once(engine: Engine) -> None:
    low, stat, routine = dispatches(engine, [2, 0, 1])
    queue = LeasedQueue(engine, Dispatch, RetryPolicy())
    with engine.begin() as conn:
        first = queue.claim(conn, "a", 30, limit=2)
    with engine.begin() as conn:
        rest = queue.claim(conn, "b", 30, limit=2)
    assert [lease.id for lease in first] == [stat, routine]
    assert [lease.id for lease in rest] == [low]
    assert all(lease.attempt == 1 and lease.max_attempts == 2 for lease in first + rest)


def test_only_the_lease_holder_records_an_outcome(engine: Engine) -> None:
    [row] = dispatches(engine, [1])
    queue = LeasedQueue(engine, Dispatch, RetryPolicy(base_seconds=10))
    with engine.begin() as conn:
        [lease] = queue.claim(conn, "a", 30)
    assert queue.fail(row, "b", "not mine", permanent=False) is None
    with engine.begin() as conn:
        assert not queue.succeed(conn, row, "b", status="stolen")
    assert (lease.attempt, lease.max_attempts) == (1, 2)
    assert queue.fail(row, "a", "PACS down", permanent=False) == WorkState.RETRYING
    with engine.connect() as conn:
        run_after, error = conn.execute(select(Dispatch.run_after, Dispatch.error)).one()
    assert error == "PACS down"
    assert timedelta(seconds=7) < run_after - utcnow() < timedelta(seconds=13)


def test_expired_leases_come_back_then_die(engine: Engine) -> None:
    [row] = dispatches(engine, [1])
    queue = LeasedQueue(engine, Dispatch, RetryPolicy())
    for attempt in (1, 2):
        with engine.begin() as conn:
            [lease] = queue.claim(conn, "lost", 30)
        assert lease.attempt == attempt
        assert queue.requeue_expired() == 0
        with engine.begin() as conn:
            conn.execute(update(Dispatch).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        assert queue.requeue_expired() == 1
    assert state_of(engine, row) == WorkState.DEAD


def test_a_restarted_single_consumer_takes_back_what_it_left_running(engine: Engine) -> None:
    first, second = dispatches(engine, [1, 1])
    queue = LeasedQueue(engine, Dispatch, RetryPolicy())
    with engine.begin() as conn:
        queue.claim(conn, "before-restart", 3600, limit=1)
    assert queue.requeue_running() == 1
    assert {state_of(engine, first), state_of(engine, second)} == {
        WorkState.RETRYING,
        WorkState.QUEUED,
    }
    with engine.begin() as conn:
        assert len(queue.claim(conn, "after-restart", 30, limit=5)) == 2


class Flaky(LeasedWorkLoop[int]):
    """Handles rows in claim order: raises on the first, succeeds on the others."""

    kind = "test"

    def __init__(self, engine: Engine, batch: int) -> None:
        super().__init__(
            engine, LeasedQueue(engine, Dispatch, RetryPolicy()), "loop", 30, batch=batch
        )
        self.handled: list[int] = []

    def load(self, conn: Connection, leases: list[Lease]) -> list[Held[int]]:
        return [Held(lease, lease.id) for lease in leases]

    def handle(self, held: Held[int]) -> None:
        self.handled.append(held.row)
        if len(self.handled) == 1:
            raise KeyError("a handler's bug")
        self.succeed(held.lease, status="sent")


def test_the_loop_retries_a_row_whose_handler_raised_and_goes_on(engine: Engine) -> None:
    first, second = dispatches(engine, [0, 1])
    loop = Flaky(engine, batch=5)
    assert loop.run_due() == 2
    assert loop.handled == [first, second]
    with engine.connect() as conn:
        error = conn.execute(select(Dispatch.error).where(Dispatch.id == first)).scalar_one()
    assert state_of(engine, first) == WorkState.RETRYING and "KeyError" in error
    assert state_of(engine, second) == WorkState.SUCCEEDED
    assert loop.run_due() == 0  # the retry waits for its backoff


def test_renewing_holds_a_lease_past_its_length_until_it_is_lost(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    kept, cancelled = dispatches(engine, [0, 1])
    queue = LeasedQueue(engine, Dispatch, RetryPolicy())
    with engine.begin() as conn:
        queue.claim(conn, "me", 6, limit=2)

    def expires(row_id: int) -> object:
        with engine.connect() as conn:
            return conn.execute(
                select(Dispatch.lease_expires_at).where(Dispatch.id == row_id)
            ).scalar_one()

    first = expires(kept)
    with renewing(queue, [kept, cancelled], "me", 6, "dispatch"):
        assert queue.cancel(cancelled)
        wait_until(lambda: expires(kept) != first, 10)  # renewed, without being asked
        assert queue.requeue_expired() == 0
    assert state_of(engine, kept) == WorkState.RUNNING
    assert state_of(engine, cancelled) == WorkState.CANCELLED
    # the tick that renewed one lease found the other lost, before the block could end
    assert f"dispatch {cancelled}: lease lost (cancelled or expired)" in caplog.text
