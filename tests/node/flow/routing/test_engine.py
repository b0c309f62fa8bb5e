import re
import subprocess
import sys
from pathlib import Path

from node.flow.routing.engine import SeriesFacts, evaluate, route_series, route_study
from node.flow.routing.rules import Priority, parse_rules

KERNEL_RULES = """
rules:
  - name: lung-kernel-only
    match:
      all:
        - Modality: CT
        - ImageType: {contains: AXIAL, not_contains: LOCALIZER}
        - SliceThickness: {le: 5}
        - ConvolutionKernel: {regex: "^l$|lung"}
    pipelines: [echo]
    destinations: [origin]
  - name: best-of-study
    trigger: study
    match: {Modality: CT}
    select: {prefer_kernel: "^L$|lung"}
    pipelines: [echo]
    destinations: [pacs]
"""


def facts_of(files: list[Path]) -> SeriesFacts:
    import pydicom

    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return SeriesFacts.read(files[0], uid, {"instance_count": len(files), "calling_ae": "CT01"})


def rules(text: str):
    return parse_rules(text, Path("r.yaml"), {"echo", "other"}, {"pacs"})


def test_kernel_regex_routes_the_lung_kernel_and_not_the_body_kernel(real_series) -> None:
    ruleset = rules(KERNEL_RULES)
    lung = facts_of(real_series["lung-kernel"])
    body = facts_of(real_series["body-kernel"])
    jobs, _ = route_series(ruleset, lung)
    assert [(j.pipeline, j.destinations) for j in jobs] == [("echo", ("origin",))]
    assert route_series(ruleset, body)[0] == []


def test_study_trigger_picks_the_lung_kernel_series(real_series) -> None:
    ruleset = rules(KERNEL_RULES)
    lung = facts_of(real_series["lung-kernel"])
    body = facts_of(real_series["body-kernel"])
    for order in ([body, lung], [lung, body]):
        jobs, traces = route_study(ruleset, order)
        assert [j.series_instance_uid for j in jobs] == [lung.series_instance_uid]
        assert traces[0].note == f"selected {lung.series_instance_uid}"


SOFT_PER_ACQUISITION = """
rules:
  - name: densitometry
    trigger: study
    match: {Modality: CT}
    select: {prefer_kernel: "^B$|^B[1-4]|standard|soft", per: acquisition}
    pipelines: [echo]
"""


def test_one_answer_per_acquisition_from_its_soft_kernel(real_series) -> None:
    """A0001's two reconstructions of one acquisition (same frame of reference, same time)
    give one job, on the body kernel; another acquisition in the study gets its own."""
    ruleset = rules(SOFT_PER_ACQUISITION)
    lung = facts_of(real_series["lung-kernel"])
    body = facts_of(real_series["body-kernel"])
    assert lung.value("FrameOfReferenceUID") == body.value("FrameOfReferenceUID")
    jobs, traces = route_study(ruleset, [lung, body])
    assert [j.series_instance_uid for j in jobs] == [body.series_instance_uid]
    later = SeriesFacts("1.9", {**lung.attributes, "AcquisitionTime": "201500", "Modality": "CT"})
    jobs, traces = route_study(ruleset, [lung, body, later])
    assert sorted(j.series_instance_uid for j in jobs) == sorted([body.series_instance_uid, "1.9"])
    assert traces[0].note == f"selected {body.series_instance_uid}, 1.9"


def test_per_takes_study_or_acquisition() -> None:
    import pytest

    from node.flow.routing.rules import RulesError

    with pytest.raises(RulesError, match=re.escape("per must be one of study | acquisition")):
        rules("rules: [{name: s, trigger: study, pipelines: [echo], select: {per: series}}]")


def test_selection_skips_localizers_and_prefers_thin_then_many() -> None:
    ruleset = rules(
        "rules: [{name: s, trigger: study, pipelines: [echo], select: {prefer_kernel: zzz}}]"
    )

    def series(uid: str, image_type: list[str], thickness: float, count: int) -> SeriesFacts:
        attrs = {"ImageType": image_type, "SliceThickness": thickness, "instance_count": count}
        return SeriesFacts(uid, attrs)

    candidates = [
        series("1.1", ["ORIGINAL", "PRIMARY", "LOCALIZER"], 0.5, 3),
        series("1.2", ["DERIVED", "SECONDARY", "AXIAL"], 0.5, 300),
        series("1.3", ["ORIGINAL", "PRIMARY", "AXIAL"], 5.0, 60),
        series("1.4", ["ORIGINAL", "PRIMARY", "AXIAL"], 1.0, 300),
        series("1.5", ["ORIGINAL", "PRIMARY", "AXIAL"], 1.0, 320),
    ]
    jobs, _ = route_study(ruleset, candidates)
    assert [j.series_instance_uid for j in jobs] == ["1.5"]


def test_stop_discard_default_and_merge() -> None:
    ruleset = rules(
        """
rules:
  - {name: a, match: {Modality: CT}, pipelines: [echo], destinations: [origin]}
  - {name: b, match: {Modality: CT}, pipelines: [echo, other], destinations: [pacs], priority: stat}
  - {name: c, match: {Modality: CT}, pipelines: [other], stop: true}
  - {name: d, match: {Modality: CT}, pipelines: [echo], destinations: [pacs]}
  - {name: drop-mr, match: {Modality: MR}, discard: true}
  - {name: fallback, default: true, pipelines: [other], priority: low}
"""
    )
    ct = SeriesFacts("1.1", {"Modality": "CT"})
    jobs, traces = route_series(ruleset, ct)
    assert {(j.pipeline, j.destinations, j.priority) for j in jobs} == {
        ("echo", ("origin", "pacs"), Priority.STAT),
        ("other", ("pacs",), Priority.STAT),
    }
    assert [t.rule for t in traces if t.note.startswith("skipped")] == ["d", "drop-mr"]
    assert route_series(ruleset, SeriesFacts("1.2", {"Modality": "MR"}))[0] == []
    [fallback] = route_series(ruleset, SeriesFacts("1.3", {"Modality": "US"}))[0]
    assert (fallback.pipeline, fallback.priority) == ("other", Priority.LOW)


def test_operators_on_real_values() -> None:
    facts = SeriesFacts(
        "1.1",
        {
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "SliceThickness": "1.25",
            "SeriesDescription": "Thorax LUNG 1.25",
            "BodyPartExamined": "",
            "instance_count": 300,
        },
    )
    cases = {
        "{SeriesDescription: {regex: 'lung'}}": True,
        "{SeriesDescription: {regex: 'lung', case_sensitive: true}}": False,
        "{SliceThickness: {le: 2.5}}": True,
        "{SliceThickness: {gt: 2.5}}": False,
        "{instance_count: {between: [100, 400]}}": True,
        "{ImageType: {contains: [axial, original]}}": True,
        "{ImageType: {not_contains: LOCALIZER}}": True,
        "{BodyPartExamined: {missing: true}}": True,
        "{BodyPartExamined: {exists: true}}": False,
        "{PatientAge: {exists: false}}": True,
        "{not: {SliceThickness: 1.25}}": False,
    }
    for text, expected in cases.items():
        rule = rules(f"rules: [{{name: r, match: {text}, pipelines: [echo]}}]").rules[0]
        assert evaluate(rule.match, facts) is expected, text


def test_explain_prints_each_condition_with_its_actual_value(real_series, tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(KERNEL_RULES.replace("destinations: [pacs]", "destinations: [origin]"))
    config = tmp_path / "node.yaml"
    config.write_text(
        f"node: {{accept_unknown_peers: true}}\nrouting: {{rules_file: {rules_file}}}\n"
    )
    series_dir = real_series["body-kernel"][0].parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node",
            "rules",
            "explain",
            "--config",
            str(config),
            "--series-dir",
            str(series_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rule lung-kernel-only: no match" in out
    assert "[yes] Modality equals 'CT'  (actual: 'CT')" in out
    assert "[no ] ConvolutionKernel regex '^l$|lung'  (actual: 'B')" in out
    assert "[yes] SliceThickness le 5.0  (actual: '5.00')" in out
    assert "jobs at series completion: none" in out


def test_priority_if_positive_merges_to_the_most_urgent() -> None:
    ruleset = rules(
        """
rules:
  - {name: a, match: {Modality: CT}, pipelines: [echo, other], priority_if_positive: routine}
  - {name: b, match: {Modality: CT}, pipelines: [echo], priority_if_positive: stat}
"""
    )
    jobs, _ = route_series(ruleset, SeriesFacts("1.1", {"Modality": "CT"}))
    escalation = {j.pipeline: j.priority_if_positive for j in jobs}
    assert escalation == {"echo": Priority.STAT, "other": Priority.ROUTINE}
    without = rules("rules:\n  - {name: a, match: {Modality: CT}, pipelines: [other]}\n")
    [job] = route_series(without, SeriesFacts("1.1", {"Modality": "CT"}))[0]
    assert job.priority_if_positive is None
