"""Real series made unlike a chest CT, for the input guard's tests and `make eval`: flipped
head to feet, cut to the bottom fifth (upper abdomen), heavily noised, and a 128 x 128
corner cut out of every slice (mostly air and arm, no chest)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from pipelines.volume import Volume

KINDS = ("flipped", "abdomen", "noised", "corner")


def perturbed(volume: Volume, seed: int = 0) -> Iterator[tuple[str, Volume]]:
    """(kind, volume) for each of KINDS; the geometry is left as it was."""
    voxels = volume.voxels
    count = voxels.shape[0]
    inferior_first = volume.affine[2, 0] > 0  # slice index grows towards the head
    keep = max(12, count // 5)
    bottom = slice(0, keep) if inferior_first else slice(count - keep, count)
    noise = np.random.default_rng(seed).normal(0.0, 400.0, voxels.shape)
    variants = {
        "flipped": voxels[::-1],
        "abdomen": voxels[bottom],
        "noised": (voxels + noise).astype(voxels.dtype),
        "corner": voxels[:, :128, :128],
    }
    for kind in KINDS:
        yield kind, dataclasses.replace(volume, voxels=np.ascontiguousarray(variants[kind]))
