"""Who made a result object: the node as equipment, the pipeline as algorithm, stable UIDs."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines import codes

MANUFACTURER = "ainode"
NOT_FOR_DIAGNOSIS = "Research use only, not for diagnostic use"
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def node_version() -> str:
    try:
        return version("ainode")
    except PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class ResultIdentity:
    """The pipeline run a result object comes from; every UID derives from it."""

    pipeline: str
    version: str
    source_series_uid: str
    revision: int
    station: str

    def uid(self, kind: str) -> str:
        """The same series revision, pipeline and version always give the same UIDs, so a
        re-send replaces the earlier objects in the PACS instead of adding copies."""
        entropy = [self.source_series_uid, str(self.revision), self.pipeline, self.version, kind]
        return generate_uid(entropy_srcs=entropy)

    @property
    def series_description(self) -> str:
        return f"AI: {self.pipeline} {self.version}"

    def algorithm(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.pipeline,
            version=self.version,
            family=codes.ARTIFICIAL_INTELLIGENCE.as_dicom(),
        )

    def contributing_equipment(self) -> hd.ContributingEquipment:
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.PROCESSING_EQUIPMENT.as_dicom(),
            manufacturer_model_name=self.pipeline,
            software_versions=self.version,
            station_name=self.station,
            contribution_description=f"{self.series_description}; {NOT_FOR_DIAGNOSIS}",
        )


def with_type2_attributes(source: Dataset) -> Dataset:
    """A copy of a source header with the Type 2 patient and study attributes it lacks present
    and empty, so derived objects carry them (as the standard requires) instead of omitting them."""
    copy = Dataset(source)
    copy.file_meta = source.file_meta
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in copy:
            setattr(copy, keyword, "")
    if "ReferencedStudySequence" in copy:
        # Type 3, but its items' UIDs are Type 1: a copied item without them is invalid
        items = [
            item
            for item in copy.ReferencedStudySequence
            if "ReferencedSOPClassUID" in item and "ReferencedSOPInstanceUID" in item
        ]
        if items:
            copy.ReferencedStudySequence = items
        else:
            del copy.ReferencedStudySequence
    return copy
