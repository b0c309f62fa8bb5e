"""The routing rules over HTTP (`/api/v1/rules`): read them (reader); check a proposed text,
explain a stored series' routing with the current or proposed rules, replace the file,
reload it (admin). A rules text travels as the request body, as the file holds it
(`Content-Type: application/yaml`). Every change is recorded in the audit trail with the
file before and after."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from node.admin.report import RulesStatus, rules_status
from node.flow.routing import admin
from node.flow.routing.router import NoInstanceLeft
from node.flow.routing.rules import RulesError
from node.ops.audit import Action, AdminAction, record
from node.roles import Role
from node.web.auth import Principal
from node.web.context import Context, WebContext, requires

router = APIRouter(prefix="/api/v1/rules")
Admin = Annotated[Principal, Depends(requires(Role.ADMIN))]


class RulesFile(BaseModel):
    status: RulesStatus
    text: str | None


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    series: str
    """Series Instance UID of a stored series."""
    rules: str | None = None
    """A proposed rules text; the current file when absent."""


async def proposed_text(request: Request) -> str:
    """The request body as a rules text: at most `admin.MAX_RULES_BYTES`, UTF-8."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > admin.MAX_RULES_BYTES:
            raise HTTPException(
                413, detail=f"a rules file is at most {admin.MAX_RULES_BYTES} bytes"
            )
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(422, detail="the rules text is not UTF-8") from exc


Proposed = Annotated[str, Depends(proposed_text)]


@router.get("", dependencies=[Depends(requires(Role.READER))])
def read(context: Context) -> RulesFile:
    """The rules file's state and text."""
    status = rules_status(context.settings)
    text = None
    if context.settings.routing.rules_file is not None:
        try:
            text = admin.current_text(context.settings)
        except RulesError:
            text = None
    return RulesFile(status=status, text=text)


@router.post("/check")
async def check(context: Context, principal: Admin, text: Proposed) -> admin.RulesCheck:
    """Check a proposed text (the body) for the rules file, or the file itself (no body):
    valid, or every problem with its FILE:LINE:COLUMN."""
    _rules_file(context)
    return await run_in_threadpool(admin.check, context.settings, text or None)


@router.post("/explain")
def explain(request: ExplainRequest, context: Context, principal: Admin) -> admin.Explanation:
    """How a stored series is routed by the current rules, or by proposed ones."""
    settings = context.settings
    file = _rules_file(context)
    try:
        if request.rules is None:
            rules = admin.parse(settings, admin.current_text(settings), file)
        else:
            rules = admin.parse(settings, request.rules, admin.proposed(file))
    except RulesError as exc:
        raise _invalid(exc) from exc
    try:
        facts = admin.stored_facts(settings, context.engine, request.series)
    except admin.UnknownSeries as exc:
        raise HTTPException(404, detail=f"no series {request.series}") from exc
    except (NoInstanceLeft, OSError, ValueError) as exc:
        raise HTTPException(409, detail=f"series {request.series}: {exc}") from exc
    return admin.explain(rules, facts)


@router.put("")
async def replace(context: Context, principal: Admin, text: Proposed) -> admin.Replaced:
    """Make the body the rules file: checked first (422 with its problems, nothing
    changed), written in one rename, the old file kept beside it."""
    return await run_in_threadpool(_replace, context, principal, text)


@router.post("/reload", status_code=202)
def reload(context: Context, principal: Admin) -> RulesStatus:
    """Have the router read the file again at its next pass."""
    _rules_file(context)
    try:
        admin.reload(context.settings)
    except OSError as exc:
        raise HTTPException(409, detail=f"cannot touch the rules file: {exc.strerror}") from exc
    record(context.engine, principal.name, AdminAction(action=Action.RELOAD_RULES))
    return rules_status(context.settings)


def _replace(context: WebContext, principal: Principal, text: str) -> admin.Replaced:
    settings = context.settings
    _rules_file(context)
    try:
        before: str | None = admin.current_text(settings)
    except RulesError:
        before = None
    try:
        replaced = admin.replace(settings, text)
    except RulesError as exc:
        raise _invalid(exc) from exc
    except OSError as exc:
        raise HTTPException(409, detail=f"cannot write the rules file: {exc.strerror}") from exc
    facts = AdminAction(
        action=Action.REPLACE_RULES,
        file=replaced.file,
        backup=replaced.backup,
        before=before,
        after=text,
    )
    record(context.engine, principal.name, facts)
    return replaced


def _rules_file(context: WebContext) -> str:
    try:
        return str(admin.rules_file(context.settings))
    except admin.NoRulesFile as exc:
        raise HTTPException(409, detail=str(exc)) from exc


def _invalid(exc: RulesError) -> HTTPException:
    problems = [problem.model_dump() for problem in admin.problems_of(exc)]
    return HTTPException(422, detail={"message": "the rules have problems", "problems": problems})
