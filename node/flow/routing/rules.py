"""Routing rules: the YAML schema, parsed into typed rules with the line and column of every
problem (`ainode rules check` prints them as FILE:LINE:COLUMN: message).

    rules:
      - name: chest-ct
        match:
          all:
            - Modality: CT
            - ImageType: {contains: AXIAL, not_contains: LOCALIZER}
            - SliceThickness: {le: 2.5}
            - ConvolutionKernel: {regex: "lung|^B6"}
        pipelines: [lung-quant]
        destinations: [origin]
        priority: routine
      - name: everything-else
        default: true
        discard: true

A condition names a DICOM keyword (read from the stored instances) or a context key
(`calling_ae`: the AE title or the DICOMweb sender's name, `called_ae`, `instance_count`,
`source`: dimse or dicomweb, `is_prior`: fetched as a prior, `guard_distance`: the series'
distance to the site's reference series, see `node.work.guard`). A bare value means `equals`, a
list `one_of`. A prior is routed only by rules whose match asks about `is_prior`.

`guard_distance` is known once an embedding pipeline has run on the series revision and a
reference is fitted; the series is then routed again. Until then it is missing, and
`{guard_distance: {le: 1.5}}` does not match: such a rule holds its pipelines until the
guard has passed the series.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from node.config import ORIGIN, YAML_LOADER

CONTEXT_KEYS = frozenset(
    {"calling_ae", "called_ae", "instance_count", "source", "is_prior", "guard_distance"}
)
COMBINATORS = frozenset({"all", "any", "not"})


class Operator(enum.StrEnum):
    """How a condition tests an attribute."""

    EQUALS = "equals"
    ONE_OF = "one_of"
    REGEX = "regex"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    BETWEEN = "between"
    EXISTS = "exists"
    MISSING = "missing"
    CONTAINS = "contains"
    NOT_CONTAINS = "not_contains"


OPERATORS = frozenset(Operator)
Scalar = str | int | float | bool | None
Operand = Scalar | tuple[Scalar, ...]
"""A number (lt le gt ge), (low, high) (between), a pattern (regex), a flag (exists missing),
values (one_of contains not_contains) or a value (equals)."""
RULE_KEYS = frozenset(
    {
        "name",
        "match",
        "pipelines",
        "destinations",
        "priority",
        "priority_if_positive",
        "discard",
        "stop",
        "trigger",
        "select",
        "default",
        "fetch_priors",
        "notify",
    }
)
SELECT_KEYS = frozenset({"match", "prefer_kernel", "per"})
PRIORS_KEYS = frozenset({"from", "modality", "count", "within_days"})


class Priority(enum.IntEnum):
    """Lower runs first."""

    STAT = 0
    ROUTINE = 1
    LOW = 2


class Trigger(enum.StrEnum):
    SERIES = "series"
    STUDY = "study"


@dataclass(frozen=True)
class Condition:
    """One test of one attribute: `operator` applied to `operand`."""

    attribute: str
    operator: Operator
    operand: Operand
    case_sensitive: bool = False
    line: int = 0


@dataclass(frozen=True)
class Combination:
    """`all`, `any` or `not` over sub-expressions (`not` has exactly one)."""

    kind: str
    children: tuple[Expression, ...]


Expression = Condition | Combination


@dataclass(frozen=True)
class SeriesSelection:
    """How a study-trigger rule picks the best series of a study, or of each acquisition in
    it (`per: acquisition`: the reconstructions of one acquisition give one answer)."""

    match: Expression | None = None
    prefer_kernel: re.Pattern[str] | None = None
    per_acquisition: bool = False


@dataclass(frozen=True)
class PriorsRequest:
    """`fetch_priors`: when a study the rule matches completes, fetch the same patient's
    `count` most recent earlier studies (of `modality`, within `within_days`) from `source`."""

    source: str
    modality: str | None = None
    count: int = 1
    within_days: int = 730


@dataclass(frozen=True)
class Rule:
    name: str
    match: Expression | None = None
    pipelines: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    priority: Priority = Priority.ROUTINE
    priority_if_positive: Priority | None = None
    discard: bool = False
    stop: bool = False
    trigger: Trigger = Trigger.SERIES
    select: SeriesSelection = field(default_factory=SeriesSelection)
    default: bool = False
    fetch_priors: PriorsRequest | None = None
    notify: tuple[str, ...] = ()
    line: int = 0

    @property
    def takes_priors(self) -> bool:
        """Whether the rule asks about priors (`is_prior`): only such rules see priors."""
        return self.match is not None and mentions(self.match, "is_prior")


def mentions(expression: Expression, attribute: str) -> bool:
    if isinstance(expression, Condition):
        return expression.attribute == attribute
    return any(mentions(child, attribute) for child in expression.children)


@dataclass(frozen=True)
class Problem:
    line: int
    column: int
    message: str

    def render(self, path: Path | str) -> str:
        return f"{path}:{self.line}:{self.column}: {self.message}"


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]

    @property
    def default_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.default)


class RulesError(Exception):
    """A rules file with problems; `problems` carry line and column."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(p.render(path) for p in problems))


def load_rules(
    path: Path,
    pipelines: Collection[str] | None = None,
    destinations: Collection[str] | None = None,
    notifications: Collection[str] | None = None,
) -> RuleSet:
    """Parse and check a rules file; raise RulesError listing every problem.

    `pipelines` / `destinations`: the names that exist (None: not checked).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(path, [Problem(1, 1, f"cannot read: {exc.strerror}")]) from exc
    return parse_rules(text, path, pipelines, destinations, notifications)


def parse_rules(
    text: str,
    path: Path,
    pipelines: Collection[str] | None = None,
    destinations: Collection[str] | None = None,
    notifications: Collection[str] | None = None,
) -> RuleSet:
    try:
        root = yaml.compose(text, Loader=YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise RulesError(path, [Problem(line, column, f"invalid YAML: {exc.problem}")]) from exc
    parser = _Parser(pipelines, destinations, notifications)
    rules = parser.document(root)
    if parser.problems:
        raise RulesError(path, sorted(parser.problems, key=lambda p: (p.line, p.column)))
    return RuleSet(tuple(rules))


class _Parser:
    """Walks the YAML node tree, collecting problems instead of stopping at the first."""

    def __init__(
        self,
        pipelines: Collection[str] | None,
        destinations: Collection[str] | None,
        notifications: Collection[str] | None = None,
    ):
        self.pipelines = pipelines
        self.destinations = destinations
        self.notifications = notifications
        self.problems: list[Problem] = []

    def problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(node.start_mark.line + 1, node.start_mark.column + 1, message))

    def document(self, root: yaml.Node | None) -> list[Rule]:
        if root is None:
            return []
        if not isinstance(root, yaml.MappingNode):
            self.problem(root, "the file must be a mapping with a 'rules' list")
            return []
        rules: list[Rule] = []
        for key, value in root.value:
            if key.value != "rules":
                self.problem(key, f"unknown key {key.value!r} (expected 'rules')")
            elif not isinstance(value, yaml.SequenceNode):
                self.problem(value, "'rules' must be a list of rules")
            else:
                rules = [r for r in (self.rule(item) for item in value.value) if r is not None]
        names: set[str] = set()
        for rule in rules:
            if rule.name in names:
                self.problems.append(Problem(rule.line, 1, f"duplicate rule name {rule.name!r}"))
            names.add(rule.name)
        return rules

    def rule(self, node: yaml.Node) -> Rule | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "a rule must be a mapping")
            return None
        fields: dict[str, object] = {"line": node.start_mark.line + 1}
        for key, value in node.value:
            name = key.value
            if name not in RULE_KEYS:
                self.problem(key, f"unknown rule key {name!r}")
            elif name == "name":
                fields["name"] = self.string(value)
            elif name == "match":
                fields["match"] = self.expression(value)
            elif name == "pipelines":
                fields["pipelines"] = self.names(value, self.pipelines, "pipeline", set())
            elif name == "destinations":
                fields["destinations"] = self.names(
                    value, self.destinations, "destination", {ORIGIN}
                )
            elif name in {"priority", "priority_if_positive"}:
                fields[name] = self.choice(value, Priority, "priority")
            elif name == "trigger":
                fields["trigger"] = self.choice(value, Trigger, "trigger")
            elif name in {"discard", "stop", "default"}:
                fields[name] = self.boolean(value)
            elif name == "select":
                fields["select"] = self.selection(value)
            elif name == "fetch_priors":
                fields["fetch_priors"] = self.priors(value)
            elif name == "notify":
                fields["notify"] = self.names(value, self.notifications, "notification", set())
        if not fields.get("name"):
            self.problem(node, "a rule needs a 'name'")
            return None
        rule = Rule(**{k: v for k, v in fields.items() if v is not None})  # type: ignore[arg-type]
        if rule.select != SeriesSelection() and rule.trigger is not Trigger.STUDY:
            self.problem(node, f"rule {rule.name!r}: 'select' needs 'trigger: study'")
        given = {key.value for key, _ in node.value}
        if not rule.default and "match" not in given and rule.trigger is Trigger.SERIES:
            self.problem(node, f"rule {rule.name!r}: needs 'match' (or 'default: true')")
        if not ({"pipelines", "discard", "fetch_priors"} & given):
            self.problem(
                node, f"rule {rule.name!r}: give 'pipelines', 'fetch_priors' or 'discard: true'"
            )
        return rule

    def expression(self, node: yaml.Node) -> Expression | None:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            self.problem(node, "a condition must be a mapping like {Modality: CT}")
            return None
        parts = [self.entry(key, value) for key, value in node.value]
        kept = tuple(p for p in parts if p is not None)
        if len(kept) != len(parts):
            return None
        return kept[0] if len(kept) == 1 else Combination("all", kept)

    def entry(self, key: yaml.Node, value: yaml.Node) -> Expression | None:
        name = str(key.value)
        if name in COMBINATORS:
            if name == "not":
                inner = self.expression(value)
                return Combination("not", (inner,)) if inner is not None else None
            if not isinstance(value, yaml.SequenceNode) or not value.value:
                self.problem(value, f"'{name}' takes a non-empty list of conditions")
                return None
            children = [self.expression(item) for item in value.value]
            if any(c is None for c in children):
                return None
            return Combination(name, tuple(children))  # type: ignore[arg-type]
        if name not in CONTEXT_KEYS and not _is_keyword(name):
            self.problem(key, f"unknown DICOM keyword {name!r}")
            return None
        return self.condition(name, value)

    def condition(self, attribute: str, node: yaml.Node) -> Expression | None:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode):
            return Condition(attribute, Operator.EQUALS, _scalar(node), line=line)
        if isinstance(node, yaml.SequenceNode):
            return Condition(attribute, Operator.ONE_OF, tuple(self.scalars(node)), line=line)
        ops = {str(k.value): (k, v) for k, v in node.value}
        case_node = ops.pop("case_sensitive", None)
        case_sensitive = bool(self.boolean(case_node[1])) if case_node else False
        conditions, valid = [], True
        for op, (key, value) in ops.items():
            if op not in OPERATORS:
                self.problem(key, f"unknown operator {op!r} for {attribute}")
                valid = False
                continue
            operand = self.operand(Operator(op), value)
            if isinstance(operand, Invalid):
                valid = False
            else:
                condition = Condition(attribute, Operator(op), operand, case_sensitive, line)
                conditions.append(condition)
        if valid and not conditions:
            self.problem(node, f"no operator given for {attribute}")
        if not valid or not conditions:
            return None
        return conditions[0] if len(conditions) == 1 else Combination("all", tuple(conditions))

    def operand(self, op: Operator, node: yaml.Node) -> Operand | Invalid:
        if op in {"lt", "le", "gt", "ge"}:
            value = _scalar(node)
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.problem(node, f"'{op}' takes a number")
                return _INVALID
            return float(value)
        if op == "between":
            values = self.scalars(node) if isinstance(node, yaml.SequenceNode) else []
            if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
                self.problem(node, "'between' takes [low, high]")
                return _INVALID
            low, high = values
            assert isinstance(low, int | float) and isinstance(high, int | float)
            return (float(low), float(high))
        if op == "regex":
            pattern = _scalar(node)
            try:
                re.compile(str(pattern))
            except re.error as exc:
                self.problem(node, f"bad regular expression {pattern!r}: {exc}")
                return _INVALID
            return str(pattern)
        if op in {"exists", "missing"}:
            flag = self.boolean(node)
            return _INVALID if flag is None else flag
        if op in {"one_of", "contains", "not_contains"}:
            if isinstance(node, yaml.SequenceNode):
                return tuple(self.scalars(node))
            return (_scalar(node),)
        return _scalar(node)

    def selection(self, node: yaml.Node) -> SeriesSelection | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "'select' must be a mapping")
            return None
        match, prefer, per_acquisition = None, None, False
        for key, value in node.value:
            if key.value not in SELECT_KEYS:
                self.problem(key, f"unknown select key {key.value!r}")
            elif key.value == "match":
                match = self.expression(value)
            elif key.value == "per":
                per = str(_scalar(value))
                if per not in ("study", "acquisition"):
                    self.problem(value, "per must be one of study | acquisition")
                per_acquisition = per == "acquisition"
            else:
                try:
                    prefer = re.compile(str(_scalar(value)), re.IGNORECASE)
                except re.error as exc:
                    self.problem(value, f"bad regular expression: {exc}")
        return SeriesSelection(match, prefer, per_acquisition)

    def priors(self, node: yaml.Node) -> PriorsRequest | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "'fetch_priors' must be a mapping like {from: pacs, count: 1}")
            return None
        values: dict[str, yaml.Node] = {}
        for key, value in node.value:
            if key.value not in PRIORS_KEYS:
                self.problem(key, f"unknown fetch_priors key {key.value!r}")
            else:
                values[key.value] = value
        if "from" not in values:
            self.problem(node, "'fetch_priors' needs 'from' (a peer or dicomweb server)")
            return None
        source = str(_scalar(values["from"]))
        if self.destinations is not None and source not in self.destinations:
            choices = ", ".join(sorted(self.destinations)) or "none"
            self.problem(values["from"], f"unknown source {source!r} (known: {choices})")
        numbers = {}
        for key in ("count", "within_days"):
            if key in values:
                number = _scalar(values[key])
                if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                    self.problem(values[key], f"'{key}' takes a whole number from 1")
                    return None
                numbers[key] = number
        modality = str(_scalar(values["modality"])) if "modality" in values else None
        return PriorsRequest(source, modality, **numbers)

    def names(
        self, node: yaml.Node, known: Collection[str] | None, kind: str, always: set[str]
    ) -> tuple[str, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"'{kind}s' must be a list")
            return None
        names = []
        for item in node.value:
            name = str(_scalar(item))
            if known is not None and name not in known and name not in always:
                choices = ", ".join(sorted({*known, *always})) or "none"
                self.problem(item, f"unknown {kind} {name!r} (known: {choices})")
            names.append(name)
        return tuple(names)

    def choice(self, node: yaml.Node, enum_type: type[enum.Enum], what: str) -> enum.Enum | None:
        value = str(_scalar(node)).lower()
        for member in enum_type:
            if member.name.lower() == value:
                return member
        allowed = " | ".join(m.name.lower() for m in enum_type)
        self.problem(node, f"{what} must be one of {allowed}")
        return None

    def boolean(self, node: yaml.Node) -> bool | None:
        value = _scalar(node)
        if not isinstance(value, bool):
            self.problem(node, "expected true or false")
            return None
        return value

    def string(self, node: yaml.Node) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
            self.problem(node, "expected a non-empty string")
            return None
        return str(node.value)

    def scalars(self, node: yaml.SequenceNode) -> list[Scalar]:
        values = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                self.problem(item, "expected a plain value")
            else:
                values.append(_scalar(item))
        return values


class Invalid:
    """An operand that could not be read (its problem is already recorded)."""


_INVALID = Invalid()


def _scalar(node: yaml.Node) -> Scalar:
    """The Python value of a scalar node, typed as YAML would type it (a date or anything
    else YAML reads as neither text nor number stays text)."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    value = yaml.load(yaml.serialize(node), Loader=YAML_LOADER)
    return value if value is None or isinstance(value, str | int | float) else str(node.value)


def _is_keyword(name: str) -> bool:
    """A DICOM keyword (pydicom, imported here: `ainode status` and the job queue load this
    module, and pydicom's import is a quarter of a second)."""
    from pydicom.datadict import tag_for_keyword

    return tag_for_keyword(name) is not None
