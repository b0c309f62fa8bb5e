"""Rendered images (PS3.18 10.4.1.1.3, `rendered` and `thumbnail`): a frame as a JPEG or PNG
a browser shows, for dashboards and worklists. CT values go through the modality LUT
(rescale) and a window: the one asked for (`window=center,width`), else the instance's own,
else the frame's range. `viewport=columns,rows` scales the picture to fit, never up."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.pixels.utils import pixel_array

from node.roles import Role
from node.web.context import requires
from node.web.multipart import accepted
from node.web.wado import Found, Stored

router = APIRouter(dependencies=[Depends(requires(Role.READER))])

MAX_VIEWPORT = 2048
THUMBNAIL = (128, 128)
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered", response_class=Response
)
def rendered_instance(
    request: Request,
    found: Found,
    window: Annotated[str | None, Query()] = None,
    viewport: Annotated[str | None, Query()] = None,
    quality: Annotated[int, Query(ge=1, le=100)] = 90,
) -> Response:
    return _render(request, found[0], 1, window, viewport, quality, None)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    response_class=Response,
)
def rendered_frame(
    request: Request,
    found: Found,
    frame: Annotated[int, Path(ge=1, le=1_000_000)],
    window: Annotated[str | None, Query()] = None,
    viewport: Annotated[str | None, Query()] = None,
    quality: Annotated[int, Query(ge=1, le=100)] = 90,
) -> Response:
    return _render(request, found[0], frame, window, viewport, quality, None)


@router.get("/studies/{study}/thumbnail", response_class=Response)
@router.get("/studies/{study}/series/{series}/thumbnail", response_class=Response)
@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail", response_class=Response
)
def thumbnail(request: Request, found: Found, viewport: str | None = None) -> Response:
    """The middle image of the first series (or of the series, or the instance itself)."""
    first_series = [item for item in found if item.series == found[0].series]
    return _render(request, first_series[len(first_series) // 2], 1, None, viewport, 80, THUMBNAIL)


def _render(
    request: Request,
    item: Stored,
    frame: int,
    window: str | None,
    viewport: str | None,
    quality: int,
    default_size: tuple[int, int] | None,
) -> Response:
    kind = _wanted_type(request.headers.get("accept"))
    size = _viewport(viewport) or default_size
    dataset = dcmread(item.path, stop_before_pixels=True)
    frames = int(dataset.get("NumberOfFrames") or 1)
    if "Rows" not in dataset or not 1 <= frame <= frames:
        raise HTTPException(404, detail=f"the instance has no image frame {frame}")
    try:
        pixels = pixel_array(item.path, index=frame - 1)
    except Exception as exc:  # a pixel encoding no installed decoder reads
        raise HTTPException(406, detail=f"the pixels cannot be decoded here: {exc}") from exc
    picture = Image.fromarray(_eight_bit(pixels, dataset, _window(window)))
    if size is not None:
        picture.thumbnail(size)
    buffer = io.BytesIO()
    picture.save(buffer, FORMATS[kind], quality=quality)
    return Response(buffer.getvalue(), media_type=kind)


def _eight_bit(
    pixels: np.ndarray, dataset: Dataset, window: tuple[float, float] | None
) -> np.ndarray:
    """Stored values as 0-255 grey levels (colour images as they are)."""
    if pixels.ndim == 3:
        return np.asarray(pixels, dtype=np.uint8)
    values = pixels.astype(np.float32) * float(dataset.get("RescaleSlope", 1) or 1)
    values += float(dataset.get("RescaleIntercept", 0) or 0)
    center, width = window or _own_window(dataset) or _range(values)
    low = center - width / 2
    grey = np.clip((values - low) / max(width, 1e-6), 0.0, 1.0) * 255
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return grey.astype(np.uint8)


def _own_window(dataset: Dataset) -> tuple[float, float] | None:
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None:
        return None
    first = [value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value
             for value in (center, width)]  # fmt: skip
    try:
        return float(first[0]), float(first[1])
    except (TypeError, ValueError):
        return None


def _range(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    return (low + high) / 2, max(high - low, 1.0)


def _window(text: str | None) -> tuple[float, float] | None:
    """`center,width[,function]` (only a linear function is drawn); 400 otherwise."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError) as exc:
        raise HTTPException(400, detail="window is center,width[,function]") from exc
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0 or len(parts) > 3:
        raise HTTPException(400, detail="window is center,width[,function], width above 0")
    return center, width


def _viewport(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        columns, rows = (int(value) for value in text.split(",")[:2])
    except ValueError as exc:
        raise HTTPException(400, detail="viewport is columns,rows") from exc
    if not (1 <= columns <= MAX_VIEWPORT and 1 <= rows <= MAX_VIEWPORT):
        raise HTTPException(400, detail=f"viewport sides are 1 to {MAX_VIEWPORT}")
    return columns, rows


def _wanted_type(accept: str | None) -> str:
    for kind, _ in accepted(accept, "image/jpeg"):
        if kind in FORMATS:
            return kind
        if kind in ("*/*", "image/*"):
            return "image/jpeg"
    raise HTTPException(406, detail="rendered images are image/jpeg or image/png")
