"""QIDO-RS (PS3.18 10.6) over the catalog: studies, series and instances the node holds
(received, fetched, and its own results), matched on the attributes the catalog keeps.

Matching: single values, UID lists (comma or backslash separated), `*`/`?` wildcards,
date and time ranges (`20240101-20241231`, `-20240101`, `20240101-`). Keys the node cannot
match are ignored and named in a Warning header (PS3.18 8.3.4.1). `limit`, `offset` and
`includefield` work as usual; every attribute the catalog has is always returned.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from sqlalchemy import ColumnElement, Connection, Select, and_, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, aliased

from node.config import Role
from node.ops.logs import escaped
from node.store.db.models import Instance, Series, Study
from node.web.context import Context, WebContext, requires, retrieve_url
from node.web.dicom_json import dicom_json_response
from node.web.multipart import accepted

router = APIRouter(dependencies=[Depends(requires(Role.READER))])

CONTROL_KEYS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
MAX_RESULTS = 10_000
MAX_OFFSET = 2**31 - 1
MAX_MATCHING_KEYS = 64
"""Query parameters that match; more is no query a client makes (each one deepens the SQL)."""
MAX_UIDS = 1000
"""UIDs in one list-of-UIDs match."""
FORMATS = {
    "date": re.compile(r"\d{8}"),
    "time": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"),
}
INT32 = range(-(2**31), 2**31)


@dataclass(frozen=True)
class Key:
    """A matching key: the column it reads, and how its value is matched."""

    column: InstrumentedAttribute[Any]
    kind: str  # "uid", "text", "name", "date", "time", "number"


STUDY_KEYS = {
    "StudyInstanceUID": Key(Study.study_instance_uid, "uid"),
    "PatientID": Key(Study.patient_id, "text"),
    "PatientName": Key(Study.patient_name, "name"),
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
STUDY_ATTRIBUTES = (
    ("StudyInstanceUID", Study.study_instance_uid),
    ("StudyDate", Study.study_date),
    ("StudyTime", Study.study_time),
    ("AccessionNumber", Study.accession_number),
    ("ReferringPhysicianName", Study.referring_physician_name),
    ("PatientName", Study.patient_name),
    ("PatientID", Study.patient_id),
    ("PatientBirthDate", Study.patient_birth_date),
    ("PatientSex", Study.patient_sex),
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
RETURNED = {
    "study": {
        *(k for k, _ in STUDY_ATTRIBUTES),
        "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
        "RetrieveURL",
    },
    "series": {
        *(k for k, _ in SERIES_ATTRIBUTES), "StudyInstanceUID",
        "NumberOfSeriesRelatedInstances", "RetrieveURL",
    },
    "instance": {
        *(k for k, _ in INSTANCE_ATTRIBUTES), *(k for k, _ in IMAGE_ATTRIBUTES),
        "StudyInstanceUID", "SeriesInstanceUID", "Modality", "InstanceAvailability",
        "RetrieveURL",
    },
}  # fmt: skip
"""What each level answers, whatever `includefield` asks (the catalog keeps no more)."""


@router.get("/studies", response_class=Response)
def search_studies(request: Request, context: Context) -> Response:
    return _search(request, context, "study", {})


@router.get("/series", response_class=Response)
@router.get("/studies/{study}/series", response_class=Response)
def search_series(request: Request, context: Context, study: str | None = None) -> Response:
    return _search(request, context, "series", {"StudyInstanceUID": study})


@router.get("/instances", response_class=Response)
@router.get("/studies/{study}/instances", response_class=Response)
@router.get("/studies/{study}/series/{series}/instances", response_class=Response)
def search_instances(
    request: Request,
    context: Context,
    study: str | None = None,
    series: str | None = None,
) -> Response:
    fixed = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return _search(request, context, "instance", fixed)


def _search(
    request: Request, context: WebContext, level: str, fixed: dict[str, str | None]
) -> Response:
    _check_accept(request.headers.get("accept"))
    keys = {**STUDY_KEYS}
    if level in ("series", "instance"):
        keys.update(SERIES_KEYS)
    if level == "instance":
        keys.update(INSTANCE_KEYS)
    criteria, ignored = _criteria(request, keys)
    criteria.extend(keys[name].column == value for name, value in fixed.items() if value)
    limit, offset = _paging(request)
    statement, build = _QUERIES[level](criteria)
    base = context.base_url(request)
    with context.engine.connect() as conn:
        rows = conn.execute(statement.limit(limit).offset(offset)).all()
        datasets = [build(row, base) for row in rows]
        if level == "study":
            in_study = _modalities(conn, [row.id for row in rows])
            for row, ds in zip(rows, datasets, strict=True):
                ds.ModalitiesInStudy = in_study.get(row.id, [])
    response = dicom_json_response(datasets)
    warnings = []
    if ignored:
        warnings.append(f"not matched (unsupported keys): {', '.join(sorted(ignored))}")
    absent = _not_returned(request, level)
    if absent:
        warnings.append(f"includefield not kept by this node: {', '.join(sorted(absent))}")
    if request.query_params.get("fuzzymatching", "").lower() == "true":
        warnings.append("fuzzymatching is not supported: names were matched as given")
    if warnings:
        response.headers["Warning"] = ", ".join(f'299 ainode "{_quotable(t)}"' for t in warnings)
    return response


def _quotable(text: str) -> str:
    """`text` fit for a quoted string in a header: ASCII, no control characters, quotes
    escaped (the names in it are the client's, whatever it sent)."""
    ascii_text = escaped(text).encode("ascii", "backslashreplace").decode("ascii")
    return ascii_text.replace("\\", "\\\\").replace('"', '\\"')


def _not_returned(request: Request, level: str) -> set[str]:
    """The attributes `includefield` names that this level does not answer."""
    asked = {
        name.strip()
        for value in request.query_params.getlist("includefield")
        for name in value.split(",")
        if name.strip() and name.strip().lower() != "all"
    }
    return {name for name in asked if _keyword(name) not in RETURNED[level]}


JSON_TYPES = frozenset({"application/dicom+json", "application/json", "application/*", "*/*"})


def _check_accept(accept: str | None) -> None:
    """406 unless the client takes DICOM JSON (the node answers in no other form)."""
    if not accept:
        return
    kinds = {kind for kind, _ in accepted(accept, "*/*")}
    if kinds.isdisjoint(JSON_TYPES):
        raise HTTPException(406, detail="QIDO-RS answers in application/dicom+json only")


def _criteria(request: Request, keys: dict[str, Key]) -> tuple[list[ColumnElement[bool]], set[str]]:
    """The matching criteria, and the keys the node cannot match."""
    criteria: list[ColumnElement[bool]] = []
    modalities: list[str] = []
    ignored: set[str] = set()
    matching = [
        (name, value)
        for name, value in request.query_params.multi_items()
        if name not in CONTROL_KEYS and value
    ]
    if len(matching) > MAX_MATCHING_KEYS:
        raise HTTPException(400, detail=f"at most {MAX_MATCHING_KEYS} matching keys per query")
    for raw_name, value in matching:
        name = _keyword(raw_name)
        if name == "ModalitiesInStudy":
            modalities.extend(m for m in value.replace("\\", ",").split(",") if m)
            continue
        key = keys.get(name)
        if key is None:
            ignored.add(raw_name)
            continue
        criteria.append(_match(key, value))
    if modalities:  # the study has a series of one of them (at every level)
        other = aliased(Series)
        criteria.append(exists().where(other.study_id == Study.id, other.modality.in_(modalities)))
    return criteria, ignored


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


def _keyword(name: str) -> str:
    """A keyword, also when given as a tag (`0020000D`)."""
    if len(name) == 8:
        try:
            return keyword_for_tag(int(name, 16)) or name
        except ValueError:
            return name
    return name


def _match(key: Key, value: str) -> ColumnElement[bool]:
    column = key.column
    if key.kind == "uid":
        uids = [v.strip() for v in value.replace("\\", ",").split(",", MAX_UIDS) if v.strip()]
        if len(uids) > MAX_UIDS:
            raise HTTPException(400, detail=f"at most {MAX_UIDS} UIDs in one list")
        return column.in_(uids)
    if key.kind == "number":
        if not value.lstrip("-").isdigit() or int(value) not in INT32:
            raise HTTPException(400, detail=f"{column.key} is matched by a whole number")
        return column == int(value)
    if key.kind in FORMATS:
        return _range(column, key.kind, value)
    wildcard = "*" in value or "?" in value
    if wildcard or key.kind == "name":  # person names match without regard to case
        pattern = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = pattern.replace("*", "%").replace("?", "_")
        return column.ilike(pattern, escape="\\")
    return column == value


def _range(column: InstrumentedAttribute[Any], kind: str, value: str) -> ColumnElement[bool]:
    """A date or time, or a range of them (`low-high`, `-high`, `low-`); 400 when a bound
    is not a DICOM date (YYYYMMDD) or time (HHMMSS.FFFFFF, shortened from the right)."""
    low, dash, high = value.partition("-")
    bounds = [bound for bound in (low, high) if bound]
    if not bounds or not all(FORMATS[kind].fullmatch(bound) for bound in bounds):
        raise HTTPException(400, detail=f"{column.key}: not a DICOM {kind} or range of them")
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
        raise HTTPException(400, detail=f"not a calendar date: {exc}") from exc


def _paging(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit", MAX_RESULTS))
        offset = int(request.query_params.get("offset", 0))
    except ValueError as exc:
        raise HTTPException(400, detail="limit and offset are whole numbers") from exc
    if limit < 0 or offset < 0 or offset > MAX_OFFSET:
        raise HTTPException(400, detail=f"limit and offset are whole numbers to {MAX_OFFSET}")
    return min(limit, MAX_RESULTS), offset


Builder = Callable[[Any, str], Dataset]


def _study_query(
    criteria: list[ColumnElement[bool]],
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
        .where(*criteria)
        .order_by(Study.id)
    )

    def build(row: Any, base: str) -> Dataset:
        ds = _attributes(row, STUDY_ATTRIBUTES)
        ds.NumberOfStudyRelatedSeries = row.series_count
        ds.NumberOfStudyRelatedInstances = row.instance_count
        ds.RetrieveURL = retrieve_url(base, row.study_instance_uid)
        return ds

    return statement, build


def _series_query(
    criteria: list[ColumnElement[bool]],
) -> tuple[Select[*tuple[Any, ...]], Builder]:
    statement = (
        select(
            Study.study_instance_uid,
            *(column for _, column in SERIES_ATTRIBUTES),
            Series.instance_count,
        )
        .join(Study, Series.study_id == Study.id)
        .where(*criteria)
        .order_by(Series.series_number, Series.id)
    )

    def build(row: Any, base: str) -> Dataset:
        ds = _attributes(row, SERIES_ATTRIBUTES)
        ds.StudyInstanceUID = row.study_instance_uid
        ds.NumberOfSeriesRelatedInstances = row.instance_count
        ds.RetrieveURL = retrieve_url(base, row.study_instance_uid, ds.SeriesInstanceUID)
        return ds

    return statement, build


def _instance_query(
    criteria: list[ColumnElement[bool]],
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
        .where(*criteria)
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )

    def build(row: Any, base: str) -> Dataset:
        ds = _attributes(row, INSTANCE_ATTRIBUTES)
        ds.StudyInstanceUID = row.study_instance_uid
        ds.SeriesInstanceUID = row.series_instance_uid
        ds.Modality = row.modality
        ds.InstanceAvailability = "ONLINE"
        for keyword, column in IMAGE_ATTRIBUTES:  # unknown for rows received before 0015
            if (value := getattr(row, column.key)) is not None:
                setattr(ds, keyword, value)
        ds.RetrieveURL = retrieve_url(
            base, row.study_instance_uid, row.series_instance_uid, ds.SOPInstanceUID
        )
        return ds

    return statement, build


_QUERIES = {"study": _study_query, "series": _series_query, "instance": _instance_query}


def _attributes(row: Any, attributes: Sequence[tuple[str, Any]]) -> Dataset:
    ds = Dataset()
    for keyword, column in attributes:
        setattr(ds, keyword, getattr(row, column.key))
    return ds
