"""The router on a real database with stored series: completed revisions become jobs once,
study rules pick one series, and a broken rules file never replaces the last good rules."""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import Engine, select, update

from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.router import Router, RulesSource, route_again
from node.ingest.metadata import InstanceMetadata
from node.store.catalog import Catalog, Receipt
from node.store.db.models import Instance, Job, Series, SeriesState, utcnow
from node.store.storage import InstanceStore
from tests.phantoms import Geometry, sphere, write_series

RULES = """
rules:
  - name: thin-ct
    match: {all: [{Modality: CT}, {SliceThickness: {le: 2}}]}
    pipelines: [echo]
    destinations: [origin]
  - name: best-of-study
    trigger: study
    match: {Modality: CT}
    pipelines: [lung-quant]
"""
BALL = sphere((0, 0, 0), 5, 100, -1000)
STUDY = "1.2.826.0.1.3680043.10.9"


def store_series(engine: Engine, storage: Path, thickness: float, slices: int) -> int:
    """A phantom series of study `STUDY` written to the store and recorded, then marked
    complete."""
    geometry = Geometry(rows=16, columns=16, slice_step=thickness, slices=slices)
    files = write_series(storage / "incoming" / str(thickness), geometry, BALL)
    store, catalog = InstanceStore(storage), Catalog(engine)
    store.prepare()
    association = f"a{thickness}"
    catalog.open_association(association, "CT01", "AINODE", None)
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = STUDY
        dataset.save_as(path)
        meta = InstanceMetadata.from_dataset(dataset)
        store.write(meta.key, (path.read_bytes(),))
        receipt = Receipt(association, "CT01", "AINODE", "1.2.840.10008.1.2.1", 1, utcnow())
        recorded = catalog.record_instance(meta, receipt, content_changed=True, link=True)
    with engine.begin() as conn:
        conn.execute(
            update(Series)
            .where(Series.id == recorded.series_id)
            .values(state=SeriesState.COMPLETE, completed_at=utcnow())
        )
    return recorded.series_id


def router(engine: Engine, storage: Path, rules_file: Path, batch: int = 200) -> Router:
    source = RulesSource(rules_file, {"echo", "lung-quant"}, set())
    return Router(engine, storage, source, JobQueue(engine), batch=batch)


def jobs(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return list(conn.execute(select(Job.series_id, Job.pipeline).order_by(Job.id)).all())


def test_a_pass_routes_at_most_its_batch_oldest_first(engine: Engine, tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    first = store_series(engine, tmp_path / "store", thickness=1.0, slices=3)
    second = store_series(engine, tmp_path / "store", thickness=2.0, slices=3)
    routing = router(engine, tmp_path / "store", rules_file, batch=1)
    assert routing.route_pending() == 1
    assert jobs(engine) == [(first, "echo")]
    assert routing.route_pending() == 1
    assert routing.route_pending() == 0
    assert jobs(engine) == [(first, "echo"), (second, "echo")]


def test_each_complete_revision_is_routed_once(engine: Engine, tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    thin = store_series(engine, tmp_path / "store", thickness=1.0, slices=6)
    thick = store_series(engine, tmp_path / "store", thickness=5.0, slices=4)
    routing = router(engine, tmp_path / "store", rules_file)
    assert routing.route_pending() == 2
    assert routing.route_pending() == 0
    assert jobs(engine) == [(thin, "echo")]
    with engine.connect() as conn:
        routed = dict(conn.execute(select(Series.id, Series.routed_revision)).all())
    assert routed == {thin: 1, thick: 1}


def test_a_study_rule_picks_the_thinnest_series(engine: Engine, tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    thin = store_series(engine, tmp_path / "store", thickness=1.0, slices=6)
    thick = store_series(engine, tmp_path / "store", thickness=5.0, slices=4)
    with engine.connect() as conn:
        [study] = conn.execute(select(Series.study_id).distinct()).scalars()
    routing = router(engine, tmp_path / "store", rules_file)
    routing.studies_completed([study])
    routing.studies_completed([study])  # the same revision again: no second job
    assert (thick, "lung-quant") not in jobs(engine)
    assert jobs(engine) == [(thin, "lung-quant")]


def test_a_broken_rules_file_keeps_the_last_good_rules(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    source = RulesSource(rules_file, {"echo", "lung-quant"}, set())
    good = source.current()
    assert [rule.name for rule in good.rules] == ["thin-ct", "best-of-study"]
    rules_file.write_text(RULES.replace("pipelines: [echo]", "pipelines: [nope]"))
    assert source.current() is good
    assert source.error is not None and "nope" in source.error
    rules_file.write_text(RULES.replace("thin-ct", "thin-chest-ct"))
    assert [rule.name for rule in source.current().rules] == ["thin-chest-ct", "best-of-study"]
    assert source.error is None


def test_a_series_whose_instances_moved_away_is_routed_to_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    """Found by the fuzzer: new bytes under a known SOP Instance UID moved every instance of a
    series into another one; the empty series completed and routing failed on it forever."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    thin = store_series(engine, tmp_path / "store", thickness=1.0, slices=6)
    with engine.begin() as conn:
        conn.execute(Instance.__table__.delete().where(Instance.series_id == thin))
    routing = router(engine, tmp_path / "store", rules_file)
    assert routing.route_pending() == 1
    assert routing.route_pending() == 0
    assert jobs(engine) == []


def test_a_request_to_route_again_made_while_routing_is_kept(
    engine: Engine, tmp_path: Path
) -> None:
    """The rules change and the API asks for re-routing while the router is between reading
    the series and marking it routed: the next pass routes it with the new rules."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES.replace("le: 2", "le: 0.5"))
    thin = store_series(engine, tmp_path / "store", thickness=1.0, slices=6)
    queue = JobQueue(engine)

    class RulesChangedMeanwhile:
        def enqueue(self, series_id: int, revision: int, requests: list[JobRequest]) -> list[int]:
            created = queue.enqueue(series_id, revision, requests)
            if rules_file.read_text() != RULES:
                rules_file.write_text(RULES)
                with engine.begin() as conn:
                    route_again(conn, series_id, revision)
            return created

    source = RulesSource(rules_file, {"echo", "lung-quant"}, set())
    routing = Router(engine, tmp_path / "store", source, RulesChangedMeanwhile())
    assert routing.route_pending() == 1
    assert jobs(engine) == []
    assert routing.route_pending() == 1
    assert jobs(engine) == [(thin, "echo")]
    assert routing.route_pending() == 0
