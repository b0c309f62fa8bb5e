"""The series input guard (`node.work.guard`): nearest-reference distances scaled by the
reference's leave-one-study-out median, stored per pipeline, scoring every stored and every
new embedding, and what the outcome does with a score (records it, routes the series again)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, insert, select

from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.store.db.engine import make_engine
from node.store.db.migrate import upgrade
from node.store.db.models import Embedding, Job, Series, Study, utcnow
from node.work import guard
from node.work.outcome import JobOutcome, OutcomeRecorder, ResultSummary
from pipelines.probe import load_probe
from tests.node.test_cli import ainode

RNG = np.random.default_rng(7)
CENTRE = RNG.normal(size=64)


def near(scale: float = 0.05) -> np.ndarray:
    return CENTRE + RNG.normal(scale=scale, size=64)


def test_a_series_like_the_reference_scores_about_one_and_one_unlike_it_far_more() -> None:
    profiles = {f"s{i}": near() for i in range(8)}
    fitted = guard.fit(profiles, {uid: uid for uid in profiles})
    assert np.median(list(fitted.held_out.values())) == pytest.approx(1.0)
    assert fitted.model.distance(near()) < guard.DEFAULT_THRESHOLD
    assert fitted.model.distance(CENTRE[::-1]) > 5 * guard.DEFAULT_THRESHOLD
    assert fitted.model.distance(3 * profiles["s0"]) == pytest.approx(0.0, abs=1e-9)  # length
    again = guard.GuardModel.from_bytes(fitted.model.to_bytes())
    assert again.distance(CENTRE[::-1]) == pytest.approx(fitted.model.distance(CENTRE[::-1]))


def test_series_of_one_study_do_not_vouch_for_each_other() -> None:
    """Two kernels of one acquisition are near twins: each is held out with its study."""
    twin = near()
    profiles = {"a1": twin, "a2": twin + 1e-6, "b": near(), "c": near()}
    studies = {"a1": "A", "a2": "A", "b": "B", "c": "C"}
    held_out = guard.fit(profiles, studies).held_out
    assert held_out["a1"] > 0.5 and held_out["a2"] > 0.5
    by_series = guard.fit(profiles, {uid: uid for uid in profiles}).held_out
    assert by_series["a1"] < 0.01  # what leave-one-series-out would have claimed


def test_a_reference_needs_three_series_of_two_studies() -> None:
    with pytest.raises(ValueError, match="at least 3 series"):
        guard.fit({"a": near(), "b": near()}, {"a": "A", "b": "B"})
    with pytest.raises(ValueError, match="two or more studies"):
        guard.fit({k: near() for k in "abc"}, dict.fromkeys("abc", "A"))
    with pytest.raises(ValueError, match="differ in length"):
        guard.fit({"a": near(), "b": near(), "c": near()[:10]}, {k: k for k in "abc"})


def add_embedded(engine: Engine, study: str, series: str, profile: np.ndarray) -> int:
    """A series with a stored ct-embedding (revision 1) of this profile."""
    now = utcnow()
    with engine.begin() as conn:
        study_id = conn.execute(
            insert(Study)
            .values(study_instance_uid=study, first_received_at=now)
            .returning(Study.id)
        ).scalar_one()
        series_id = conn.execute(
            insert(Series)
            .values(
                study_id=study_id,
                series_instance_uid=series,
                first_received_at=now,
                last_received_at=now,
                instance_count=1,
                revision=1,
                routed_revision=1,
            )
            .returning(Series.id)
        ).scalar_one()
        conn.execute(
            insert(Embedding).values(
                series_id=series_id,
                revision=1,
                pipeline="ct-embedding",
                model_version="1.0",
                dimensions=4,
                vector=np.ones(4, np.float32).tobytes(),
                profile=profile.astype(np.float32).tobytes(),
                created_at=now,
            )
        )
    return series_id


def embedding_job(engine: Engine, series_id: int, profile: np.ndarray) -> tuple[dict, int]:
    """A ct-embedding job on the series ends with this profile, as a worker records it;
    returns the job's recorded result and the series' routed revision after it."""
    queue = JobQueue(engine)
    queue.enqueue(series_id, 1, [JobRequest("x", "ct-embedding", (), Priority.ROUTINE, ("r",))])
    job = queue.claim("w", 30)
    assert job is not None
    summary = ResultSummary(pipeline="ct-embedding", version="1.0", positive=False)
    outcome = JobOutcome(job.id, "w", summary, (), np.ones(4, np.float32), profile)
    assert OutcomeRecorder(engine).record(outcome)
    with engine.connect() as conn:
        result = json.loads(conn.execute(select(Job.result).where(Job.id == job.id)).scalar_one())
        routed = conn.execute(
            select(Series.routed_revision).where(Series.id == series_id)
        ).scalar_one()
    return result, routed


def test_a_fitted_reference_scores_stored_and_new_embeddings(engine: Engine) -> None:
    for index in range(4):
        add_embedded(engine, f"1.9.{index}", f"1.9.{index}.1", near())
    stored = guard.stored_profiles(engine, "ct-embedding", None, None)
    assert sorted(stored.profiles) == [f"1.9.{i}.1" for i in range(4)]
    fitted = guard.fit(stored.profiles, stored.studies)
    assert guard.save_reference(engine, "ct-embedding", fitted, 1.5) == 4
    with engine.connect() as conn:
        distances = conn.execute(select(Embedding.guard_distance)).scalars().all()
    assert all(d is not None and d < 1.5 for d in distances)

    # a new series' embedding job: scored in its outcome, its series routed again
    series_id = add_embedded(engine, "1.9.8", "1.9.8.1", near())
    result, routed = embedding_job(engine, series_id, CENTRE[::-1].copy())
    with engine.connect() as conn:
        score = guard.series_score(conn, series_id, 1)
    assert result["guard_distance"] > 1.5 and result["guard_threshold"] == 1.5
    assert routed == 0  # the router takes the series again, now with its guard distance
    assert score is not None and score.unlike and score.reference_series == 4
    assert score.distance == result["guard_distance"]


def test_without_a_reference_an_embedding_is_stored_unscored(engine: Engine) -> None:
    series_id = add_embedded(engine, "1.9.9", "1.9.9.1", near())
    result, routed = embedding_job(engine, series_id, near())
    with engine.connect() as conn:
        assert guard.series_score(conn, series_id, 1) is None
    assert result["guard_distance"] is None and routed == 1


def test_guard_and_probe_fit_from_the_command_line(tmp_path: Path) -> None:
    """`ainode guard fit` and `ainode probe fit` on a node's stored embeddings."""
    database = f"sqlite:///{tmp_path}/db.sqlite"
    config = tmp_path / "node.yaml"
    config.write_text(
        f"database: {{url: '{database}'}}\nstorage: {{path: '{tmp_path}/store'}}\n"
        "node: {accept_unknown_peers: true}\n"
        "pipelines:\n  ct-embedding: {model: {path: /models/ct-fm.pt}}\n"
    )
    engine = make_engine(database)
    upgrade(engine)
    for index in range(4):
        add_embedded(engine, f"1.9.{index}", f"1.9.{index}.1", near())
    engine.dispose()

    neither = ainode("guard", "fit", "--config", str(config))
    assert neither.returncode == 2 and "--since or --series-list" in neither.stderr
    fitted = ainode("guard", "fit", "--config", str(config), "--since", "2020-01-01")
    assert fitted.returncode == 0, fitted.stderr
    assert "reference of 4 series for ct-embedding" in fitted.stdout
    assert "threshold 1.5; 4 stored series scored" in fitted.stdout
    status = ainode("status", "--config", str(config))
    assert "guard ct-embedding: reference of 4 series" in status.stdout
    assert "0 of 4 scored series unlike it" in status.stdout

    labels = tmp_path / "labels.csv"
    labels.write_text(
        "series_instance_uid,label\n1.9.0.1,covid\n1.9.1.1,normal\n1.9.2.1,covid\n"
        "1.9.3.1,normal\n1.9.7.1,covid\n"
    )
    probe = ainode("probe", "fit", "--config", str(config), "--labels", str(labels))
    assert probe.returncode == 2 and "--name" in probe.stderr
    probe = ainode(
        "probe", "fit", "--config", str(config), "--labels", str(labels), "--name", "triage"
    )
    assert probe.returncode == 0, probe.stderr
    assert "1 labelled series have no ct-embedding embedding" in probe.stderr
    assert "leave-one-out:" in probe.stdout and "of 4 right" in probe.stdout
    assert "4 series prove the plumbing, not the accuracy" in probe.stdout
    written = load_probe(tmp_path / "store" / "probes" / "triage.json")
    assert [c.label for c in written.classes] == ["covid", "normal"]
    assert written.embedding_pipeline == "ct-embedding" and written.model_version == "1.0"
