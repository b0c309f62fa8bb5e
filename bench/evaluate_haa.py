"""How much of the high-attenuation profile's slice AUC is the method, and how much the
shared cases: per labelled COVID-CT-MD case, the slice-level ROC AUC of the high-attenuation
area per slice (lung-quant's profile) against the infection labels, with a block bootstrap
interval, for lung-quant's method and for variants that drop one of its steps or take the
published HAA range (MESA: -600 to -250 HU, Podolanczuk et al., Eur Respir J 2016).

A step that lifts one case and lowers the other was fitted to the shared cases, not learnt
from them; the per-case spread, not one pooled number, is what a held-out case can expect.

    python bench/evaluate_haa.py [--data ../shared/data] [--resamples 2000]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipelines.lung_quant as lung_quant
from bench.evaluate import DEFAULT_DATA, label_row, roc_auc, slice_labels
from pipelines.anatomy.grid import WorkingGrid
from pipelines.context import Context
from pipelines.volume import Volume, load_volume

CASES = {"covid P001": ("covid/P001", "P001"), "cap cap001": ("cap/cap001", "cap001")}
BLOCK = 8
"""Slices per bootstrap block: neighbouring slices are not independent samples."""

Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, WorkingGrid], torch.Tensor]


def node_method(hu: torch.Tensor, lungs: torch.Tensor, aerated: torch.Tensor, grid: WorkingGrid):
    return lung_quant.high_attenuation(hu, aerated, grid)


def whole_lungs(hu: torch.Tensor, lungs: torch.Tensor, aerated: torch.Tensor, grid: WorkingGrid):
    """Looked for in the reconstructed lungs, not the aerated lung."""
    return lung_quant.high_attenuation(hu, lungs, grid)


def with_range(low: int, high: int) -> Method:
    def method(hu: torch.Tensor, lungs: torch.Tensor, aerated: torch.Tensor, grid: WorkingGrid):
        saved = lung_quant.HAA_RANGE_HU
        lung_quant.HAA_RANGE_HU = (low, high)
        try:
            return lung_quant.high_attenuation(hu, aerated, grid)
        finally:
            lung_quant.HAA_RANGE_HU = saved

    return method


def threshold_only(low: int, high: int) -> Method:
    """The range inside the lungs, no vessel removal, erosion or opening."""

    def method(hu: torch.Tensor, lungs: torch.Tensor, aerated: torch.Tensor, grid: WorkingGrid):
        return lungs & (hu >= low) & (hu <= high)

    return method


METHODS: dict[str, Method] = {
    "lung-quant (-700..-100, aerated, vessels out)": node_method,
    "in the reconstructed lungs": whole_lungs,
    "MESA range -600..-250": with_range(-600, -250),
    "threshold only -700..-100": threshold_only(-700, -100),
    "threshold only, MESA range": threshold_only(-600, -250),
}


def block_bootstrap(
    scores: np.ndarray, labels: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """A 95 % interval of the AUC, resampling runs of `BLOCK` neighbouring slices."""
    starts = np.arange(0, len(scores), BLOCK)
    blocks = [np.arange(s, min(s + BLOCK, len(scores))) for s in starts]
    values = []
    for _ in range(resamples):
        picked = np.concatenate([blocks[i] for i in rng.integers(0, len(blocks), len(blocks))])
        value = roc_auc(scores[picked], labels[picked])
        if not np.isnan(value):
            values.append(value)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def case_inputs(
    data: Path, relative: str, case: str
) -> tuple[Volume, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    folder = data / "covid-ct-md"
    volume = load_volume(sorted((folder / relative).glob("*.dcm")))
    found = Context.of(lung_quant.LungQuantPipeline("cpu"), lambda _: None).lungs(volume)
    hu = torch.from_numpy(volume.voxels)
    truth = slice_labels(folder, label_row(folder, case), volume)
    return volume, hu, found.left | found.right, found.aerated, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    if not (args.data / "covid-ct-md").is_dir():
        sys.exit(f"no COVID-CT-MD data under {args.data}")
    rng = np.random.default_rng(0)
    inputs = {name: case_inputs(args.data, *where) for name, where in CASES.items()}
    print(
        f"slice-level ROC AUC of the high-attenuation area per slice (95 % block bootstrap, "
        f"{BLOCK}-slice blocks, {args.resamples} resamples)"
    )
    print(f"| method | {' | '.join(CASES)} | spread between the cases |")
    print(f"|---|{'---|' * len(CASES)}---|")
    for label, method in METHODS.items():
        cells, aucs = [], []
        for volume, hu, lungs, aerated, truth in inputs.values():
            high = method(hu, lungs, aerated, WorkingGrid.for_volume(volume)) & lungs
            in_lungs = lungs.any(dim=(1, 2)).numpy()
            area = high.sum(dim=(1, 2)).double().numpy()[in_lungs]
            labels = truth[in_lungs]
            auc = roc_auc(area, labels)
            low, high_ci = block_bootstrap(area, labels, args.resamples, rng)
            cells.append(f"{auc:.3f} ({low:.2f}-{high_ci:.2f})")
            aucs.append(auc)
        print(f"| {label} | {' | '.join(cells)} | {max(aucs) - min(aucs):.3f} |")


if __name__ == "__main__":
    main()
