"""Reconstruction kernels classed by their manufacturers' naming: the real data's kernels,
each vendor's soft and sharp families, and what is not recognised."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from pipelines.kernel import KernelClass, classify, reconstruction

SOFT, SHARP, UNKNOWN = KernelClass.SOFT, KernelClass.SHARP, KernelClass.UNKNOWN


@pytest.mark.parametrize(
    ("kernel", "manufacturer", "kind"),
    [
        ("D40s", "SIEMENS", SOFT),  # COVID-CT-MD
        ("B", "Philips", SOFT),  # Lung-PET-CT-Dx A0001, body kernel
        ("L", "Philips", SHARP),  # ... and its lung kernel
        ("B31f", "SIEMENS", SOFT),
        ("B70f", "SIEMENS", SHARP),
        ("Br40", "Siemens Healthineers", SOFT),
        ("Bl64", "Siemens Healthineers", SHARP),
        ("B46f", "SIEMENS", UNKNOWN),  # between the families
        ("STANDARD", "GE MEDICAL SYSTEMS", SOFT),
        ("LUNG", "GE MEDICAL SYSTEMS", SHARP),
        ("BONEPLUS", "GE MEDICAL SYSTEMS", SHARP),
        ("FC03", "TOSHIBA", SOFT),
        ("FC52", "CANON MEDICAL SYSTEMS", SHARP),
        ("YA", "Philips", SOFT),
        ("YC", "Philips", SHARP),
        ("SOFT TISSUE", "", SOFT),
        ("HIGH RES LUNG", "", SHARP),
        ("X9", "ACME", UNKNOWN),
        ("", "SIEMENS", UNKNOWN),
    ],
)
def test_kernels_are_classed_by_their_vendors_naming(
    kernel: str, manufacturer: str, kind: KernelClass
) -> None:
    assert classify(kernel, manufacturer) == kind


def test_a_multi_valued_kernel_is_read_by_its_first_value() -> None:
    header = Dataset()
    header.Manufacturer = "Siemens Healthineers"
    header.ConvolutionKernel = ["Br64", "3"]
    found = reconstruction(header)
    assert (found.kernel, found.kind) == ("Br64", SHARP)
    assert found.described == "Br64 (Siemens Healthineers)"
    assert reconstruction(None).kind == UNKNOWN
