"""A pipeline's measurements and findings as a TID 1500 Measurement Report (Comprehensive 3D SR)."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as DicomCode

from node.results.identity import MANUFACTURER, ResultIdentity
from node.results.seg import dicom_code, segment_numbers
from pipelines.result import Finding, PipelineResult, Region

SR_SERIES_NUMBER = 9002
CT_CHEST = DicomCode("24627-2", "LN", "CT Chest")
PROBABILITY = DicomCode("122157", "DCM", "Probability")
NO_UNITS = DicomCode("1", "UCUM", "no units")

Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def build_report(
    result: PipelineResult,
    sources: list[Dataset],
    segmentation: hd.seg.Segmentation | None,
    identity: ResultIdentity,
) -> hd.sr.Comprehensive3DSR:
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.uid("device"),
            name=identity.station,
            manufacturer_name=MANUFACTURER,
            model_name=f"{identity.pipeline} {identity.version}",
        ),
    )
    groups: list[Group] = [
        _region_group(region, result, segmentation, sources, identity) for region in result.regions
    ]
    groups += [_finding_group(finding, identity) for finding in result.findings]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=CT_CHEST,
        imaging_measurements=groups,
        referenced_images=sources,
    )
    evidence = [*sources, _reference(segmentation)] if segmentation is not None else sources
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=identity.uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=identity.uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=identity.series_description,
        contributing_equipment=[identity.contributing_equipment()],
    )


def _tracking(identity: ResultIdentity, name: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=identity.uid(f"tracking-{name}"), identifier=name)


def _algorithm(identity: ResultIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=identity.pipeline, version=identity.version)


def _region_group(
    region: Region,
    result: PipelineResult,
    segmentation: hd.seg.Segmentation | None,
    sources: list[Dataset],
    identity: ResultIdentity,
) -> Group:
    measurements = [
        hd.sr.Measurement(
            name=dicom_code(m.concept),
            value=m.value,
            unit=dicom_code(m.unit),
            algorithm_id=_algorithm(identity),
        )
        for m in region.measurements
    ]
    sites = [hd.sr.FindingSite(anatomic_location=dicom_code(region.finding_site))]
    tracking = _tracking(identity, region.name)
    if region.segment is not None and segmentation is not None:
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=segment_numbers(result)[region.segment],
            source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=segment,
            finding_type=dicom_code(region.finding_site),
            algorithm_id=_algorithm(identity),
            finding_sites=sites,
            measurements=measurements,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=dicom_code(region.finding_site),
        algorithm_id=_algorithm(identity),
        finding_sites=sites,
        measurements=measurements,
    )


def _finding_group(finding: Finding, identity: ResultIdentity) -> Group:
    """A classifier's finding: present/absent at its threshold, with the probability."""
    concept = dicom_code(finding.concept)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(identity, finding.concept.meaning),
        finding_type=concept,
        algorithm_id=_algorithm(identity),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=concept,
                value=codes.SCT.Present if finding.present else codes.SCT.Absent,
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY,
                value=round(finding.probability, 4),
                unit=NO_UNITS,
                algorithm_id=_algorithm(identity),
            )
        ],
    )


def _reference(dataset: Dataset) -> Dataset:
    """Just the identifying attributes of an evidence object (not its pixel data)."""
    reference = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(reference, keyword, getattr(dataset, keyword))
    return reference
