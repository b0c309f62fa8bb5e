"""Which reconstruction a CT series is: soft/standard or sharp, from its ConvolutionKernel and
manufacturer. Sharp kernels add noise that pushes lung voxels below -950 HU and past the
high-attenuation bounds, so lung densitometry (LAA-950, Perc15, HAA) is only comparable on a
soft or standard kernel (QIBA's lung density profile; COPDGene: Siemens B31f/B35f, GE
STANDARD, Philips B, Canon/Toshiba FC01-FC18). Volumes and masks do not depend on it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pydicom import Dataset

SHARP_WORDS = re.compile(r"LUNG|BONE|SHARP|EDGE|DETAIL|HIGH|ULTRA")
SOFT_WORDS = re.compile(r"STANDARD|STD|SOFT|SMOOTH|BODY|ABD|MEDIAST")
SIEMENS = re.compile(r"^[A-Z]{1,2}(\d{2})[A-Z]?\b")
"""B31f, Br40, I40f, D40s, Q30f: the number is the sharpness (up to 40s-45 soft/standard)."""
CANON = re.compile(r"^FC(\d{2})")
PHILIPS_SOFT = frozenset({"A", "B", "YA", "YB"})
PHILIPS_SHARP = frozenset({"C", "D", "E", "L", "YC", "YD", "YE", "YF"})


class KernelClass(enum.StrEnum):
    SOFT = "soft"
    """Soft or standard: densitometry is measured."""
    SHARP = "sharp"
    """Sharp (lung, bone, high resolution): densitometry is not measured."""
    UNKNOWN = "unknown"
    """Not recognised (or absent): measured, and the report says it assumed a soft kernel."""


@dataclass(frozen=True)
class Reconstruction:
    """A series' reconstruction kernel as its header names it, and its class."""

    kernel: str
    manufacturer: str
    kind: KernelClass

    @property
    def described(self) -> str:
        name = self.kernel or "not named"
        return f"{name} ({self.manufacturer})" if self.manufacturer else name


def reconstruction(header: Dataset | None) -> Reconstruction:
    """The reconstruction of a series from one of its headers."""
    kernel = _text(header.get("ConvolutionKernel") if header is not None else None)
    manufacturer = _text(header.get("Manufacturer") if header is not None else None)
    return Reconstruction(kernel, manufacturer, classify(kernel, manufacturer))


def classify(kernel: str, manufacturer: str = "") -> KernelClass:
    """The class of a kernel, by its manufacturer's naming, else by the words in it."""
    name, vendor = kernel.strip().upper(), manufacturer.strip().upper()
    if not name:
        return KernelClass.UNKNOWN
    if "PHILIPS" in vendor and name in PHILIPS_SOFT | PHILIPS_SHARP:
        return KernelClass.SOFT if name in PHILIPS_SOFT else KernelClass.SHARP
    if "SIEMENS" in vendor and (number := SIEMENS.match(name)):
        return _by_number(int(number.group(1)), soft_below=46, sharp_from=50)
    if ("TOSHIBA" in vendor or "CANON" in vendor) and (number := CANON.match(name)):
        return _by_number(int(number.group(1)), soft_below=19, sharp_from=30)
    if SHARP_WORDS.search(name):
        return KernelClass.SHARP
    if SOFT_WORDS.search(name):
        return KernelClass.SOFT
    return KernelClass.UNKNOWN


def _by_number(number: int, soft_below: int, sharp_from: int) -> KernelClass:
    if number < soft_below:
        return KernelClass.SOFT
    return KernelClass.SHARP if number >= sharp_from else KernelClass.UNKNOWN


def _text(value: object) -> str:
    """A header value as text (a multi-valued kernel, e.g. Siemens' ['Br40', '3'], by its
    first value)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    values = list(value) if hasattr(value, "__iter__") else [value]
    return str(values[0]).strip() if values else ""
