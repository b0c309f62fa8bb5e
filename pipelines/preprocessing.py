"""From a Volume to what a MONAI network takes: a channel-first RAS MetaTensor, optionally
cropped to the lungs, then the bundle's own preprocessing (its file loading dropped) or
one built from config."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from pipelines.base import BadInput
from pipelines.context import Context
from pipelines.settings import PreprocessingSettings
from pipelines.volume import Volume

IO_TRANSFORMS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd")
SAVE_TRANSFORMS = ("SaveImage", "SaveImaged")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
"""What the MetaTensor's affine means (MONAI's default so far, named to keep it)."""

Box = tuple[slice, slice, slice]


def to_meta_tensor(volume: Volume, box: Box | None = None) -> MetaTensor:
    """The volume (or the voxels in `box`) as MONAI expects it: channel first, axes (column,
    row, slice), RAS affine."""
    box = box or (slice(None),) * 3
    voxels = volume.voxels[box]
    start = [s.start or 0 for s in box]
    affine = volume.affine.copy()
    affine[:3, 3] = volume.to_patient(start)
    array = np.ascontiguousarray(voxels.transpose(2, 1, 0), dtype=np.float32)[None]
    ras = LPS_TO_RAS @ affine[:, [2, 1, 0, 3]]
    return MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(ras))


def lung_box(volume: Volume, margin_mm: float, context: Context) -> Box:
    """The voxels around both lungs (lung-quant's segmentation), with a margin."""
    found = context.lungs(volume)
    lungs = (found.left | found.right).numpy()
    if not lungs.any():
        raise BadInput("no lungs found to crop the scan to")
    margins = [int(np.ceil(margin_mm / spacing)) for spacing in volume.spacing]
    return bounding_box(lungs, margins)


def foreground_box(volume: Volume, above_hu: float) -> Box:
    """The voxels' bounding box above `above_hu` (the whole volume when none is)."""
    inside = volume.voxels > above_hu
    if not inside.any():
        return (slice(None),) * 3
    return bounding_box(inside, [0, 0, 0])


def bounding_box(mask: np.ndarray, margins: list[int]) -> Box:
    """The smallest box around a non-empty 3-D mask, widened by `margins` voxels per axis
    (not past the first voxel)."""
    box = []
    for axis, margin in enumerate(margins):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(0, int(present[0]) - margin), int(present[-1]) + 1 + margin))
    slices, rows, columns = box
    return slices, rows, columns


def crop_box(volume: Volume, settings: PreprocessingSettings, context: Context) -> Box | None:
    if settings.crop == "lungs":
        return lung_box(volume, settings.crop_margin_mm, context)
    if settings.crop == "foreground":
        return foreground_box(volume, settings.foreground_hu)
    return None


def configured(settings: PreprocessingSettings) -> Compose:
    """Orientation, spacing, HU window to 0..1 and the network's input size, from config."""
    transforms: list[Any] = [Orientationd("image", axcodes=settings.orientation, labels=RAS_LABELS)]
    if settings.spacing_mm:
        transforms.append(Spacingd("image", pixdim=settings.spacing_mm, mode="bilinear"))
    size = settings.spatial_size
    averaged = size is not None and not settings.spacing_mm and settings.resize_mode == "area"
    if averaged and size is not None:
        transforms.append(Resized("image", size, mode="area"))
    low, high = settings.intensity_range
    transforms.append(
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    )
    if settings.spatial_size and settings.spacing_mm:
        transforms.append(ResizeWithPadOrCropd("image", settings.spatial_size))
    elif settings.spatial_size and not averaged:
        transforms.append(Resized("image", settings.spatial_size, mode="trilinear"))
    transforms.append(EnsureTyped("image"))
    return Compose(transforms)


def strip_io(parser: ConfigParser) -> None:
    """Drop a bundle's file loading and saving transforms: the node hands the volume over in
    memory and takes the prediction back the same way."""
    config = parser.get()
    for key, names in (("preprocessing", IO_TRANSFORMS), ("postprocessing", SAVE_TRANSFORMS)):
        if key in config:
            config[key]["transforms"] = without(config[key]["transforms"], names)
    parser.ref_resolver.reset()  # forget anything parsed before the edit


def bundle_part(parser: ConfigParser | None, key: str) -> Any:
    """A bundle's `preprocessing`, `inferer`, `postprocessing`... built, or None."""
    if parser is None or key not in parser.get():
        return None
    return parser.get_parsed_content(key, instantiate=True)


def preprocessing_for(parser: ConfigParser | None, settings: PreprocessingSettings) -> Compose:
    """The bundle's preprocessing when it has one, else the configured one."""
    return bundle_part(parser, "preprocessing") or configured(settings)


def without(transforms: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [t for t in transforms if str(t.get("_target_", "")).split(".")[-1] not in names]
