"""Series embeddings (from `ct-embedding`, stored by `node.work.outcome`), searched by cosine
similarity for `ainode similar`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, select

from node.store.db.models import Embedding, Series, Study


@dataclass(frozen=True)
class SimilarSeries:
    """One line of `ainode similar` (JSON: a `similar` list of these)."""

    series_instance_uid: str
    study_instance_uid: str
    similarity: float
    series_description: str | None
    received_at: str


def stored_embeddings(
    engine: Engine, pipeline: str, series_uids: list[str]
) -> tuple[dict[str, np.ndarray], str | None]:
    """The embeddings of `pipeline` of the listed series (UID -> vector), and the model
    version most of them were made with (only those of that version are returned)."""
    query = (
        select(Series.series_instance_uid, Embedding.model_version, Embedding.vector)
        .join(Series, Series.id == Embedding.series_id)
        .where(Embedding.pipeline == pipeline, Series.series_instance_uid.in_(series_uids))
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    versions = [row.model_version for row in rows]
    version = max(set(versions), key=versions.count) if versions else None
    return {
        row.series_instance_uid: np.frombuffer(row.vector, dtype=np.float32)
        for row in rows
        if row.model_version == version
    }, version


class NoEmbedding(LookupError):
    """The series has no embedding (not received, or ct-embedding has not run on it)."""


def most_similar(engine: Engine, series_instance_uid: str, top: int = 5) -> list[SimilarSeries]:
    """The `top` other series whose embeddings (same pipeline and dimensions) are closest
    to this series' one by cosine similarity, most similar first."""
    query = (
        select(
            Series.series_instance_uid,
            Study.study_instance_uid,
            Series.series_description,
            Series.first_received_at,
            Embedding.pipeline,
            Embedding.dimensions,
            Embedding.vector,
        )
        .join(Series, Series.id == Embedding.series_id)
        .join(Study, Study.id == Series.study_id)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    target = next((r for r in rows if r.series_instance_uid == series_instance_uid), None)
    if target is None:
        raise NoEmbedding(f"series {series_instance_uid} has no embedding")
    others = [
        r
        for r in rows
        if r.series_instance_uid != series_instance_uid
        and (r.pipeline, r.dimensions) == (target.pipeline, target.dimensions)
    ]
    if not others:
        return []
    query_vector = np.frombuffer(target.vector, dtype=np.float32)
    matrix = np.stack([np.frombuffer(r.vector, dtype=np.float32) for r in others])
    scores = (
        matrix
        @ query_vector
        / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query_vector) + 1e-12)
    )
    order = np.argsort(-scores)[:top]
    return [
        SimilarSeries(
            others[i].series_instance_uid,
            others[i].study_instance_uid,
            round(float(scores[i]), 4),
            others[i].series_description,
            others[i].first_received_at.isoformat(),
        )
        for i in order
    ]
