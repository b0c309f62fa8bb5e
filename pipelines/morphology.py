"""Binary morphology on boolean torch tensors (CPU or GPU), connected components (SciPy, CPU),
Euclidean distances (edt, CPU, multi-threaded).

Structuring elements are boxes given as radii in voxels per axis (slice, row, column).
"""

from __future__ import annotations

import edt
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

Radii = tuple[int, int, int]

IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def dilate(mask: torch.Tensor, radii: Radii) -> torch.Tensor:
    """Box dilation as repeated one-voxel shifts along each axis (cheap on CPU and GPU)."""
    out = mask.clone()
    for axis, radius in enumerate(radii):
        for _ in range(radius):
            grown = out.clone()
            length = out.shape[axis]
            grown.narrow(axis, 1, length - 1).logical_or_(out.narrow(axis, 0, length - 1))
            grown.narrow(axis, 0, length - 1).logical_or_(out.narrow(axis, 1, length - 1))
            out = grown
    return out


def erode(mask: torch.Tensor, radii: Radii) -> torch.Tensor:
    return ~dilate(~mask, radii)


def opening(mask: torch.Tensor, radii: Radii) -> torch.Tensor:
    return dilate(erode(mask, radii), radii)


def closing(mask: torch.Tensor, radii: Radii) -> torch.Tensor:
    """Closing that treats outside the volume as background (no shrinking at the borders)."""
    pad = [r for radius in reversed(radii) for r in (radius, radius)]
    padded = F.pad(mask, pad)
    closed = erode(dilate(padded, radii), radii)
    z, y, x = radii
    return closed[z : z + mask.shape[0], y : y + mask.shape[1], x : x + mask.shape[2]]


def close_ball(
    mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float
) -> np.ndarray:
    """Closing by a ball of `radius_mm` (Euclidean, anisotropic `spacing` in mm), from two
    distance transforms: every gap narrower than the ball's diameter is bridged, wider ones
    are not. Outside the volume counts as background."""
    pad = [int(np.ceil(radius_mm / step)) + 1 for step in spacing]
    padded = np.pad(mask, [(p, p) for p in pad])
    dilated = depth(~padded, spacing) <= radius_mm
    closed = depth(dilated, spacing) > radius_mm
    return closed[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape, strict=True))] | mask


def depth(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Each voxel's Euclidean distance (mm, anisotropic `spacing`) to the nearest voxel
    outside `mask` (0 outside it), as SciPy's `distance_transform_edt`, in torch's threads."""
    return np.asarray(
        edt.edt(
            np.ascontiguousarray(mask),
            anisotropy=spacing,
            black_border=False,
            parallel=max(1, torch.get_num_threads()),
        )
    )


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes slice by slice (holes in a chest are 2-D: the lungs in the thorax):
    the background of each slice that does not reach the slice's edge, found with one
    labelling (a fill by repeated dilation takes as many passes as a hole is wide)."""
    labels, count = ndimage.label(~mask, structure=IN_PLANE)
    reaches_edge = np.zeros(count + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        reaches_edge[edge] = True
    reaches_edge[0] = True  # the mask itself
    return mask | ~reaches_edge[labels]


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label 6-connected components; returns the labels and each component's voxel count."""
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels, sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, sizes = components(mask)
    if sizes.max(initial=0) == 0:
        return np.zeros_like(mask)
    return labels == int(np.argmax(sizes))
