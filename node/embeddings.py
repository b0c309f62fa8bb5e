"""Series embeddings (from `ct-embedding`): stored with the job's success, and searched by
cosine similarity for `ainode similar`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from node.db.models import Embedding, Series, Study, utcnow


@dataclass(frozen=True)
class SimilarSeries:
    """One line of `ainode similar` (JSON: a `similar` list of these)."""

    series_instance_uid: str
    study_instance_uid: str
    similarity: float
    series_description: str | None
    received_at: str


def store_embedding(
    conn: Connection, job: Mapping[str, Any], result: Mapping[str, object], vector: np.ndarray
) -> None:
    """Keep the series' embedding from this pipeline (a later revision replaces it)."""
    data = np.asarray(vector, dtype=np.float32)
    row = {
        "series_id": job["series_id"],
        "revision": job["revision"],
        "pipeline": job["pipeline"],
        "model_version": str(result.get("version", "")),
        "dimensions": int(data.size),
        "vector": data.tobytes(),
        "created_at": utcnow(),
    }
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(Embedding).values(row)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["series_id", "pipeline"],
            set_={k: insert.excluded[k] for k in row if k not in ("series_id", "pipeline")},
        )
    )


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
