"""The routing rules as an administrator handles them, one service for the CLI and the API:
check a file or a proposed text against this node's pipelines, destinations and
notifications; explain how a series is routed; replace the file atomically, keeping the old
one; have the router read it again.

The router itself reloads the file when it changes (`router.RulesSource`): replacing or
touching the file is how a new set takes effect, in whichever process routes."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import Engine, select

from node.config import Settings
from node.flow.routing.engine import SeriesFacts, route_series, route_study
from node.flow.routing.router import stored_series_facts
from node.flow.routing.rules import Problem, RulesError, RuleSet, parse_rules
from node.store.db.models import Series
from pipelines.registry import pipeline_names

MAX_RULES_BYTES = 1 << 20
"""A rules file is a few kilobytes; a larger upload is refused."""


class RulesProblem(BaseModel):
    file: str
    line: int
    column: int
    message: str

    def render(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


def problems_of(error: RulesError) -> list[RulesProblem]:
    return [RulesProblem(file=str(error.path), **vars(p)) for p in error.problems]


class RulesCheck(BaseModel):
    """A rules text against this node: valid, or every problem with its line and column."""

    file: str
    valid: bool
    rules: int
    problems: list[RulesProblem]


class ConditionExplained(BaseModel):
    description: str
    actual: object
    matched: bool
    depth: int


class RuleExplained(BaseModel):
    rule: str
    matched: bool
    note: str
    conditions: list[ConditionExplained]


class JobExplained(BaseModel):
    pipeline: str
    destinations: list[str]
    priority: str
    rules: list[str]
    at: str
    """`series completion`, or `study completion` (if the study rule picks this series)."""


class Explanation(BaseModel):
    series_instance_uid: str
    rules: list[RuleExplained]
    jobs: list[JobExplained]


class Replaced(BaseModel):
    file: str
    backup: str | None
    """The previous file, kept beside it (None when there was none)."""
    rules: int


def parse(settings: Settings, text: str, file: Path | str) -> RuleSet:
    """Parse `text` and check it against this node; raise RulesError with every problem."""
    return parse_rules(
        text,
        Path(file),
        pipeline_names(settings.pipelines),
        settings.destination_names(),
        set(settings.notifications),
    )


def current_text(settings: Settings) -> str:
    """The rules file as it is now; RulesError when it cannot be read."""
    path = rules_file(settings)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(path, [Problem(1, 1, f"cannot read: {exc.strerror}")]) from exc


def proposed(file: Path | str) -> str:
    """What the problems of a text proposed for `file` are attributed to: not the file,
    which still holds the rules in force."""
    return f"{file} (proposed)"


def check(settings: Settings, text: str | None = None) -> RulesCheck:
    """The configured file (or a proposed `text` for it) checked against this node."""
    file = str(rules_file(settings))
    try:
        if text is None:
            rules = parse(settings, current_text(settings), file)
        else:
            rules = parse(settings, text, proposed(file))
    except RulesError as exc:
        return RulesCheck(file=file, valid=False, rules=0, problems=problems_of(exc))
    return RulesCheck(file=file, valid=True, rules=len(rules.rules), problems=[])


def explain(rules: RuleSet, facts: SeriesFacts) -> Explanation:
    """Every rule, every condition with the actual value, and the jobs the rules would make."""
    requests, traces = route_series(rules, facts)
    study_requests, study_traces = route_study(rules, [facts])
    return Explanation(
        series_instance_uid=facts.series_instance_uid,
        rules=[
            RuleExplained(
                rule=trace.rule,
                matched=trace.matched,
                note=trace.note,
                conditions=[ConditionExplained(**vars(c)) for c in trace.conditions],
            )
            for trace in traces + study_traces
        ],
        jobs=[
            JobExplained(
                pipeline=request.pipeline,
                destinations=list(request.destinations),
                priority=request.priority.name.lower(),
                rules=list(request.rules),
                at=at,
            )
            for at, batch in (("series completion", requests), ("study completion", study_requests))
            for request in batch
        ],
    )


def stored_facts(settings: Settings, engine: Engine, series_uid: str) -> SeriesFacts:
    """What the rules see of a stored series; UnknownSeries when the node has none by that
    UID, NoInstanceLeft when its instances are gone."""
    with engine.connect() as conn:
        series_id = conn.execute(
            select(Series.id).where(Series.series_instance_uid == series_uid)
        ).scalar_one_or_none()
    if series_id is None:
        raise UnknownSeries(f"series {series_uid} is not stored on this node")
    return stored_series_facts(engine, settings.storage.path, series_id)


class UnknownSeries(LookupError):
    """No stored series has this UID."""


def replace(settings: Settings, text: str) -> Replaced:
    """Check `text`, then make it the rules file in one rename (readers see the old file or
    the new one, never half of it); the old file is kept as `<name>.<UTC time>`. Raises
    RulesError and changes nothing when `text` has problems."""
    path = rules_file(settings)
    rules = parse(settings, text, proposed(path))
    backup = None
    if path.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        backup = path.with_name(f"{path.name}.{stamp}")
        os.link(path, backup)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return Replaced(file=str(path), backup=str(backup) if backup else None, rules=len(rules.rules))


def reload(settings: Settings) -> None:
    """Have the router read the file again at its next pass (it reloads on a new mtime)."""
    os.utime(rules_file(settings))


def rules_file(settings: Settings) -> Path:
    path = settings.routing.rules_file
    if path is None:
        raise NoRulesFile("the config names no routing.rules_file")
    return path


class NoRulesFile(LookupError):
    """The node has no rules file to check, explain with or replace."""


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
