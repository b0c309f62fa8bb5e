"""Every coded concept the node reports, in one place: what the pipelines find and measure,
and what the SR, SEG and key images are built with (SNOMED CT, DICOM, LOINC, UMLS, UCUM).

A private scheme (`99AINODE`) is used only where no standard code exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # settings name codes; only the SR and SEG builders need pydicom's
    from pydicom.sr.coding import Code as DicomCode


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str

    def as_json(self) -> dict[str, str]:
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}

    def as_dicom(self) -> DicomCode:
        """As pydicom and highdicom take a coded concept."""
        from pydicom.sr.coding import Code as DicomCode

        return DicomCode(self.value, self.scheme, self.meaning)


def sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


PRIVATE_SCHEME = "99AINODE"
PRIVATE_SCHEME_NAME = "ainode private codes"
"""Declared in every object that uses it (Coding Scheme Identification Sequence) and in the
conformance statement."""


def private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# Segment categories (CID 7150)
ANATOMICAL_STRUCTURE = sct("91723000", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED_STRUCTURE = sct("49755003", "Morphologically Altered Structure")
TISSUE = sct("85756007", "Tissue")

# Anatomy (CID 7166 / 4)
LUNG = sct("39607008", "Lung")
LEFT_LUNG = sct("44029006", "Left lung")
RIGHT_LUNG = sct("3341006", "Right lung")
CHEST = sct("51185008", "Chest")
TRACHEA_AND_BRONCHUS = sct("110726009", "Trachea and bronchus")

# Morphology
PULMONARY_EMPHYSEMA = sct("87433001", "Pulmonary emphysema")
ABNORMAL_OPACITY = dcm("112033", "Abnormal opacity")

# Measurements (CID 6141 and friends)
VOLUME = sct("118565006", "Volume")
MEAN_ATTENUATION = dcm("112181", "Mean Attenuation Coefficient")
PERC15 = private("PERC15", "15th percentile of lung attenuation")
LAA950 = private("LAA950", "Lung volume below -950 HU")
HIGH_ATTENUATION = private("HAA", "Lung volume from -700 to -100 HU, vessels excluded")

# Units (UCUM)
NO_UNITS = Code("1", "UCUM", "no units")
MILLILITER = Code("mL", "UCUM", "milliliter")
HOUNSFIELD_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT = Code("%", "UCUM", "Percent")
MILLIMETER = Code("mm", "UCUM", "millimeter")
SQUARE_CENTIMETER = Code("cm2", "UCUM", "square centimeter")

# Short labels for images with burnt-in text (key images)
SHORT_NAMES = {
    VOLUME: "vol",
    MEAN_ATTENUATION: "MLD",
    PERC15: "Perc15",
    LAA950: "LAA-950",
    HIGH_ATTENUATION: "HAA",
}

# Whole-scan findings: CT-RATE's 18 labels (thoracic-findings)
MEDICAL_MATERIAL = private("MEDMAT", "Medical material")
ARTERIAL_WALL_CALCIFICATION = sct("237897009", "Vascular calcification")  # CID 3491
CARDIOMEGALY = sct("287272002", "Cardiomegaly")
PERICARDIAL_EFFUSION = sct("373945007", "Pericardial effusion")
CORONARY_CALCIFICATION = private("CORCALC", "Coronary artery wall calcification")
HIATAL_HERNIA = sct("84089009", "Hiatal hernia")
LYMPHADENOPATHY = sct("30746006", "Lymphadenopathy")
ATELECTASIS = sct("46621007", "Atelectasis")
NODULE = sct("27925004", "Nodule")
FIBROSIS = sct("112674009", "Fibrosis")
PLEURAL_EFFUSION = sct("60046008", "Pleural effusion")
MOSAIC_PATTERN = dcm("112130", "Mosaic pattern")
PERIBRONCHIAL_THICKENING = private("PERIBRON", "Peribronchial thickening")
CONSOLIDATION = sct("95436008", "Lung consolidation")
BRONCHIECTASIS = sct("12295008", "Bronchiectasis")
SEPTAL_THICKENING = dcm("112114", "Septal line(s)")  # CID 6102: thickened interlobular septa

# Triage (covid-triage, the COVID-CT-MD classes)
COVID_19 = sct("840539006", "COVID-19")  # the full meaning exceeds LO (64)
COMMUNITY_ACQUIRED_PNEUMONIA = sct("385093006", "Community acquired pneumonia")
NORMAL = sct("17621005", "Normal")
CUBIC_MILLIMETER = Code("mm3", "UCUM", "cubic millimeter")

# Scan geometry (echo)
SLICES = private("SLICES", "Number of slices")
SLICE_SPACING = dcm("112226", "Spacing between slices")
EXTENT = private("EXTENT", "Scan length along the slice normal")

# Detections (TID 1410 rows)
LONG_AXIS = sct("103339001", "Long Axis")
PROBABILITY = dcm("122157", "Probability")

# Series input guard (node.work.guard): a quality evaluation of the input, no standard code
INPUT_GUARD = private("INPUTGUARD", "Series like the site's reference series")
GUARD_DISTANCE = private("GUARDDIST", "Distance to the site's reference series")
GUARD_THRESHOLD = private("GUARDLIMIT", "Guard distance threshold")

# Report structure (TID 1500, its observer and equipment; a note in words is a Comment)
CT_CHEST = Code("24627-2", "LN", "CT Chest")
IMAGING_MEASUREMENTS = dcm("126010", "Imaging Measurements")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PRESENT = sct("52101004", "Present")
ABSENT = sct("272519000", "Absent")
DEVICE_OBSERVER = dcm("121007", "Device")
ARTIFICIAL_INTELLIGENCE = dcm("123110", "Artificial Intelligence")
PROCESSING_EQUIPMENT = dcm("109102", "Processing Equipment")
COMMENT = dcm("121106", "Comment")
