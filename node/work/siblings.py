"""The other reconstructions of the acquisition a job's series belongs to: CT series of its
study with its frame of reference, acquired in the same minute (`by_acquisition`, the
grouping a rule's `select: {per: acquisition}` uses). The SR lists their instances as
evidence and names them in words, so a reader knows which of several reconstructions the
measurements were made on, and which were left aside."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from sqlalchemy import Connection, Engine, select

from node.flow.routing.engine import SeriesFacts, by_acquisition
from node.flow.routing.router import NoInstanceLeft, stored_series_facts
from node.store.db.models import Instance, Series, SeriesState, Study


@dataclass(frozen=True)
class Reconstruction:
    """A sibling series as the SR names it, with its instances (SOP class, SOP instance)."""

    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    description: str | None
    kernel: str | None
    instances: tuple[tuple[str, str], ...]

    def described(self) -> str:
        number = f"series {self.series_number}" if self.series_number is not None else "series"
        title = f' "{self.description}"' if self.description else ""
        kernel = f", kernel {self.kernel}" if self.kernel else ""
        return f"{number}{title}{kernel} ({len(self.instances)} images)"


def other_reconstructions(
    engine: Engine, storage_root: Path, series_id: int
) -> list[Reconstruction]:
    """The complete CT series that are other reconstructions of `series_id`'s acquisition,
    by series number; a series whose stored header cannot be read is left out."""
    with engine.connect() as conn:
        study_id, study_uid = conn.execute(
            select(Study.id, Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .where(Series.id == series_id)
        ).one()
        rows = conn.execute(
            select(
                Series.id,
                Series.series_instance_uid,
                Series.series_number,
                Series.series_description,
                Series.convolution_kernel,
                Series.image_type,
            )
            .where(Series.study_id == study_id, Series.modality == "CT")
            .where((Series.id == series_id) | (Series.state == SeriesState.COMPLETE))
        ).all()
    facts: dict[int, SeriesFacts] = {}
    for row in rows:
        if _is_localizer(row.image_type):
            continue
        try:  # what routing's per-acquisition selection reads of a series
            facts[row.id] = stored_series_facts(engine, storage_root, row.id)
        except (NoInstanceLeft, OSError, InvalidDicomError, ValueError):
            continue
    if series_id not in facts:
        return []
    own = facts[series_id].series_instance_uid
    group = next(_uids(g) for g in by_acquisition(list(facts.values())) if own in _uids(g))
    siblings = [row for row in rows if row.series_instance_uid in group and row.id != series_id]
    with engine.connect() as conn:
        return [
            _reconstruction(conn, row, study_uid)
            for row in sorted(siblings, key=lambda row: (row.series_number or 0, row.id))
        ]


def _uids(group: list[SeriesFacts]) -> set[str]:
    return {facts.series_instance_uid for facts in group}


def _is_localizer(image_type: str | None) -> bool:
    return "LOCALIZER" in (image_type or "").upper()


def _reconstruction(conn: Connection, series: Any, study_uid: str) -> Reconstruction:
    """`series`: a row of `other_reconstructions` (id, UID, number, description, kernel)."""
    instances = conn.execute(
        select(Instance.sop_class_uid, Instance.sop_instance_uid)
        .where(Instance.series_id == series.id)
        .order_by(Instance.instance_number, Instance.sop_instance_uid)
    ).all()
    return Reconstruction(
        study_uid,
        series.series_instance_uid,
        series.series_number,
        series.series_description,
        series.convolution_kernel,
        tuple((row.sop_class_uid, row.sop_instance_uid) for row in instances),
    )
