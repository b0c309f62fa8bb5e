import subprocess
import sys
from pathlib import Path

import pytest

from node.flow.routing.rules import Priority, RulesError, load_rules, parse_rules

REPO = Path(__file__).resolve().parents[4]


def check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "rules", "check", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_shipped_example_is_valid() -> None:
    result = check(REPO / "rules.example.yaml", "--config", str(REPO / "config.example.yaml"))
    assert result.returncode == 0, result.stdout
    rules = load_rules(REPO / "rules.example.yaml", {"lung-quant"}, {"pacs"})
    assert [r.pipelines for r in rules.rules if not r.discard] == [("lung-quant",)]
    assert rules.default_rules[0].discard


def test_check_reports_each_problem_with_line_and_column(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "rules:\n"
        "  - name: one\n"
        "    match:\n"
        "      Modalty: CT\n"  # 4:7 unknown keyword
        "      ConvolutionKernel: {regex: 'lung(('}\n"  # 5:34 bad regex
        "    pipelines: [lung-magic]\n"  # 6:17 unknown pipeline
        "    destinations: [origin, nowhere]\n"  # 7:28 unknown destination
        "    priority: urgent\n"  # 8:15 wrong value
        "  - name: two\n"
        "    match: {SliceThickness: {le: thin}}\n"  # 10:34 wrong type
        "    pipelines: [echo]\n"
        "    stop: maybe\n"  # 12:11 wrong type
    )
    config = tmp_path / "node.yaml"
    config.write_text("peers: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n")
    result = check(broken, "--config", str(config))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    expected = [
        f"{broken}:4:7: unknown DICOM keyword 'Modalty'",
        f"{broken}:5:34: bad regular expression",
        f"{broken}:6:17: unknown pipeline 'lung-magic'",
        f"{broken}:7:28: unknown destination 'nowhere'",
        f"{broken}:8:15: priority must be one of stat | routine | low",
        f"{broken}:10:34: 'le' takes a number",
        f"{broken}:12:11: expected true or false",
    ]
    assert len(lines) == len(expected), result.stdout
    for line, prefix in zip(lines, expected, strict=True):
        assert line.startswith(prefix), (line, prefix)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [{name: a, pipelines: [echo]}]", "needs 'match'"),
        (
            "rules: [{name: a, match: {Modality: CT}}]",
            "give 'pipelines', 'fetch_priors' or 'discard: true'",
        ),
        (
            "rules: [{name: a, match: {Modality: CT}, pipelines: [echo],"
            " select: {prefer_kernel: lung}}]",
            "needs 'trigger: study'",
        ),
        (
            "rules: [{name: a, match: {Modality: {near: CT}}, discard: true}]",
            "unknown operator 'near'",
        ),
        ("rules: [{name: a, match: {any: []}, discard: true}]", "non-empty list"),
        ("rulez: []", "unknown key 'rulez'"),
        (
            "rules: [{name: a, default: true, discard: true},"
            " {name: a, default: true, discard: true}]",
            "duplicate rule name",
        ),
        ("rules: [{name: a\n", "invalid YAML"),
    ],
)
def test_invalid_rules_are_explained(text: str, message: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, Path("r.yaml"), {"echo"}, set())
    assert message in str(caught.value)


def test_bare_values_lists_and_operators() -> None:
    rules = parse_rules(
        "rules:\n"
        "  - name: a\n"
        "    match: {Modality: CT, calling_ae: [CT1, CT2], SliceThickness: {between: [0.5, 2]}}\n"
        "    pipelines: [echo]\n"
        "    priority: stat\n",
        Path("r.yaml"),
        {"echo"},
    )
    [rule] = rules.rules
    assert rule.priority is Priority.STAT
    operators = [c.operator for c in rule.match.children]  # type: ignore[union-attr]
    assert operators == ["equals", "one_of", "between"]
