"""Real series made unlike a chest CT, for the input guard's tests and `make eval`: flipped
head to feet, cut to the bottom fifth (upper abdomen), heavily noised, and a 128 x 128
corner cut out of every slice (mostly air and arm, no chest)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from pipelines.volume import Volume

KINDS = ("flipped", "abdomen", "noised", "corner")


def perturbed(
    volume: Volume, seed: int = 0, kinds: tuple[str, ...] = KINDS
) -> Iterator[tuple[str, Volume]]:
    """(kind, volume) for each of `kinds`, made only when asked for (the noise of a 150-slice
    series is 300 MB); the geometry is left as it was."""
    voxels = volume.voxels
    count = voxels.shape[0]
    inferior_first = volume.affine[2, 0] > 0  # slice index grows towards the head
    keep = max(12, count // 5)
    bottom = slice(0, keep) if inferior_first else slice(count - keep, count)
    variants: dict[str, Callable[[], np.ndarray]] = {
        "flipped": lambda: voxels[::-1],
        "abdomen": lambda: voxels[bottom],
        "noised": lambda: (
            voxels + np.random.default_rng(seed).normal(0.0, 400.0, voxels.shape)
        ).astype(voxels.dtype),
        "corner": lambda: voxels[:, :128, :128],
    }
    for kind in kinds:
        yield kind, dataclasses.replace(volume, voxels=np.ascontiguousarray(variants[kind]()))
