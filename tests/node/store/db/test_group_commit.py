"""Group commit on SQLite and PostgreSQL: callers that arrive together share one commit, and a
failing caller fails only itself."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, Engine, event, func, insert, select
from sqlalchemy.exc import IntegrityError

from node.store.db.group_commit import GroupCommit
from node.store.db.models import Association, utcnow

Work = Callable[[Connection], str]


def opening(association_id: str) -> Work:
    def work(conn: Connection) -> str:
        conn.execute(
            insert(Association).values(
                id=association_id,
                calling_ae="CT01",
                called_ae="AINODE",
                pid=1,
                opened_at=utcnow(),
                released=False,
                instances_received=0,
            )
        )
        return association_id

    return work


def run_behind_a_slow_leader(group: GroupCommit, works: dict[str, Work]) -> dict[str, object]:
    """Start a leader whose transaction stays open until every other caller is queued."""
    first_running, release_first = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def slow_first(conn: Connection) -> str:
        opening("first")(conn)
        first_running.set()
        release_first.wait(30)
        return "first"

    def call(name: str, work: Work) -> None:
        try:
            results[name] = group.run(work)
        except Exception as exc:  # the failure is what is checked
            results[name] = exc

    leader = threading.Thread(target=call, args=("first", slow_first))
    leader.start()
    assert first_running.wait(30)
    followers = [threading.Thread(target=call, args=(n, w)) for n, w in works.items()]
    for thread in followers:
        thread.start()
    while len(group._pending) < len(followers):  # each has reached the queue
        threading.Event().wait(0.01)
    release_first.set()
    for thread in [leader, *followers]:
        thread.join(30)
    return results


def count_associations(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Association)).scalar_one()


def test_callers_that_wait_together_share_one_commit(engine: Engine) -> None:
    commits: list[object] = []
    event.listen(engine, "commit", commits.append)
    names = [f"f{i}" for i in range(5)]

    results = run_behind_a_slow_leader(GroupCommit(engine), {n: opening(n) for n in names})

    assert results == {"first": "first", **{n: n for n in names}}
    assert count_associations(engine) == 6
    assert len(commits) == 2  # the leader's, then one for the five that queued behind it


def test_a_failing_caller_fails_alone(engine: Engine) -> None:
    works = {f"f{i}": opening(f"f{i}") for i in range(3)}
    works["duplicate"] = opening("first")  # primary key taken by the leader

    results = run_behind_a_slow_leader(GroupCommit(engine), works)

    assert isinstance(results.pop("duplicate"), IntegrityError)
    assert results == {"first": "first", "f0": "f0", "f1": "f1", "f2": "f2"}
    assert count_associations(engine) == 4


def test_a_lone_caller_gets_its_result_or_its_error(engine: Engine) -> None:
    group = GroupCommit(engine)
    assert group.run(opening("alone")) == "alone"
    with pytest.raises(IntegrityError):
        group.run(opening("alone"))
