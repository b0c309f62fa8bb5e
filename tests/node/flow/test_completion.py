"""Series completion rules on a real database (SQLite and PostgreSQL), with explicit times."""

from datetime import timedelta

from sqlalchemy import Engine

from node.admin.report import build_report
from node.config import CompletionSettings
from node.flow.completion import SeriesCompletionTracker
from node.store.catalog import Catalog
from node.store.db.engine import make_session_factory
from node.store.db.models import utcnow
from tests.rows import T0, receive


def tracker(engine: Engine, quiet: float = 10, grace: float = 1) -> SeriesCompletionTracker:
    settings = CompletionSettings(quiet_seconds=quiet, release_grace_seconds=grace)
    return SeriesCompletionTracker(make_session_factory(engine), settings)


def state(engine: Engine) -> dict:
    report = build_report(engine)
    return report.series[0].model_dump()


def test_quiet_period_completes_only_without_open_association(engine: Engine) -> None:
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT01", "AINODE", "127.0.0.1")
    for sop in range(1, 4):
        receive(catalog, sop, "a1", T0)
    sweep = tracker(engine).sweep
    assert sweep(T0 + timedelta(seconds=60)) == []  # a1 still open: a sender may be slow
    catalog.close_association("a1", released=False, instances=3)  # aborted: no early signal
    assert sweep(T0 + timedelta(seconds=5)) == []
    [done] = sweep(T0 + timedelta(seconds=10))
    assert (done.revision, done.instance_count) == (1, 3)
    assert state(engine)["state"] == "complete"


def test_release_completes_after_the_grace_period(engine: Engine) -> None:
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT01", "AINODE", None)
    receive(catalog, 1, "a1", utcnow())
    catalog.close_association("a1", released=True, instances=1)
    released = utcnow()
    sweep = tracker(engine, quiet=600, grace=1).sweep
    assert sweep(released + timedelta(seconds=0.5)) == []
    assert len(sweep(released + timedelta(seconds=1.01))) == 1


def test_a_second_open_association_holds_completion(engine: Engine) -> None:
    catalog = Catalog(engine)
    for name in ("a1", "a2"):
        catalog.open_association(name, "CT01", "AINODE", None)
    receive(catalog, 1, "a1", utcnow())
    receive(catalog, 2, "a2", utcnow())
    catalog.close_association("a1", released=True, instances=1)
    sweep = tracker(engine, quiet=600, grace=0).sweep
    assert sweep(utcnow() + timedelta(seconds=5)) == []
    catalog.close_association("a2", released=True, instances=1)
    assert len(sweep(utcnow() + timedelta(seconds=0.01))) == 1


def test_arrival_after_completion_opens_a_new_revision(engine: Engine) -> None:
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT01", "AINODE", None)
    receive(catalog, 1, "a1", T0)
    receive(catalog, 2, "a1", T0)
    catalog.close_association("a1", released=False, instances=2)
    tracker(engine).sweep(T0 + timedelta(seconds=11))
    catalog.open_association("a2", "CT01", "AINODE", None)
    identical = receive(catalog, 1, "a2", T0 + timedelta(seconds=20), changed=False)
    assert (identical.revision, identical.opened_revision, identical.new_instance) == (
        1,
        False,
        False,
    )
    assert state(engine)["state"] == "complete"
    late = receive(catalog, 3, "a2", T0 + timedelta(seconds=21))
    assert (late.revision, late.opened_revision, late.new_instance) == (2, True, True)
    series = state(engine)
    assert (series["state"], series["revision"], series["instances"]) == ("receiving", 2, 3)


def test_stale_associations_are_closed_at_start(engine: Engine) -> None:
    catalog = Catalog(engine)
    catalog.open_association("a1", "CT01", "AINODE", None)
    receive(catalog, 1, "a1", T0)
    assert tracker(engine).sweep(T0 + timedelta(seconds=60)) == []
    assert catalog.close_stale_associations() == 1
    assert len(tracker(engine).sweep(T0 + timedelta(seconds=60))) == 1
