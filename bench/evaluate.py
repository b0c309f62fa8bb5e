"""`make eval`: lung-quant against the ground truth in ../shared/data.

Prints, per real series: lung volumes, mean lung density, LAA-950, Perc15 and high-attenuation
lung; the slice-level ROC AUC of the high-attenuation profile against the COVID-CT-MD
infection labels; the Dice of the lung masks between the two kernels of one Lung-PET-CT-Dx
acquisition; and, against the aerated lung alone (the masks before the pleural surface is
reconstructed), the lung-volume change, the mediastinum leakage (mask voxels above -200 HU
outside annotated lesions: the tumour boxes, the slices labelled infected) and how much of
the annotated tumour boxes the masks cover, beside how much of the boxes is bone or fat (which
no lung mask may hold: the boxes reach into the chest wall and the aortic wall).

    python bench/evaluate.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import torch
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import codes
from pipelines.anatomy.lungs import BONE_HU, segment_lungs
from pipelines.kernel import reconstruction
from pipelines.lung_quant import LungQuantPipeline
from pipelines.result import PipelineResult, Region
from pipelines.volume import Volume, load_volume

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CASES = {
    "covid P001": ("covid-ct-md/covid/P001", "P001"),
    "cap cap001": ("covid-ct-md/cap/cap001", "cap001"),
    "normal001": ("covid-ct-md/normal/normal001", None),
    "A0001 lung kernel": ("lung-pet-ct-dx/A0001/series-2", None),
    "A0001 body kernel": ("lung-pet-ct-dx/A0001/series-3", None),
}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney ROC AUC (ties count half)."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def label_row(folder: Path, case: str) -> int:
    for line in (folder / "Index.csv").read_text().splitlines()[1:]:
        parts = line.split(",")
        if parts[-1].strip() == case:
            return int(parts[0])
    raise KeyError(case)


def slice_labels(folder: Path, row: int, volume: Volume) -> np.ndarray:
    """The COVID-CT-MD slice labels of one case, in the volume's slice order.

    The release indexes slices by Slice Location, descending (head first): checked on the
    images, the ascending reading ranks infected slices below chance on every labelled case.
    """
    labels = np.load(folder / "Slice-level-labels-updated-1.npy")[row]
    locations = [
        float(pydicom.dcmread(s.path, stop_before_pixels=True).SliceLocation)
        for s in volume.sources
    ]
    rank = np.argsort(np.argsort(-np.asarray(locations)))
    return labels[rank].astype(bool)


def leakage(mask: np.ndarray, hu: np.ndarray, lesions: np.ndarray) -> float:
    """Mask voxels above -200 HU outside the annotated lesions, as a fraction of the mask."""
    return float((mask & (hu > -200) & ~lesions).sum() / max(1, mask.sum()))


def tumour_boxes(annotations: Path, volume: Volume) -> np.ndarray:
    """The annotated tumour boxes as a mask on the volume's grid."""
    index = {s.sop_instance_uid: k for k, s in enumerate(volume.sources)}
    boxes = np.zeros(volume.voxels.shape, dtype=bool)
    for xml in annotations.glob("*.xml"):
        k = index.get(xml.stem)
        if k is None:
            continue
        for box in ET.parse(xml).getroot().iter("bndbox"):
            x0, y0, x1, y1 = (int(float(box.findtext(t))) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes[k, y0 : y1 + 1, x0 : x1 + 1] = True
    return boxes


def measured(region: Region, concept: codes.Code) -> float:
    """A region's measurement, NaN where it was not measured (densitometry on a sharp kernel)."""
    return next((m.value for m in region.measurements if m.concept == concept), float("nan"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}")
    pipeline = LungQuantPipeline("auto")
    labels_folder = args.data / "covid-ct-md"
    results: dict[str, tuple[Volume, PipelineResult]] = {}
    print(
        f"{'series':<18} {'slices':>6} {'L mL':>7} {'R mL':>7} {'total':>7} {'MLD':>6} "
        f"{'LAA950%':>8} {'Perc15':>7} {'HAA%':>6} {'AUC %':>6} {'AUC cm2':>8} {'s':>5}"
    )
    pooled_scores, pooled_labels = [], []
    lesions: dict[str, np.ndarray] = {}
    for name, (relative, case) in CASES.items():
        files = sorted((args.data / relative).glob("*.dcm"))
        clock = time.perf_counter()
        volume = load_volume(files, requirements=pipeline.requirements)
        result = pipeline.run(volume)
        seconds = time.perf_counter() - clock
        results[name] = (volume, result)
        lungs = (result.mask("Left lung").array | result.mask("Right lung").array).any(axis=(1, 2))
        nothing = [float("nan")] * len(volume.sources)  # a sharp kernel: no densitometry
        percent = np.asarray(result.profiles[0].values if result.profiles else nothing)
        area = np.asarray(result.profiles[1].values if result.profiles else nothing)
        auc_percent = auc_area = float("nan")
        if relative.startswith("covid-ct-md"):
            truth = (
                slice_labels(labels_folder, label_row(labels_folder, case), volume)
                if case
                else np.zeros(len(volume.sources), bool)
            )
            lesions[name] = np.broadcast_to(truth[:, None, None], volume.voxels.shape)
            if case:
                auc_percent = roc_auc(percent[lungs], truth[lungs])
                auc_area = roc_auc(area[lungs], truth[lungs])
            pooled_scores.append(area[lungs])
            pooled_labels.append(truth[lungs])
        both = result.region("Both lungs")
        print(
            f"{name:<18} {len(volume.sources):>6} "
            f"{result.region('Left lung').value(codes.VOLUME):>7.0f} "
            f"{result.region('Right lung').value(codes.VOLUME):>7.0f} "
            f"{both.value(codes.VOLUME):>7.0f} {both.value(codes.MEAN_ATTENUATION):>6.0f} "
            f"{measured(both, codes.LAA950):>8.2f} {measured(both, codes.PERC15):>7.0f} "
            f"{measured(both, codes.HIGH_ATTENUATION):>6.2f} {auc_percent:>6.3f} {auc_area:>8.3f} "
            f"{seconds:>5.1f}"
        )
    print("\nwhat each SR says of its reconstruction (kernel class, densitometry measured or not):")
    for name, (volume, result) in results.items():
        kind = reconstruction(volume.file_headers[0]).kind
        print(f"{name:<18} {kind:<7} {' '.join(note.text for note in result.notes)}")
    pooled = roc_auc(np.concatenate(pooled_scores), np.concatenate(pooled_labels))
    print(f"\nslice-level ROC AUC, HAA area, 3 COVID-CT-MD cases pooled: {pooled:.3f}")
    (_, lung), (volume, body) = results["A0001 lung kernel"], results["A0001 body kernel"]
    for label in ("Left lung", "Right lung"):
        value = dice(lung.mask(label).array, body.mask(label).array)
        print(f"Dice {label.lower()}, lung vs body kernel: {value:.4f}")
    annotations = args.data / "lung-pet-ct-dx" / "A0001" / "annotations"
    print("\nlung masks with the pleural surface reconstructed, against the aerated lung alone")
    print("| series | volume change | leakage before -> after | tumour boxes covered |")
    print("|---|---|---|---|")
    for name, (volume, result) in results.items():
        hu = torch.from_numpy(volume.voxels)
        found = segment_lungs(hu, volume, pathology=False)
        aerated = (found.left | found.right).numpy()
        lungs = result.mask("Left lung").array | result.mask("Right lung").array
        boxes = lesions.get(name)
        if boxes is None:
            boxes = tumour_boxes(annotations, volume) if "A0001" in name else np.zeros_like(lungs)
        change = 100 * (lungs.sum() / aerated.sum() - 1)
        covered = "-"
        if boxes.any() and "A0001" in name:
            before, after = ((m & boxes).sum() / boxes.sum() for m in (aerated, lungs))
            inside = volume.voxels[boxes]
            bone, fat = (inside > BONE_HU).mean(), ((inside > -200) & (inside < -30)).mean()
            covered = (
                f"{100 * before:.1f} % -> {100 * after:.1f} % (the boxes hold {100 * bone:.1f} % "
                f"bone or calcium and {100 * fat:.1f} % fat: at most "
                f"{100 * (1 - bone - fat):.1f} % is lung or tumour)"
            )
        print(
            f"| {name} | {change:+.1f} % | {100 * leakage(aerated, volume.voxels, boxes):.2f} % "
            f"-> {100 * leakage(lungs, volume.voxels, boxes):.2f} % | {covered} |"
        )


if __name__ == "__main__":
    main()
