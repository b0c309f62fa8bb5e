"""The series input guard: how unlike a site's reference series a new series is.

`ainode guard fit` builds a reference from the stored embedding profiles of series the site
trusts (`networks.axial_profile`: the foundation model's features in five spans along the
body axis); every later embedding job scores its series against it. The score is the
distance from the series' profile (unit length) to the nearest reference profile, divided by
the reference's median leave-one-study-out distance: a new series like the reference scores
about 1, and rules (`guard_distance: {gt: 1.5}`) hold model pipelines off series far from it.

Why the nearest neighbour and not a Mahalanobis distance: a site's reference is a mixture
(scanners, protocols, kernels), which one Gaussian describes badly, and it starts with a
handful of series. Measured on the real series (`make eval`), a Ledoit-Wolf shrunk
Mahalanobis distance scored a held-out real scan (the CAP case) farther than every flipped,
noised or abdomen-only scan; the nearest-neighbour distance put all twenty perturbed scans
above every held-out real one. The reference is kept as its profiles (float32; 1,000 series
of 10,240 features are 41 MB).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import Connection, Engine, select, update

from node.store.db.models import Embedding, GuardReference, Series, Study, utcnow
from node.store.db.upsert import upsert

log = logging.getLogger(__name__)

MIN_REFERENCE = 3
"""Fewest series a reference needs, from at least two studies (its scale is a median of
leave-one-study-out distances)."""
DEFAULT_THRESHOLD = 1.5
"""The distance above which a series is reported unlike the reference when the fit is given
no threshold: half as far again from the reference as a typical new series like it."""


def unit(profile: np.ndarray) -> np.ndarray:
    vector = np.asarray(profile, dtype=np.float64).reshape(-1)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


@dataclass(frozen=True)
class GuardModel:
    """A fitted reference: its unit-length profiles and the scale that makes a typical
    new series' distance 1."""

    profiles: np.ndarray
    scale: float = 1.0

    @property
    def dimensions(self) -> int:
        return int(self.profiles.shape[1])

    def raw_distance(self, profile: np.ndarray) -> float:
        """Euclidean distance of the unit profile to the nearest reference profile."""
        return float(np.min(np.linalg.norm(self.profiles - unit(profile), axis=1)))

    def distance(self, profile: np.ndarray) -> float:
        return self.raw_distance(profile) / self.scale

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, profiles=self.profiles.astype(np.float32), scale=np.float64(self.scale))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GuardModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(arrays["profiles"].astype(np.float64), float(arrays["scale"]))


@dataclass(frozen=True)
class FittedGuard:
    model: GuardModel
    held_out: dict[str, float]
    """Each reference series' distance to the others of other studies, in the guard's units."""


def fit(profiles: Mapping[str, np.ndarray], studies: Mapping[str, str]) -> FittedGuard:
    """A guard over `profiles` (series UID -> profile; `studies`: series UID -> its study).
    Each series is held out with the rest of its study (two kernels of one acquisition would
    otherwise vouch for each other). Raises ValueError when there are too few series or
    studies, or the profiles differ in length."""
    uids = list(profiles)
    if len(uids) < MIN_REFERENCE or len({studies[uid] for uid in uids}) < 2:
        raise ValueError(
            f"a reference needs at least {MIN_REFERENCE} series with a profile from two or more "
            f"studies, got {len(uids)} series"
        )
    lengths = {profiles[uid].size for uid in uids}
    if len(lengths) != 1:
        raise ValueError(f"the profiles differ in length: {sorted(lengths)}")
    data = np.stack([unit(profiles[uid]) for uid in uids])
    held_out = np.array(
        [
            GuardModel(data[[studies[other] != studies[uid] for other in uids]]).raw_distance(
                data[index]
            )
            for index, uid in enumerate(uids)
        ]
    )
    scale = float(np.median(held_out))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("the reference series are identical: no scale to measure against")
    scaled = {uid: float(d / scale) for uid, d in zip(uids, held_out, strict=True)}
    return FittedGuard(GuardModel(data, scale), scaled)


@dataclass(frozen=True)
class GuardScore:
    """A series' distance to its pipeline's reference, and whether it is beyond the
    reference's threshold."""

    distance: float
    threshold: float
    reference_series: int

    @property
    def unlike(self) -> bool:
        return self.distance > self.threshold


@dataclass(frozen=True)
class StoredReference:
    pipeline: str
    model_version: str
    threshold: float
    series: list[str]
    fitted_at: datetime
    model: GuardModel

    def score(self, profile: np.ndarray) -> GuardScore | None:
        """None when the profile is not of this reference's kind (another model's)."""
        if profile.size != self.model.dimensions:
            return None
        distance = round(self.model.distance(profile), 3)
        return GuardScore(distance, self.threshold, len(self.series))


@dataclass(frozen=True)
class StoredProfiles:
    profiles: dict[str, np.ndarray]
    """Series UID -> profile."""
    studies: dict[str, str]
    """Series UID -> Study Instance UID."""


def stored_profiles(
    engine: Engine, pipeline: str, series_uids: list[str] | None, since: datetime | None
) -> StoredProfiles:
    """The stored profiles of `pipeline`, of the listed series or those embedded since."""
    query = (
        select(Series.series_instance_uid, Study.study_instance_uid, Embedding.profile)
        .join(Series, Series.id == Embedding.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Embedding.pipeline == pipeline, Embedding.profile.is_not(None))
    )
    if series_uids is not None:
        query = query.where(Series.series_instance_uid.in_(series_uids))
    if since is not None:
        query = query.where(Embedding.created_at >= since)
    with engine.connect() as conn:
        rows = [row for row in conn.execute(query).all() if row.profile is not None]
    return StoredProfiles(
        {row.series_instance_uid: np.frombuffer(row.profile, np.float32) for row in rows},
        {row.series_instance_uid: row.study_instance_uid for row in rows},
    )


def save_reference(engine: Engine, pipeline: str, fitted: FittedGuard, threshold: float) -> int:
    """Store the reference of `pipeline` (replacing the last) and score every stored profile
    of that pipeline against it; returns how many were scored."""
    with engine.begin() as conn:
        version = conn.execute(
            select(Embedding.model_version)
            .join(Series, Series.id == Embedding.series_id)
            .where(
                Embedding.pipeline == pipeline,
                Series.series_instance_uid.in_(list(fitted.held_out)),
            )
            .limit(1)
        ).scalar_one()
        reference = StoredReference(
            pipeline, version, threshold, list(fitted.held_out), utcnow(), fitted.model
        )
        row = {
            "pipeline": pipeline,
            "model_version": version,
            "threshold": threshold,
            "series": reference.series,
            "fitted_at": reference.fitted_at,
            "model": fitted.model.to_bytes(),
        }
        upsert(conn, GuardReference, row, ["pipeline"])
        rows = conn.execute(
            select(Embedding.id, Embedding.profile).where(
                Embedding.pipeline == pipeline, Embedding.profile.is_not(None)
            )
        ).all()
        for embedding_id, profile in rows:
            score = reference.score(np.frombuffer(profile or b"", dtype=np.float32))
            conn.execute(
                update(Embedding)
                .where(Embedding.id == embedding_id)
                .values(guard_distance=None if score is None else score.distance)
            )
    return len(rows)


def score_profile(conn: Connection, pipeline: str, profile: np.ndarray) -> GuardScore | None:
    """The score of a new profile of `pipeline`; None without a reference (or of another
    model's kind)."""
    reference = _reference(conn, pipeline)
    return None if reference is None else reference.score(profile)


def series_score(conn: Connection, series_id: int, revision: int) -> GuardScore | None:
    """The series revision's guard score (the farthest, where several embedding pipelines
    scored it); None when none has."""
    row = conn.execute(
        select(Embedding.guard_distance, GuardReference.threshold, GuardReference.series)
        .join(GuardReference, GuardReference.pipeline == Embedding.pipeline)
        .where(
            Embedding.series_id == series_id,
            Embedding.revision == revision,
            Embedding.guard_distance.is_not(None),
        )
        .order_by(Embedding.guard_distance.desc())
        .limit(1)
    ).first()
    if row is None or row.guard_distance is None:
        return None
    return GuardScore(row.guard_distance, row.threshold, len(row.series))


def _reference(conn: Connection, pipeline: str) -> StoredReference | None:
    row = conn.execute(
        select(
            GuardReference.model_version,
            GuardReference.threshold,
            GuardReference.series,
            GuardReference.fitted_at,
            GuardReference.model,
        ).where(GuardReference.pipeline == pipeline)
    ).first()
    if row is None:
        return None
    return StoredReference(
        pipeline,
        row.model_version,
        row.threshold,
        list(row.series),
        row.fitted_at,
        GuardModel.from_bytes(row.model),
    )
