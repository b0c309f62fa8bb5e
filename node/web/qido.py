"""QIDO-RS (PS3.18 10.6) over the catalog: studies, series and instances the node holds
(received, fetched, and its own results), matched by `node.store.query` (the matcher C-FIND
uses too). Keys the node cannot match are ignored and named in a Warning header
(PS3.18 8.3.4.1). `limit`, `offset` and `includefield` work as usual; every attribute the
catalog has is always returned.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag

from node.ops.logs import escaped
from node.roles import Role
from node.store.query import RETURNED, Criteria, Level, QueryError, criteria, find
from node.web.context import Context, WebContext, requires, retrieve_url
from node.web.dicom_json import dicom_json_response
from node.web.multipart import accepted

router = APIRouter(dependencies=[Depends(requires(Role.READER))])

CONTROL_KEYS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
MAX_RESULTS = 10_000
MAX_OFFSET = 2**31 - 1
MAX_MATCHING_KEYS = 64
"""Query parameters that match; more is no query a client makes (each one deepens the SQL)."""
URL_ATTRIBUTE = "RetrieveURL"


@router.get("/studies", response_class=Response)
def search_studies(request: Request, context: Context) -> Response:
    return _search(request, context, Level.STUDY, {})


@router.get("/series", response_class=Response)
@router.get("/studies/{study}/series", response_class=Response)
def search_series(request: Request, context: Context, study: str | None = None) -> Response:
    return _search(request, context, Level.SERIES, {"StudyInstanceUID": study})


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
    return _search(request, context, Level.INSTANCE, fixed)


def _search(
    request: Request, context: WebContext, level: Level, fixed: dict[str, str | None]
) -> Response:
    _check_accept(request.headers.get("accept"))
    query = _criteria(request, level, fixed)
    limit, offset = paging(request)
    base = context.base_url(request)
    with context.engine.connect() as conn:
        datasets = find(conn, query, limit, offset)
    for ds in datasets:
        ds.RetrieveURL = _retrieve_url(base, level, ds)
    response = dicom_json_response(datasets)
    warnings = []
    if query.ignored:
        warnings.append(f"not matched (unsupported keys): {', '.join(sorted(query.ignored))}")
    absent = _not_returned(request, level)
    if absent:
        warnings.append(f"includefield not kept by this node: {', '.join(sorted(absent))}")
    if request.query_params.get("fuzzymatching", "").lower() == "true":
        warnings.append("fuzzymatching is not supported: names were matched as given")
    if warnings:
        response.headers["Warning"] = warning(warnings)
    return response


def _retrieve_url(base: str, level: Level, ds: Dataset) -> str:
    if level == Level.STUDY:
        return retrieve_url(base, ds.StudyInstanceUID)
    if level == Level.SERIES:
        return retrieve_url(base, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    return retrieve_url(base, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def warning(texts: list[str]) -> str:
    """A Warning header of `texts` (RFC 9110 warn-code 299)."""
    return ", ".join(f'299 ainode "{_quotable(text)}"' for text in texts)


def _quotable(text: str) -> str:
    """`text` fit for a quoted string in a header: ASCII, no control characters, quotes
    escaped (the names in it are the client's, whatever it sent)."""
    ascii_text = escaped(text).encode("ascii", "backslashreplace").decode("ascii")
    return ascii_text.replace("\\", "\\\\").replace('"', '\\"')


def _not_returned(request: Request, level: Level) -> set[str]:
    """The attributes `includefield` names that this level does not answer."""
    asked = {
        name.strip()
        for value in request.query_params.getlist("includefield")
        for name in value.split(",")
        if name.strip() and name.strip().lower() != "all"
    }
    returned = RETURNED[level] | {URL_ATTRIBUTE}
    return {name for name in asked if keyword_of(name) not in returned}


JSON_TYPES = frozenset({"application/dicom+json", "application/json", "application/*", "*/*"})


def _check_accept(accept: str | None) -> None:
    """406 unless the client takes DICOM JSON (the node answers in no other form)."""
    if not accept:
        return
    kinds = {kind for kind, _ in accepted(accept, "*/*")}
    if kinds.isdisjoint(JSON_TYPES):
        raise HTTPException(406, detail="QIDO-RS answers in application/dicom+json only")


def _criteria(request: Request, level: Level, fixed: dict[str, str | None]) -> Criteria:
    """The query's criteria (400 for a value that cannot be matched); the keys the node
    cannot match are named by the client's spelling."""
    matching = [
        (name, value)
        for name, value in request.query_params.multi_items()
        if name not in CONTROL_KEYS and value
    ]
    if len(matching) > MAX_MATCHING_KEYS:
        raise HTTPException(400, detail=f"at most {MAX_MATCHING_KEYS} matching keys per query")
    spelled = {keyword_of(name): name for name, _ in matching}
    pairs = [(keyword_of(name), value) for name, value in matching]
    pairs.extend((name, value) for name, value in fixed.items() if value)
    try:
        query = criteria(level, pairs)
    except QueryError as exc:
        raise HTTPException(400, detail=str(exc)) from exc
    query.ignored = {spelled.get(name, name) for name in query.ignored}
    return query


def keyword_of(name: str) -> str:
    """A keyword, also when given as a tag (`0020000D`)."""
    if len(name) == 8:
        try:
            return keyword_for_tag(int(name, 16)) or name
        except ValueError:
            return name
    return name


def paging(request: Request, most: int = MAX_RESULTS) -> tuple[int, int]:
    """`limit` (at most `most`) and `offset`; 400 when they are not whole numbers in range."""
    try:
        limit = int(request.query_params.get("limit", most))
        offset = int(request.query_params.get("offset", 0))
    except ValueError as exc:
        raise HTTPException(400, detail="limit and offset are whole numbers") from exc
    if limit < 0 or offset < 0 or offset > MAX_OFFSET:
        raise HTTPException(400, detail=f"limit and offset are whole numbers to {MAX_OFFSET}")
    return min(limit, most), offset
