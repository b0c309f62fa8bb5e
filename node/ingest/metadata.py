"""Bytes -> `InstanceMetadata`: what the catalog keeps of a received instance, read from the
dataset as it arrived (C-STORE now, STOW-RS later), or from a stored file.

`scan_dataset` reads the hot values from a whole little-endian stream without building a
dataset; pydicom parses a dataset only when a series is created, or to judge a stream the scan
refused.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from node.ingest.scan import FIRST_PIXEL_DATA_TAG, Encoded, scan_dataset
from node.store.db.models import STUDY_KEYWORDS
from node.store.storage import InstanceKey

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF
STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x0020000D, 0x0020000E
SOP_CLASS_UID, SOP_INSTANCE_UID, INSTANCE_NUMBER = 0x00080016, 0x00080018, 0x00200013
NUMBER_OF_FRAMES, ROWS, COLUMNS, BITS_ALLOCATED = 0x00280008, 0x00280010, 0x00280011, 0x00280100
BINARY_US = frozenset({ROWS, COLUMNS, BITS_ALLOCATED})
"""Hot tags whose raw values are little-endian unsigned shorts, not text."""


HOT_TAGS = (
    STUDY_INSTANCE_UID,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    INSTANCE_NUMBER,
    NUMBER_OF_FRAMES,
    ROWS,
    COLUMNS,
    BITS_ALLOCATED,
)
"""What the catalog reads of every instance (QIDO-RS answers the image's size at instance
level); the rest only when a series is created."""


@dataclass(frozen=True)
class InstanceMetadata:
    """What the catalog keeps of one received instance.

    The UIDs, SOP Class and Instance Number are read for every instance, from the raw
    values; the study's and series' descriptive attributes only when a series is created,
    from the dataset `load_dataset` returns.
    """

    key: InstanceKey
    sop_class_uid: str
    instance_number: int | None
    load_dataset: Callable[[], Dataset] = field(repr=False, compare=False)
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceMetadata:
        """Read the metadata of `ds`; raises InvalidUID for a UID that cannot be stored."""
        texts = {
            tag: _number(ds, tag) if tag in BINARY_US else _raw_text(ds, tag) for tag in HOT_TAGS
        }
        return cls.from_values(texts, lambda: ds)

    @classmethod
    def from_raw(
        cls, values: Mapping[int, bytes], load_dataset: Callable[[], Dataset]
    ) -> InstanceMetadata:
        """From the raw values of `HOT_TAGS` (those absent from the dataset left out)."""
        texts = {
            tag: _unsigned_short(value) if tag in BINARY_US else _ascii(value)
            for tag, value in values.items()
        }
        return cls.from_values(texts, load_dataset)

    @classmethod
    def from_values(
        cls, texts: Mapping[int, str | None], load_dataset: Callable[[], Dataset]
    ) -> InstanceMetadata:
        key = InstanceKey.validated(
            texts.get(STUDY_INSTANCE_UID),
            texts.get(SERIES_INSTANCE_UID),
            texts.get(SOP_INSTANCE_UID),
        )
        return cls(
            key=key,
            sop_class_uid=texts.get(SOP_CLASS_UID) or "",
            instance_number=_as_int(texts.get(INSTANCE_NUMBER)),
            load_dataset=load_dataset,
            rows=_as_int(texts.get(ROWS)),
            columns=_as_int(texts.get(COLUMNS)),
            bits_allocated=_as_int(texts.get(BITS_ALLOCATED)),
            number_of_frames=_as_int(texts.get(NUMBER_OF_FRAMES)),
        )

    @cached_property
    def dataset(self) -> Dataset:
        return self.load_dataset()

    @cached_property
    def study_fields(self) -> dict[str, object]:
        ds = self.dataset
        return {column: _as_text(ds.get(keyword)) for column, keyword in STUDY_KEYWORDS.items()}

    @cached_property
    def series_fields(self) -> dict[str, object]:
        """What routing rules match on, besides the calling and called AE."""
        ds = self.dataset
        return {
            "modality": _as_text(ds.get("Modality")),
            "sop_class_uid": self.sop_class_uid,
            "body_part_examined": _as_text(ds.get("BodyPartExamined")),
            "series_description": _as_text(ds.get("SeriesDescription")),
            "protocol_name": _as_text(ds.get("ProtocolName")),
            "image_type": _as_text(ds.get("ImageType")),
            "slice_thickness": _as_float(ds.get("SliceThickness")),
            "convolution_kernel": _as_text(ds.get("ConvolutionKernel")),
            "manufacturer": _as_text(ds.get("Manufacturer")),
            "series_number": _as_int(ds.get("SeriesNumber")),
        }


def read_metadata(encoded: Encoded, transfer_syntax: UID) -> InstanceMetadata:
    """What the catalog needs of an instance; ValueError (or InvalidUID) if the dataset is
    not whole, not in `transfer_syntax`, or an image without its pixel data.

    A little-endian stream (deflated ones inflated first) is judged by `scan_dataset` alone,
    which reads it without building a dataset: pydicom would read a stream cut inside its last
    sequence delimiter, or in the other VR encoding, without complaint. pydicom parses a
    dataset only when a series is created, and judges big-endian streams.
    """
    encoded = inflated(encoded, transfer_syntax)
    if not transfer_syntax.is_little_endian:
        return InstanceMetadata.from_dataset(parse(encoded, transfer_syntax))
    scanned = scan_dataset(encoded, transfer_syntax.is_implicit_VR, (*HOT_TAGS, ROWS))
    if ROWS in scanned.values and scanned.last_tag < FIRST_PIXEL_DATA_TAG:
        raise ValueError("an image without its pixel data: the dataset ends before (7FE0,0010)")
    header = encoded[: scanned.pixels_at]  # the series needs no pixels
    return InstanceMetadata.from_raw(
        scanned.values, lambda: _parse_for_series(header, transfer_syntax)
    )


def inflated(encoded: Encoded, transfer_syntax: UID) -> Encoded:
    """The dataset with its deflate undone (as it is in other syntaxes); ValueError if it
    cannot be inflated."""
    if not transfer_syntax.is_deflated:
        return encoded
    try:
        return zlib.decompress(encoded, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise ValueError(f"deflated dataset cannot be inflated: {exc}") from exc


def reencoded(stored: Path, encoded: Encoded, transfer_syntax: UID) -> bool:
    """Whether `encoded` is the instance stored at `stored` in another transfer syntax: every
    public attribute but the pixel data the same (a PACS returning what it compressed).
    Private elements are left out: their VRs read differently in implicit and explicit VR."""
    try:
        kept = dcmread(stored, stop_before_pixels=True)
        if UID(kept.file_meta.TransferSyntaxUID) == transfer_syntax:
            return False
        sent = parse(inflated(encoded, transfer_syntax), transfer_syntax)
        return _public_attributes(kept) == _public_attributes(sent)
    except Exception as exc:  # pydicom raises many types on malformed input
        log.warning("cannot compare a re-sent instance with the stored one: %s", exc)
        return False


def _public_attributes(dataset: Dataset) -> dict[int, object]:
    return {
        int(element.tag): element.value
        for element in dataset
        if not element.tag.is_private and element.tag < FIRST_PIXEL_DATA_TAG
    }


def _parse_for_series(inflated: Encoded, transfer_syntax: UID) -> Dataset:
    """The dataset whose attributes describe a new series; empty (and logged) in the unlikely
    case that pydicom refuses a stream the scan accepted: the instance is stored regardless."""
    try:
        return parse(inflated, transfer_syntax)
    except Exception as exc:  # pydicom raises many types on malformed input
        log.warning("series attributes unreadable, left empty: %s", exc)
        return Dataset()


def parse(inflated: Encoded, transfer_syntax: UID) -> Dataset:
    """The dataset as sent (deflate undone), its values left raw; ValueError if it was cut
    short."""
    dataset = read_dataset(
        BytesIO(inflated), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    )
    _check_truncation(dataset, len(inflated))
    return dataset


def _check_truncation(dataset: Dataset, size: int) -> None:
    """Raise ValueError if the last element's value or header was cut short.

    pydicom reads a short value or a partial trailing header without complaint; a sender that
    dropped bytes must not get a success status. Elements are read in stream order, so a
    stream cut short ends inside the last element read: only that one needs checking.
    """
    if not len(dataset):
        return
    tag = list(dataset.keys())[-1]
    element = dataset.get_item(tag)
    if not isinstance(element, RawDataElement) or element.length == UNDEFINED_LENGTH:
        return
    if element.value is not None and len(element.value) != element.length:
        raise ValueError(
            f"element {tag} is truncated ({len(element.value)} of {element.length} bytes)"
        )
    end = element.value_tell + element.length
    if end < size:
        raise ValueError(f"{size - end} bytes after the last element")


def _raw_text(ds: Dataset, tag: int) -> str | None:
    """A UI or IS value as text, straight from its raw bytes (both are ASCII in every
    character set, so pydicom's conversion and validation can be skipped)."""
    element = ds.get_item(tag)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        return _ascii(value)
    return None if value is None else str(value).strip("\0 ")


def _number(ds: Dataset, tag: int) -> str | None:
    """A binary value, converted by pydicom in the dataset's byte order."""
    try:
        value = ds[tag].value if tag in ds else None
    except Exception:  # pydicom raises many types on malformed values
        return None
    return str(value) if isinstance(value, int) else None


def _unsigned_short(value: bytes) -> str | None:
    return str(int.from_bytes(value, "little")) if len(value) == 2 else None


def _ascii(value: bytes) -> str:
    return value.decode("ascii", "replace").strip("\0 ")


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip() or None


def _as_float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _as_int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
