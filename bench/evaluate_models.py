"""`make eval`, model pipelines: nodule-detection against the tumour boxes of
Lung-PET-CT-Dx, covid-triage against the COVID-CT-MD diagnoses, with the models a node
config names. A pipeline that is not configured, or whose model is missing, is reported as
such; with small test models the table still prints (their figures mean nothing).

    python bench/evaluate_models.py [--config config.example.yaml] [--data ../shared/data]

Detection: a tumour (the annotated boxes of one label, as one box in patient space, the
same for both kernels of the acquisition) is found when a reported detection's centre lies
inside it; every other detection is a false positive. Triage: the decision against each
case's diagnosis.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.config import load_settings
from pipelines import codes
from pipelines.registry import build_pipelines
from pipelines.volume import Volume, load_volume

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DETECTION_CASES = ("lung-pet-ct-dx/A0001/series-2", "lung-pet-ct-dx/A0001/series-3")
TRIAGE_CASES = {
    "covid-ct-md/covid/P001": codes.COVID_19,
    "covid-ct-md/cap/cap001": codes.COMMUNITY_ACQUIRED_PNEUMONIA,
    "covid-ct-md/normal/normal001": codes.NORMAL,
}


def tumour_corners(annotations: Path, volume: Volume) -> dict[str, list[np.ndarray]]:
    """The patient-space corners of each label's boxes drawn on this series' slices."""
    index = {s.sop_instance_uid: k for k, s in enumerate(volume.sources)}
    corners: dict[str, list[np.ndarray]] = {}
    for xml in annotations.glob("*.xml"):
        k = index.get(xml.stem)
        if k is None:
            continue
        for item in ET.parse(xml).getroot().iter("object"):
            box = item.find("bndbox")
            x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            for row, column in ((y0, x0), (y1, x1)):
                corners.setdefault(item.findtext("name") or "?", []).append(
                    volume.to_patient((k, row, column))
                )
    return corners


def inside(point: np.ndarray, box: tuple[np.ndarray, np.ndarray], margin_mm: float = 1.0) -> bool:
    low, high = box
    return bool(np.all((low - margin_mm <= point) & (point <= high + margin_mm)))


def evaluate_detection(pipeline, data: Path) -> str:  # type: ignore[no-untyped-def]
    volumes = [
        load_volume(sorted((data / r).glob("*.dcm")), requirements=pipeline.requirements)
        for r in DETECTION_CASES
    ]
    # each tumour's boxes, from whichever kernel they were drawn on, as one box in patient
    # space: the two kernels are one acquisition, so it holds for both
    corners: dict[str, list[np.ndarray]] = {}
    for relative, volume in zip(DETECTION_CASES, volumes, strict=True):
        for label, points in tumour_corners(
            (data / relative).parent / "annotations", volume
        ).items():
            corners.setdefault(label, []).extend(points)
    boxes = [(np.min(p, axis=0), np.max(p, axis=0)) for p in corners.values()]
    found = false_positives = 0
    for volume in volumes:
        centers = [np.asarray(d.center) for d in pipeline.run(volume).detections]
        found += sum(any(inside(c, box) for c in centers) for box in boxes)
        false_positives += sum(not any(inside(c, box) for box in boxes) for c in centers)
    scans = len(volumes)
    expected = scans * len(boxes)
    sensitivity = found / expected if expected else float("nan")
    return (
        f"| nodule-detection | {scans} scans, {len(boxes)} tumours | sensitivity "
        f"{sensitivity:.2f} ({found}/{expected}) | {false_positives / scans:.1f} FP per scan |"
    )


def evaluate_triage(pipeline, data: Path) -> str:  # type: ignore[no-untyped-def]
    correct, lines = 0, []
    for relative, truth in TRIAGE_CASES.items():
        files = sorted((data / relative).glob("*.dcm"))
        findings = pipeline.run(load_volume(files, requirements=pipeline.requirements)).findings
        decision = next(f.concept for f in findings if f.present)
        correct += decision == truth
        lines.append(f"{Path(relative).name}: {decision.meaning}")
    return (
        f"| covid-triage | {len(TRIAGE_CASES)} scans | accuracy {correct / len(TRIAGE_CASES):.2f} "
        f"({correct}/{len(TRIAGE_CASES)}) | {'; '.join(lines)} |"
    )


EVALUATIONS = {"nodule-detection": evaluate_detection, "covid-triage": evaluate_triage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--config", type=Path, default=root / "config.example.yaml")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}")
    settings = load_settings(args.config)
    pipelines = build_pipelines(settings.pipelines)
    print("| pipeline | cases | figure | detail |")
    print("|---|---|---|---|")
    for kind, evaluate in EVALUATIONS.items():
        names = [n for n, s in settings.pipelines.items() if (s.type or n) == kind]
        if not names:
            print(f"| {kind} | - | not configured in {args.config.name} | |")
        for name in names:
            problem = pipelines[name].problem()
            if problem:
                print(f"| {name} | - | unavailable: {problem} | |")
                continue
            print(evaluate(pipelines[name], args.data))


if __name__ == "__main__":
    main()
