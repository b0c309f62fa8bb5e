"""What the node holds, queried (PS3.4 C.2.2.2): the one matcher behind QIDO-RS and C-FIND.

A query is a level and matching keys by keyword, each a DICOM string value: empty or `*`
matches everything (universal), a UID list (backslash or comma separated) any of its UIDs,
`*` and `?` wildcards, date and time ranges (`20240101-20241231`, `-20240101`, `20240101-`).
Person names match without regard to case; other text exactly, wildcards included. Keys the
catalog does not keep are not matched: `Criteria.ignored` names them, and each front end says
so in its own way (a Warning header, a pending status of FF01).
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from sqlalchemy import ColumnElement, Connection, Engine, Select, and_, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, aliased

from node.store.db.models import Instance, Series, Study

MAX_UIDS = 1000
"""UIDs in one list-of-UIDs match."""
PAGE = 500
"""Rows read at a time when every match is wanted (`each_match`)."""
FORMATS = {
    "date": re.compile(r"\d{8}"),
    "time": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"),
}
INT32 = range(-(2**31), 2**31)


class Level(enum.StrEnum):
    """A query level (QIDO-RS resources; C-FIND's QueryRetrieveLevel, IMAGE as instance)."""

    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class QueryError(ValueError):
    """A matching key's value the node cannot read (not a date, not a number, too many
    UIDs): the query is refused with this message."""


@dataclass(frozen=True)
class Key:
    """A matching key: the column it reads, and how its value is matched."""

    column: InstrumentedAttribute[Any]
    kind: str  # "uid", "text", "name", "date", "time", "number"


PATIENT_KEYS = {
    "PatientID": Key(Study.patient_id, "text"),
    "PatientName": Key(Study.patient_name, "name"),
    "PatientBirthDate": Key(Study.patient_birth_date, "date"),
    "PatientSex": Key(Study.patient_sex, "text"),
}
STUDY_KEYS = {
    **PATIENT_KEYS,
    "StudyInstanceUID": Key(Study.study_instance_uid, "uid"),
    "AccessionNumber": Key(Study.accession_number, "text"),
    "StudyDate": Key(Study.study_date, "date"),
    "StudyTime": Key(Study.study_time, "time"),
    "StudyID": Key(Study.dicom_study_id, "text"),
    "StudyDescription": Key(Study.study_description, "text"),
    "ReferringPhysicianName": Key(Study.referring_physician_name, "name"),
}
SERIES_KEYS = {
    "SeriesInstanceUID": Key(Series.series_instance_uid, "uid"),
    "Modality": Key(Series.modality, "text"),
    "SeriesNumber": Key(Series.series_number, "number"),
    "SeriesDescription": Key(Series.series_description, "text"),
    "BodyPartExamined": Key(Series.body_part_examined, "text"),
}
INSTANCE_KEYS = {
    "SOPInstanceUID": Key(Instance.sop_instance_uid, "uid"),
    "SOPClassUID": Key(Instance.sop_class_uid, "uid"),
    "InstanceNumber": Key(Instance.instance_number, "number"),
}
KEYS: dict[Level, dict[str, Key]] = {
    Level.PATIENT: PATIENT_KEYS,
    Level.STUDY: STUDY_KEYS,
    Level.SERIES: {**STUDY_KEYS, **SERIES_KEYS},
    Level.INSTANCE: {**STUDY_KEYS, **SERIES_KEYS, **INSTANCE_KEYS},
}
"""What each level matches on: its own keys and those of the levels above it."""
PATIENT_ATTRIBUTES = (
    ("PatientName", Study.patient_name),
    ("PatientID", Study.patient_id),
    ("PatientBirthDate", Study.patient_birth_date),
    ("PatientSex", Study.patient_sex),
)
STUDY_ATTRIBUTES = (
    ("StudyInstanceUID", Study.study_instance_uid),
    ("StudyDate", Study.study_date),
    ("StudyTime", Study.study_time),
    ("AccessionNumber", Study.accession_number),
    ("ReferringPhysicianName", Study.referring_physician_name),
    *PATIENT_ATTRIBUTES,
    ("StudyID", Study.dicom_study_id),
    ("StudyDescription", Study.study_description),
)
SERIES_ATTRIBUTES = (
    ("SeriesInstanceUID", Series.series_instance_uid),
    ("Modality", Series.modality),
    ("SeriesNumber", Series.series_number),
    ("SeriesDescription", Series.series_description),
    ("BodyPartExamined", Series.body_part_examined),
)
INSTANCE_ATTRIBUTES = (
    ("SOPInstanceUID", Instance.sop_instance_uid),
    ("SOPClassUID", Instance.sop_class_uid),
    ("InstanceNumber", Instance.instance_number),
)
IMAGE_ATTRIBUTES = (
    ("Rows", Instance.rows),
    ("Columns", Instance.columns),
    ("BitsAllocated", Instance.bits_allocated),
    ("NumberOfFrames", Instance.number_of_frames),
)
RETURNED: dict[Level, frozenset[str]] = {
    Level.PATIENT: frozenset({
        *(k for k, _ in PATIENT_ATTRIBUTES),
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    }),
    Level.STUDY: frozenset({
        *(k for k, _ in STUDY_ATTRIBUTES),
        "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    }),
    Level.SERIES: frozenset({
        *(k for k, _ in SERIES_ATTRIBUTES), "StudyInstanceUID", "NumberOfSeriesRelatedInstances",
    }),
    Level.INSTANCE: frozenset({
        *(k for k, _ in INSTANCE_ATTRIBUTES), *(k for k, _ in IMAGE_ATTRIBUTES),
        "StudyInstanceUID", "SeriesInstanceUID", "Modality", "InstanceAvailability",
    }),
}  # fmt: skip
"""What each level answers (the catalog keeps no more)."""


@dataclass
class Criteria:
    """A query's conditions, and the keys asked for that the node cannot match."""

    level: Level
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    ignored: set[str] = field(default_factory=set)


def criteria(level: Level, matching: Iterable[tuple[str, str]]) -> Criteria:
    """The conditions of `matching` (keyword, value) pairs at `level`; QueryError for a
    value that cannot be matched. `ModalitiesInStudy` matches the studies with a series of
    one of its modalities, at every level."""
    found = Criteria(level)
    keys = KEYS[level]
    modalities: list[str] = []
    for name, value in matching:
        value = value.strip()
        if name == "ModalitiesInStudy":
            modalities.extend(m.strip() for m in re.split(r"[\\,]", value) if m.strip())
            continue
        key = keys.get(name)
        if key is None:
            if value:
                found.ignored.add(name)
            continue
        if value and value != "*":
            found.conditions.append(_match(key, value))
    if modalities and "*" not in modalities:
        other = aliased(Series)
        found.conditions.append(
            exists().where(other.study_id == Study.id, other.modality.in_(modalities))
        )
    return found


def find(
    conn: Connection, query: Criteria, limit: int | None = None, offset: int = 0
) -> list[Dataset]:
    """The matches of `query` in catalog order, each with every attribute `RETURNED` at its
    level (a value the catalog does not have is empty)."""
    statement, build = _QUERIES[query.level](query.conditions)
    rows = conn.execute(statement.limit(limit).offset(offset)).all()
    datasets = [build(row) for row in rows]
    if query.level == Level.STUDY:
        in_study = _modalities(conn, [row.id for row in rows])
        for row, ds in zip(rows, datasets, strict=True):
            ds.ModalitiesInStudy = in_study.get(row.id, [])
    return datasets


def each_match(engine: Engine, query: Criteria) -> Iterator[Dataset]:
    """Every match of `query`, read `PAGE` rows at a time, each page in a transaction of
    its own (a slow reader of the matches holds no transaction)."""
    offset = 0
    while True:
        with engine.connect() as conn:
            page = find(conn, query, PAGE, offset)
        if not page:
            return
        yield from page
        offset += len(page)


@dataclass(frozen=True)
class StoredFile:
    """An instance as stored: where its file is, and what a sender must propose for it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str


def stored_files(conn: Connection, storage: Path, query: Criteria) -> list[StoredFile]:
    """The instances under the matches of `query` (every level matched as instances)."""
    statement = (
        select(
            Instance.path,
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            Study.study_instance_uid,
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(*query.conditions)
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )
    return [StoredFile(storage / row.path, *row[1:]) for row in conn.execute(statement)]


def _match(key: Key, value: str) -> ColumnElement[bool]:
    column = key.column
    if key.kind == "uid":
        uids = [v.strip() for v in re.split(r"[\\,]", value, maxsplit=MAX_UIDS) if v.strip()]
        if len(uids) > MAX_UIDS:
            raise QueryError(f"at most {MAX_UIDS} UIDs in one list")
        return column.in_(uids)
    if key.kind == "number":
        if not value.lstrip("-").isdigit() or int(value) not in INT32:
            raise QueryError(f"{column.key} is matched by a whole number")
        return column == int(value)
    if key.kind in FORMATS:
        return _range(column, key.kind, value)
    wildcard = "*" in value or "?" in value
    if key.kind == "name":  # person names match without regard to case (PS3.4 C.2.2.2.1)
        pattern = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.ilike(pattern.replace("*", "%").replace("?", "_"), escape="\\")
    if wildcard:  # other text keeps its case, wildcards or not
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
        return column.regexp_match(f"^{pattern}$")
    return column == value


def _range(column: InstrumentedAttribute[Any], kind: str, value: str) -> ColumnElement[bool]:
    """A date or time, or a range of them (`low-high`, `-high`, `low-`); QueryError when a
    bound is not a DICOM date (YYYYMMDD) or time (HHMMSS.FFFFFF, shortened from the right)."""
    low, dash, high = value.partition("-")
    bounds = [bound for bound in (low, high) if bound]
    if not bounds or not all(FORMATS[kind].fullmatch(bound) for bound in bounds):
        raise QueryError(f"{column.key}: not a DICOM {kind} or range of them")
    if kind == "date":
        _check_dates(bounds)
    if not dash:
        return column == value
    return and_(*([column >= low] if low else []), *([column <= high] if high else []))


def _check_dates(dates: list[str]) -> None:
    try:
        for text in dates:
            datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as exc:
        raise QueryError(f"not a calendar date: {exc}") from exc


def _modalities(conn: Connection, study_ids: list[int]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    rows = conn.execute(
        select(Series.study_id, Series.modality)
        .where(Series.study_id.in_(study_ids), Series.modality.is_not(None))
        .distinct()
        .order_by(Series.modality)
    )
    for study_id, modality in rows:
        found.setdefault(study_id, []).append(str(modality))
    return found


Builder = Callable[[Any], Dataset]


def _patient_query(
    conditions: list[ColumnElement[bool]],
) -> tuple[Select[*tuple[Any, ...]], Builder]:
    """One match per patient ID (and the name, birth date and sex its studies give)."""
    columns = [column for _, column in PATIENT_ATTRIBUTES]
    series = select(Series.study_id, func.count(Series.id).label("count")).group_by(Series.study_id)
    instances = select(
        Series.study_id, func.coalesce(func.sum(Series.instance_count), 0).label("count")
    ).group_by(Series.study_id)
    series_counts, instance_counts = series.subquery(), instances.subquery()
    statement = (
        select(
            *columns,
            func.count(Study.id).label("studies"),
            func.coalesce(func.sum(series_counts.c.count), 0).label("series"),
            func.coalesce(func.sum(instance_counts.c.count), 0).label("instances"),
        )
        .outerjoin(series_counts, series_counts.c.study_id == Study.id)
        .outerjoin(instance_counts, instance_counts.c.study_id == Study.id)
        .where(*conditions)
        .group_by(*columns)
        .order_by(Study.patient_id, Study.patient_name)
    )

    def build(row: Any) -> Dataset:
        ds = _attributes(row, PATIENT_ATTRIBUTES)
        ds.NumberOfPatientRelatedStudies = row.studies
        ds.NumberOfPatientRelatedSeries = row.series
        ds.NumberOfPatientRelatedInstances = row.instances
        return ds

    return statement, build


def _study_query(
    conditions: list[ColumnElement[bool]],
) -> tuple[Select[*tuple[Any, ...]], Builder]:
    series_count = (
        select(func.count(Series.id)).where(Series.study_id == Study.id).scalar_subquery()
    )
    instance_count = (
        select(func.coalesce(func.sum(Series.instance_count), 0))
        .where(Series.study_id == Study.id)
        .scalar_subquery()
    )
    statement = (
        select(
            Study.id,
            *(column for _, column in STUDY_ATTRIBUTES),
            series_count.label("series_count"),
            instance_count.label("instance_count"),
        )
        .where(*conditions)
        .order_by(Study.id)
    )

    def build(row: Any) -> Dataset:
        ds = _attributes(row, STUDY_ATTRIBUTES)
        ds.NumberOfStudyRelatedSeries = row.series_count
        ds.NumberOfStudyRelatedInstances = row.instance_count
        return ds

    return statement, build


def _series_query(
    conditions: list[ColumnElement[bool]],
) -> tuple[Select[*tuple[Any, ...]], Builder]:
    statement = (
        select(
            Study.study_instance_uid,
            *(column for _, column in SERIES_ATTRIBUTES),
            Series.instance_count,
        )
        .join(Study, Series.study_id == Study.id)
        .where(*conditions)
        .order_by(Series.series_number, Series.id)
    )

    def build(row: Any) -> Dataset:
        ds = _attributes(row, SERIES_ATTRIBUTES)
        ds.StudyInstanceUID = row.study_instance_uid
        ds.NumberOfSeriesRelatedInstances = row.instance_count
        return ds

    return statement, build


def _instance_query(
    conditions: list[ColumnElement[bool]],
) -> tuple[Select[*tuple[Any, ...]], Builder]:
    statement = (
        select(
            Study.study_instance_uid,
            Series.series_instance_uid,
            Series.modality,
            *(column for _, column in INSTANCE_ATTRIBUTES),
            *(column for _, column in IMAGE_ATTRIBUTES),
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(*conditions)
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )

    def build(row: Any) -> Dataset:
        ds = _attributes(row, INSTANCE_ATTRIBUTES)
        ds.StudyInstanceUID = row.study_instance_uid
        ds.SeriesInstanceUID = row.series_instance_uid
        ds.Modality = row.modality
        ds.InstanceAvailability = "ONLINE"
        for keyword, column in IMAGE_ATTRIBUTES:  # unknown for rows received before 0015
            if (value := getattr(row, column.key)) is not None:
                setattr(ds, keyword, value)
        return ds

    return statement, build


_QUERIES = {
    Level.PATIENT: _patient_query,
    Level.STUDY: _study_query,
    Level.SERIES: _series_query,
    Level.INSTANCE: _instance_query,
}


def _attributes(row: Any, attributes: Sequence[tuple[str, Any]]) -> Dataset:
    """The row's values as elements (built from their dictionary entries directly: a
    keyword assignment costs a lookup each, thousands per query)."""
    ds = Dataset()
    for keyword, column in attributes:
        tag, vr = _ENTRIES[keyword]
        ds.add(DataElement(tag, vr, getattr(row, column.key)))
    return ds


def _entry(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag, dictionary_VR(tag)


_ENTRIES = {
    keyword: _entry(keyword)
    for keyword, _ in (*PATIENT_ATTRIBUTES, *STUDY_ATTRIBUTES, *SERIES_ATTRIBUTES,
                       *INSTANCE_ATTRIBUTES, *IMAGE_ATTRIBUTES)
}  # fmt: skip
