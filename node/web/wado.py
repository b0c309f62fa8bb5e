"""WADO-RS (PS3.18 10.4) from the node's store: studies, series and instances as
multipart/related Part 10 files (as stored with `transfer-syntax=*`, else transcoded to the
syntax asked for, Explicit VR Little Endian by default), their metadata as DICOM JSON,
frames (decoded, native little endian) and bulk data.

Files are streamed from disk in chunks: a series costs the memory of one chunk, not its size.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from email.utils import formatdate
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydicom import Dataset, dcmread
from pydicom.encaps import get_frame
from pydicom.pixels.utils import pack_bits, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import select

from node.edge.transcode import transcoded
from node.roles import Role
from node.store.db.models import Instance, Series, Study
from node.web.context import Context, requires, retrieve_url
from node.web.dicom_json import dicom_json_response
from node.web.multipart import MultipartWriter, accepted

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(requires(Role.READER))])

MAX_FRAME_LIST = 2048
HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")
CHUNK_BYTES = 8 << 20
"""Most CT instances are read in one go."""
TRANSCODABLE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
PIXEL_DATA = 0x7FE00010
STORED_FRAME_TYPES = {
    **dict.fromkeys(
        (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1), "image/jpeg"
    ),
    **dict.fromkeys((JPEGLSLossless, JPEGLSNearLossless), "image/jls"),
    **dict.fromkeys((JPEG2000Lossless, JPEG2000), "image/jp2"),
    RLELossless: "image/x-dicom-rle",
}
"""The media type of a frame served as stored, by the stored transfer syntax (PS3.18
Table 8.7.3-2)."""
NATIVE_SYNTAX = ExplicitVRLittleEndian
NATIVE = f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"


class Stored:
    """An instance's file and transfer syntax, and its place in the hierarchy."""

    def __init__(self, row: Any, storage: Path) -> None:
        self.path = storage / row.path
        self.transfer_syntax = UID(row.transfer_syntax_uid)
        self.study = row.study_instance_uid
        self.series = row.series_instance_uid
        self.sop_instance_uid = row.sop_instance_uid

    def url(self, base: str) -> str:
        return retrieve_url(base, self.study, self.series, self.sop_instance_uid)


def _stored(
    context: Context, study: str, series: str | None = None, instance: str | None = None
) -> list[Stored]:
    """The instances under a study, series or instance; 404 when there are none."""
    statement = (
        select(
            Instance.path,
            Instance.transfer_syntax_uid,
            Instance.sop_instance_uid,
            Series.series_instance_uid,
            Study.study_instance_uid,
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Study.study_instance_uid == study)
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    if series is not None:
        statement = statement.where(Series.series_instance_uid == series)
    if instance is not None:
        statement = statement.where(Instance.sop_instance_uid == instance)
    with context.engine.connect() as conn:
        rows = conn.execute(statement).all()
    if not rows:
        raise HTTPException(404, detail="no such study, series or instance on this node")
    return [Stored(row, context.store.root) for row in rows]


Found = Annotated[list[Stored], Depends(_stored)]


@router.get("/studies/{study}", response_class=Response)
@router.get("/studies/{study}/series/{series}", response_class=Response)
@router.get("/studies/{study}/series/{series}/instances/{instance}", response_class=Response)
def retrieve(request: Request, found: Found) -> Response:
    target = _wanted_syntax(request.headers.get("accept"))
    unchanged, validators = _validators(request, found, f"instances {target}")
    if unchanged is not None:
        return unchanged
    writer = MultipartWriter("application/dicom")

    def parts() -> Iterator[tuple[str, Iterator[bytes]]]:
        for item in found:
            syntax = item.transfer_syntax if target is None else target
            yield f"application/dicom; transfer-syntax={syntax}", _instance_bytes(item, target)

    return StreamingResponse(
        writer.frame(parts()), media_type=writer.content_type(), headers=validators
    )


@router.get("/studies/{study}/metadata", response_class=Response)
@router.get("/studies/{study}/series/{series}/metadata", response_class=Response)
@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata", response_class=Response
)
def metadata(request: Request, found: Found, context: Context) -> Response:
    base = context.base_url(request)
    unchanged, validators = _validators(request, found, f"metadata {base}")
    if unchanged is not None:
        return unchanged
    response = dicom_json_response(_metadata(item, base) for item in found)
    response.headers.update(validators)
    return response


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    response_class=Response,
)
def frames(request: Request, frames: str, found: Found) -> Response:
    numbers = _frame_numbers(frames)
    item = found[0]
    as_stored = _frames_as_stored(request.headers.get("accept"), item.transfer_syntax)
    header = dcmread(item.path, stop_before_pixels=not as_stored)  # as stored: read once
    count = int(header.get("NumberOfFrames") or 1)
    if "Rows" not in header or any(n < 1 or n > count for n in numbers):
        raise HTTPException(404, detail=f"the instance has {count} frames")
    unchanged, validators = _validators(request, found, f"frames {frames} {as_stored}")
    if unchanged is not None:
        return unchanged
    if as_stored:
        part_type = (
            f"{STORED_FRAME_TYPES[item.transfer_syntax]}; transfer-syntax={item.transfer_syntax}"
        )
        parts = (
            (part_type, iter([get_frame(header.PixelData, n - 1, number_of_frames=count)]))
            for n in numbers
        )
    else:
        part_type = NATIVE
        parts = ((NATIVE, iter([_frame(item.path, header, n - 1)])) for n in numbers)
    writer = MultipartWriter(part_type)
    return StreamingResponse(
        writer.frame(parts), media_type=writer.content_type(), headers=validators
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    response_class=Response,
)
def bulkdata(tag: str, found: Found) -> Response:
    if not HEX_TAG.fullmatch(tag):
        raise HTTPException(400, detail="a bulk data tag is 8 hex digits")
    wanted = Tag(int(tag, 16))
    dataset = dcmread(found[0].path)
    if wanted not in dataset:
        raise HTTPException(404, detail=f"the instance has no {tag}")
    if wanted == PIXEL_DATA and dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress(generate_instance_uid=False)
    value = dataset[wanted].value
    if not isinstance(value, bytes):
        raise HTTPException(404, detail=f"{tag} is not bulk data")
    writer = MultipartWriter("application/octet-stream")
    parts = [("application/octet-stream", iter([value]))]
    return StreamingResponse(writer.frame(parts), media_type=writer.content_type())


def _frames_as_stored(accept: str | None, stored: UID) -> bool:
    """Whether frames go as stored (False: decoded, native): the first Accept entry that
    can be served decides (PS3.18 8.7.4); 406 when none can."""
    stored_type = STORED_FRAME_TYPES.get(stored)
    for kind, params in accepted(accept, "*/*"):
        wanted = params.get("type", "application/octet-stream").lower()
        if kind != "multipart/related":
            wanted = kind  # a bare part type, as some clients send
        syntax = params.get("transfer-syntax")
        native = wanted in ("application/octet-stream", "*/*", "*")
        if native and syntax in (None, "*", NATIVE_SYNTAX):
            return False
        if wanted == stored_type and syntax in (None, "*", stored):
            return True
    offered = "application/octet-stream" + (f" or {stored_type} ({stored})" if stored_type else "")
    raise HTTPException(406, detail=f"the frames of this instance are served as {offered}")


def _validators(
    request: Request, found: list[Stored], variant: str
) -> tuple[Response | None, dict[str, str]]:
    """The ETag and Last-Modified of what `found` serves as `variant` (the files' sizes and
    times, and the representation asked for); with them, a 304 when the client's copy is
    current (If-None-Match), else None."""
    stats = [item.path.stat() for item in found]
    digest = hashlib.sha256(variant.encode())
    for item, stat in zip(found, stats, strict=True):
        digest.update(f"{item.sop_instance_uid} {stat.st_size} {stat.st_mtime_ns}".encode())
    etag = f'W/"{digest.hexdigest()[:32]}"'
    headers = {
        "ETag": etag,
        "Last-Modified": formatdate(max(s.st_mtime for s in stats), usegmt=True),
    }
    wanted = {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}
    if etag in wanted or "*" in wanted:
        return Response(status_code=304, headers=headers), headers
    return None, headers


def _frame_numbers(text: str) -> list[int]:
    """Frame numbers as asked, each once, in the order first asked; 400 for a list that is
    not numbers or longer than MAX_FRAME_LIST (each repeat would decode the frame again)."""
    items = text.split(",", MAX_FRAME_LIST)
    if len(items) > MAX_FRAME_LIST:
        raise HTTPException(400, detail=f"at most {MAX_FRAME_LIST} frame numbers per request")
    if not all(item.isdigit() and len(item) <= 9 for item in items):
        raise HTTPException(400, detail="frames are numbers from 1, comma separated")
    return list(dict.fromkeys(int(item) for item in items))


def _wanted_syntax(accept: str | None) -> UID | None:
    """The transfer syntax asked for (None: as stored); 406 when none can be served."""
    for kind, params in accepted(accept, "multipart/related; type=application/dicom"):
        part_type = params.get("type", "application/dicom").lower()
        if kind not in ("multipart/related", "*/*") or part_type != "application/dicom":
            continue
        syntax = params.get("transfer-syntax", ExplicitVRLittleEndian)
        if syntax == "*":
            return None
        if syntax in TRANSCODABLE:
            return UID(syntax)
    raise HTTPException(
        406,
        detail='serves multipart/related; type="application/dicom" with transfer-syntax=* '
        f"(as stored), {ExplicitVRLittleEndian} or {ImplicitVRLittleEndian}",
    )


def _instance_bytes(item: Stored, target: UID | None) -> Iterator[bytes]:
    if target is None or target == item.transfer_syntax:
        with item.path.open("rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                yield chunk
        return
    dataset = transcoded(dcmread(item.path), target)
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    yield buffer.getvalue()


def _metadata(item: Stored, base: str) -> dict[str, Any]:
    """The instance as DICOM JSON; its Pixel Data, if any, as a BulkDataURI."""
    dataset = dcmread(item.path, stop_before_pixels=True)
    content: dict[str, Any] = dataset.to_json_dict(bulk_data_threshold=1 << 30)
    if "Rows" in dataset:
        content["7FE00010"] = {"vr": "OW", "BulkDataURI": f"{item.url(base)}/bulkdata/7fe00010"}
    return content


def _frame(path: Path, header: Dataset, index: int) -> bytes:
    """One frame, decoded, as native little-endian bytes (bit-packed for 1-bit pixels)."""
    array = pixel_array(path, index=index)
    if int(header.BitsAllocated) == 1:
        return bytes(pack_bits(array))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
