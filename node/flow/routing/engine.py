"""Rule evaluation: which pipelines a completed series (or study) goes to, and why.

Rules run in file order; every matching rule fires unless one says `stop`; a matching
`discard` rule drops the series (no jobs at all). Jobs for the same pipeline are merged: one
job per pipeline, with the union of destinations and the most urgent priority. `default`
rules apply only when no other series rule matched.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, MutableSequence
from dataclasses import dataclass, field
from pathlib import Path

from node.flow.routing.rules import (
    Combination,
    Condition,
    Expression,
    Operand,
    Operator,
    Priority,
    Rule,
    RuleSet,
    Scalar,
    SeriesSelection,
    Trigger,
)

EXCLUDED_IMAGE_TYPES = frozenset({"LOCALIZER", "DERIVED", "SECONDARY", "SCOUT", "PROJECTION"})


@dataclass(frozen=True)
class SeriesFacts:
    """What rules can test about one series: its stored attributes and how it arrived."""

    series_instance_uid: str
    attributes: Mapping[str, object]

    def value(self, attribute: str) -> object:
        return self.attributes.get(attribute)

    @property
    def is_prior(self) -> bool:
        return bool(self.attributes.get("is_prior"))

    @classmethod
    def read(
        cls, instance_path: Path, series_instance_uid: str, context: Mapping[str, object]
    ) -> SeriesFacts:
        """Facts from one stored instance's header plus the sending context."""
        import pydicom  # here: `ainode status` and the job queue import this module

        dataset = pydicom.dcmread(instance_path, stop_before_pixels=True)
        attributes: dict[str, object] = {
            element.keyword: element.value
            for element in dataset
            if element.keyword and element.VR != "SQ"
        }
        attributes.update(context)
        return cls(series_instance_uid, attributes)


@dataclass(frozen=True)
class JobRequest:
    """One pipeline run a routing decision asks for."""

    series_instance_uid: str
    pipeline: str
    destinations: tuple[str, ...]
    priority: Priority
    rules: tuple[str, ...]
    priority_if_positive: Priority | None = None
    notify: tuple[str, ...] = ()


@dataclass
class ConditionTrace:
    description: str
    actual: object
    matched: bool
    depth: int


@dataclass
class RuleTrace:
    rule: str
    matched: bool
    conditions: list[ConditionTrace] = field(default_factory=list)
    note: str = ""


def evaluate(
    expression: Expression,
    facts: SeriesFacts,
    trace: list[ConditionTrace] | None = None,
    depth: int = 0,
) -> bool:
    """True if `facts` satisfy `expression`; records every condition in `trace`."""
    if isinstance(expression, Combination):
        if trace is not None:
            trace.append(ConditionTrace(expression.kind, None, False, depth))
            entry = trace[-1]
        results = [evaluate(child, facts, trace, depth + 1) for child in expression.children]
        if expression.kind == "all":
            matched = all(results)
        elif expression.kind == "any":
            matched = any(results)
        else:
            matched = not results[0]
        if trace is not None:
            entry.matched = matched
        return matched
    actual = facts.value(expression.attribute)
    matched = _test(expression, actual)
    if trace is not None:
        trace.append(ConditionTrace(_describe(expression), _printable(actual), matched, depth))
    return matched


def route_series(rules: RuleSet, facts: SeriesFacts) -> tuple[list[JobRequest], list[RuleTrace]]:
    """The jobs the series-trigger rules ask for, and a trace of every rule."""
    fired: list[Rule] = []
    traces: list[RuleTrace] = []
    stopped = discarded = False
    for rule in rules.rules:
        if rule.trigger is not Trigger.SERIES or rule.default:
            continue
        trace = RuleTrace(rule.name, False)
        traces.append(trace)
        if stopped:
            trace.note = "skipped: an earlier rule said stop"
            continue
        if facts.is_prior and not rule.takes_priors:
            trace.note = "skipped: a prior, and this rule does not ask about is_prior"
            continue
        trace.matched = rule.match is not None and evaluate(rule.match, facts, trace.conditions)
        if trace.matched:
            fired.append(rule)
            discarded = discarded or rule.discard
            stopped = rule.stop or rule.discard
    if not fired and not facts.is_prior:
        for rule in rules.default_rules:
            traces.append(RuleTrace(rule.name, True, note="default: no other rule matched"))
            fired.append(rule)
            discarded = discarded or rule.discard
    if discarded:
        return [], traces
    return merge(facts.series_instance_uid, fired), traces


def merge(series_instance_uid: str, rules: Iterable[Rule]) -> list[JobRequest]:
    """One job per pipeline: union of destinations and notifications, most urgent priority."""
    merged: dict[str, JobRequest] = {}
    for rule in rules:
        for pipeline in rule.pipelines:
            previous = merged.get(pipeline)
            destinations = tuple(
                dict.fromkeys((previous.destinations if previous else ()) + rule.destinations)
            )
            merged[pipeline] = JobRequest(
                series_instance_uid,
                pipeline,
                destinations,
                min(rule.priority, previous.priority) if previous else rule.priority,
                (previous.rules if previous else ()) + (rule.name,),
                _most_urgent(
                    rule.priority_if_positive, previous.priority_if_positive if previous else None
                ),
                tuple(dict.fromkeys((previous.notify if previous else ()) + rule.notify)),
            )
    return list(merged.values())


def _most_urgent(*priorities: Priority | None) -> Priority | None:
    given = [p for p in priorities if p is not None]
    return min(given) if given else None


def route_study(
    rules: RuleSet, series: list[SeriesFacts]
) -> tuple[list[JobRequest], list[RuleTrace]]:
    """Jobs of the study-trigger rules: each picks the best matching series of the study, or
    of each of its acquisitions."""
    requests: list[JobRequest] = []
    traces: list[RuleTrace] = []
    for rule in rules.rules:
        if rule.trigger is not Trigger.STUDY:
            continue
        candidates = [
            facts
            for facts in series
            if (rule.takes_priors or not facts.is_prior)
            and (rule.match is None or evaluate(rule.match, facts))
            and (rule.select.match is None or evaluate(rule.select.match, facts))
        ]
        groups = by_acquisition(candidates) if rule.select.per_acquisition else [candidates]
        chosen = [best for group in groups if (best := select_series(rule.select, group))]
        picked = ", ".join(best.series_instance_uid for best in chosen)
        note = f"selected {picked}" if chosen else "no eligible series"
        traces.append(RuleTrace(rule.name, bool(chosen), note=note))
        if not rule.discard:
            for best in chosen:
                requests.extend(merge(best.series_instance_uid, [rule]))
        if chosen and rule.stop:
            break
    return requests, traces


def by_acquisition(series: list[SeriesFacts]) -> list[list[SeriesFacts]]:
    """The series grouped by acquisition: reconstructions of one acquisition share its frame
    of reference and were acquired in the same minute (a series without them is its own)."""
    groups: dict[tuple[str, ...], list[SeriesFacts]] = {}
    for facts in series:
        frame = _text(facts.value("FrameOfReferenceUID"))
        when = _text(facts.value("AcquisitionDate")) + _text(facts.value("AcquisitionTime"))[:4]
        key = (frame, when) if frame and when else (facts.series_instance_uid,)
        groups.setdefault(key, []).append(facts)
    return list(groups.values())


def select_series(selection: SeriesSelection, candidates: list[SeriesFacts]) -> SeriesFacts | None:
    """The series a radiographer would pick: original axial images, no localizers or derived
    images; then the preferred kernel, the thinnest slices, the most instances."""
    eligible = [facts for facts in candidates if _is_primary_axial(facts)]
    if not eligible:
        return None

    def rank(facts: SeriesFacts) -> tuple[int, float, int]:
        kernel = _text(facts.value("ConvolutionKernel"))
        preferred = bool(selection.prefer_kernel and selection.prefer_kernel.search(kernel))
        thickness = _number(facts.value("SliceThickness"))
        count = _number(facts.value("instance_count"))
        return (
            0 if preferred else 1,
            thickness if thickness is not None else float("inf"),
            -int(count or 0),
        )

    return min(eligible, key=rank)


def _is_primary_axial(facts: SeriesFacts) -> bool:
    image_type = {v.upper() for v in _values(facts.value("ImageType"))}
    if image_type & EXCLUDED_IMAGE_TYPES:
        return False
    return "AXIAL" in image_type or not image_type


COMPARISONS: dict[Operator, Callable[[float, float], bool]] = {
    Operator.LT: operator.lt,
    Operator.LE: operator.le,
    Operator.GT: operator.gt,
    Operator.GE: operator.ge,
}


def _test(condition: Condition, actual: object) -> bool:
    op, operand = condition.operator, condition.operand
    if op is Operator.EXISTS:
        return _present(actual) is operand
    if op is Operator.MISSING:
        return (not _present(actual)) is operand
    if not _present(actual):
        return False
    if op in COMPARISONS or op is Operator.BETWEEN:
        number = _number(actual)
        if number is None:
            return False
        if op is Operator.BETWEEN:
            low, high = (_limit(bound) for bound in _options(operand))
            return low <= number <= high
        return COMPARISONS[op](number, _limit(operand))
    fold: Callable[[str], str] = (lambda s: s) if condition.case_sensitive else str.casefold
    if op is Operator.REGEX:
        flags = 0 if condition.case_sensitive else re.IGNORECASE
        return re.search(str(operand), _text(actual), flags) is not None
    if op in {Operator.CONTAINS, Operator.NOT_CONTAINS}:
        present = {fold(v) for v in _values(actual)}
        wanted = {fold(str(v)) for v in _options(operand)}
        return wanted <= present if op is Operator.CONTAINS else not (wanted & present)
    if op is Operator.ONE_OF:
        return any(_equal(actual, option, fold) for option in _options(operand))
    return _equal(actual, operand, fold)


def _limit(operand: Operand) -> float:
    """A comparison's number (the rules check made sure it is one)."""
    if isinstance(operand, int | float):
        return float(operand)
    raise TypeError(f"not a number: {operand!r}")


def _options(operand: Operand) -> tuple[Scalar, ...]:
    return operand if isinstance(operand, tuple) else (operand,)


def _equal(actual: object, expected: Operand, fold: Callable[[str], str]) -> bool:
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        number = _number(actual)
        return number is not None and number == float(expected)
    return fold(_text(actual)) == fold(str(expected))


def _describe(condition: Condition) -> str:
    operand = condition.operand
    shown = list(operand) if isinstance(operand, tuple) else operand
    return f"{condition.attribute} {condition.operator} {shown!r}"


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, MutableSequence | tuple):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _text(value: object) -> str:
    return "\\".join(_values(value))


def _present(value: object) -> bool:
    return any(_values(value))


def _number(value: object) -> float | None:
    values = _values(value)
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None


def _printable(value: object) -> object:
    if isinstance(value, MutableSequence | tuple):
        return [str(v) for v in value]
    if value is None or isinstance(value, int | float | str):
        return value
    return str(value)
