"""What a fetch asks a source for, and how the studies found are chosen."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from pydantic import BaseModel, ConfigDict, model_validator


class FetchQuery(BaseModel):
    """A study by UID or accession number, or a patient's studies (optionally of one
    modality, since a date); for priors, before a date, without the current study, the
    `count` most recent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    since: date | None = None
    before: date | None = None
    exclude: str | None = None
    count: int | None = None

    @model_validator(mode="after")
    def _one_key(self) -> FetchQuery:
        keys = [k for k in (self.study, self.accession, self.patient_id) if k]
        if len(keys) != 1:
            raise ValueError("give one of study, accession or patient_id")
        return self

    def describe(self) -> str:
        """For logs: which key, never its value (accession numbers and patient IDs are PHI)."""
        if self.study:
            return f"study {self.study}"
        kind = "accession number" if self.accession else "patient"
        extra = f", {self.modality}" if self.modality else ""
        return f"by {kind}{extra}"


@dataclass(frozen=True)
class StudyHit:
    """A study a source holds that matched."""

    study_uid: str
    study_date: str | None
    modalities: tuple[str, ...]


def choose(query: FetchQuery, hits: list[StudyHit]) -> list[StudyHit]:
    """The hits the query wants: the date window and modality (sources may match loosely),
    without the excluded study; the `count` most recent."""
    wanted = []
    for hit in hits:
        if hit.study_uid == query.exclude:
            continue
        if query.modality and hit.modalities and query.modality not in hit.modalities:
            continue
        day = dicom_date(hit.study_date)
        if query.since and (day is None or day < query.since):
            continue
        if query.before and (day is None or day >= query.before):
            continue
        wanted.append(hit)
    wanted.sort(key=lambda hit: hit.study_date or "", reverse=True)
    return wanted[: query.count] if query.count else wanted


def dicom_date(value: str | None) -> date | None:
    """A DA value (YYYYMMDD) as a date; None when absent or not one."""
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])) if value else None
    except ValueError:
        return None
