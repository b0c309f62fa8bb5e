"""A pipeline's measurements and findings as a TID 1500 Measurement Report (Comprehensive 3D SR)."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from node.work.guard import GuardScore
from node.work.results.identity import MANUFACTURER, ResultIdentity
from node.work.results.outline import Outline, detection_box, representative_outline, source_of
from node.work.siblings import Reconstruction
from pipelines import codes
from pipelines.result import Detection, Finding, Note, PipelineResult, Region
from pipelines.volume import Volume

SR_SERIES_NUMBER = 9002

Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
Evaluation = hd.sr.CodeContentItem | hd.sr.TextContentItem
"""An item of the Qualitative Evaluations container: a coded evaluation, or a note."""


def build_report(
    result: PipelineResult,
    volume: Volume,
    sources: list[Dataset],
    segmentation: hd.seg.Segmentation | None,
    identity: ResultIdentity,
    guard: GuardScore | None = None,
    siblings: Sequence[Reconstruction] = (),
) -> hd.sr.Comprehensive3DSR:
    """`guard`: the series' input-guard score, reported as a quality evaluation; `siblings`:
    the other reconstructions of the acquisition, listed as evidence and named in a note."""
    device = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER.as_dicom()),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.uid("device"),
            name=identity.station,
            manufacturer_name=MANUFACTURER,
            model_name=f"{identity.pipeline} {identity.version}",
        ),
    )
    cited: set[str] = set()
    groups: list[Group] = [
        _region_group(region, result, volume, segmentation, identity, cited)
        for region in result.regions
    ]
    groups += [
        _detection_group(number, detection, result, volume, segmentation, identity, cited)
        for number, detection in enumerate(result.detections, start=1)
    ]
    evaluations: list[Evaluation] = [_finding(finding) for finding in result.findings]
    evaluations += [_note(note) for note in result.notes]
    if siblings:
        evaluations.append(_siblings_note(siblings))
    if guard is not None:
        evaluations.append(_guard_evaluation(guard))
    report = measurement_report(
        hd.sr.ObservationContext(observer_device_context=device),
        groups,
        evaluations,
        [source for source in sources if source.SOPInstanceUID in cited],
        _tracking_only(identity),
    )
    evidence = [*sources, *_sibling_references(siblings)]
    if segmentation is not None:
        evidence.append(_reference(segmentation))
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


def measurement_report(
    context: hd.sr.ObservationContext,
    groups: list[Group],
    evaluations: list[Evaluation],
    library: list[Dataset],
    placeholder: Group,
) -> hd.sr.MeasurementReport:
    """TID 1500 by highdicom's MeasurementReport, plus the two things highdicom (0.28) cannot
    express and TID 1500 allows: no Imaging Measurements container at all (a classifier's
    report has no group), and a Qualitative Evaluations container (whole-scan findings and
    the input guard's evaluation). `library`: the images the report's coordinates point at
    (TID 1600; every source image is in the evidence all the same: one library entry per
    slice cost a 150-slice report 2 s to build).

    Without groups, highdicom builds the report around `placeholder` and its container is left
    out; the root's content is then rebuilt as a highdicom ContentSequence, which validates
    each item. `tests/node/work/results/test_sr.py` pins highdicom's behaviour: when it accepts no
    groups or takes evaluations, this helper goes.
    """
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.CT_CHEST.as_dicom(),
        imaging_measurements=groups or [placeholder],
        referenced_images=library,
    )
    if groups and not evaluations:
        return report
    root = report[0]
    measurements = codes.IMAGING_MEASUREMENTS.as_dicom()
    items = [item for item in root.ContentSequence if groups or item.name != measurements]
    if evaluations:
        items.append(_qualitative_evaluations(evaluations))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return report


def _tracking(identity: ResultIdentity, name: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=identity.uid(f"tracking-{name}"), identifier=name)


def _algorithm(identity: ResultIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=identity.pipeline, version=identity.version)


def _region_group(
    region: Region,
    result: PipelineResult,
    volume: Volume,
    segmentation: hd.seg.Segmentation | None,
    identity: ResultIdentity,
    cited: set[str],
) -> Group:
    """A region's measurements (TID 1501). The first is INFERRED FROM the region's outline on
    its largest slice, which viewers draw, and from its SEG segment's frames.

    Not a TID 1411 volumetric group: those cannot carry a SCOORD, and OHIF 3.13 fails to open
    an SR with any group that has none."""
    mask = result.region_mask(region)
    outline = representative_outline(mask) if mask is not None else None
    first = hd.sr.Measurement(
        name=region.measurements[0].concept.as_dicom(),
        value=region.measurements[0].value,
        unit=region.measurements[0].unit.as_dicom(),
        referenced_coordinates=_coordinates(outline, volume, cited),
        referenced_images=_segment_frames(region, result, segmentation),
    )
    rest = [
        hd.sr.Measurement(name=m.concept.as_dicom(), value=m.value, unit=m.unit.as_dicom())
        for m in region.measurements[1:]
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(identity, region.name),
        finding_type=region.finding_site.as_dicom(),
        algorithm_id=_algorithm(identity),
        finding_sites=[hd.sr.FindingSite(anatomic_location=region.finding_site.as_dicom())],
        measurements=[first, *rest],
    )


def _segment_frames(
    region: Region, result: PipelineResult, segmentation: hd.seg.Segmentation | None
) -> list[hd.sr.SourceImageForMeasurement] | None:
    """The SEG frames of the segments a region is measured on."""
    if segmentation is None:
        return None
    labels = (region.segment,) if region.segment else region.spans
    wanted = {result.segment_number(label) for label in labels}
    return _frames_of(segmentation, wanted)


def _frames_of(
    segmentation: hd.seg.Segmentation | None, wanted: set[int]
) -> list[hd.sr.SourceImageForMeasurement] | None:
    """A reference to the SEG frames of the segments numbered `wanted`."""
    if segmentation is None:
        return None
    frames = [
        index
        for index, item in enumerate(segmentation.PerFrameFunctionalGroupsSequence, start=1)
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber in wanted
    ]
    if not frames:
        return None
    return [
        hd.sr.SourceImageForMeasurement(
            segmentation.SOPClassUID, segmentation.SOPInstanceUID, frames
        )
    ]


def _coordinates(
    outline: Outline | None, volume: Volume, cited: set[str]
) -> list[hd.sr.CoordinatesForMeasurement] | None:
    """The outline as a SCOORD on its source image (added to `cited`)."""
    if outline is None:
        return None
    sop_class, sop_instance, frame = source_of(volume, outline.slice_index)
    cited.add(sop_instance)
    image = hd.sr.SourceImageForRegion(sop_class, sop_instance, [frame] if frame else None)
    return [
        hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline.points,
            source_image=image,
        )
    ]


def _tracking_only(identity: ResultIdentity) -> Group:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(identity, "none")
    )


def _qualitative_evaluations(evaluations: list[Evaluation]) -> hd.sr.ContainerContentItem:
    """Whole-scan evaluations in TID 1500's Qualitative Evaluations container.

    Not measurement groups: a finding of the whole scan has no place on an image, and OHIF
    (3.13) fails to open a report with a group that has no spatial coordinates."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS.as_dicom(),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(evaluations)
    return container


def _note(note: Note) -> hd.sr.TextContentItem:
    """A note on how the result was made, as TID 1500 allows text in the container."""
    return hd.sr.TextContentItem(
        name=note.concept.as_dicom(),
        value=note.text,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _siblings_note(siblings: Sequence[Reconstruction]) -> hd.sr.TextContentItem:
    """Which reconstructions of the acquisition this result was not made from."""
    named = "; ".join(sibling.described() for sibling in siblings)
    text = (
        "Measured on this series only. Other reconstructions of the same acquisition, listed "
        f"as evidence, not measured here: {named}."
    )
    return _note(Note(codes.COMMENT, text))


def _sibling_references(siblings: Sequence[Reconstruction]) -> list[Dataset]:
    return [
        _identified(sibling.study_instance_uid, sibling.series_instance_uid, *instance)
        for sibling in siblings
        for instance in sibling.instances
    ]


def _finding(finding: Finding) -> hd.sr.CodeContentItem:
    """A finding present or absent at its threshold, with its probability as a property."""
    return _evaluation(
        finding.concept,
        codes.PRESENT if finding.present else codes.ABSENT,
        [(codes.PROBABILITY, round(finding.probability, 4))],
    )


def _guard_evaluation(guard: GuardScore) -> hd.sr.CodeContentItem:
    """Whether the series is like the site's reference (at or below the threshold), with the
    distance and the threshold as properties: a reader sees when a model ran on a series
    unlike those it was validated on."""
    return _evaluation(
        codes.INPUT_GUARD,
        codes.ABSENT if guard.unlike else codes.PRESENT,
        [(codes.GUARD_DISTANCE, guard.distance), (codes.GUARD_THRESHOLD, guard.threshold)],
    )


def _evaluation(
    concept: codes.Code, value: codes.Code, properties: list[tuple[codes.Code, float]]
) -> hd.sr.CodeContentItem:
    item = hd.sr.CodeContentItem(
        name=concept.as_dicom(),
        value=value.as_dicom(),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.NumContentItem(
                name=name.as_dicom(),
                value=number,
                unit=codes.NO_UNITS.as_dicom(),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            )
            for name, number in properties
        ]
    )
    return item


def _reference(dataset: Dataset) -> Dataset:
    """Just the identifying attributes of an evidence object (not its pixel data)."""
    return _identified(
        dataset.StudyInstanceUID,
        dataset.SeriesInstanceUID,
        dataset.SOPClassUID,
        dataset.SOPInstanceUID,
    )


def _identified(study: str, series: str, sop_class: str, sop_instance: str) -> Dataset:
    """An evidence object as the SR lists it: its four UIDs."""
    reference = Dataset()
    reference.StudyInstanceUID = study
    reference.SeriesInstanceUID = series
    reference.SOPClassUID = sop_class
    reference.SOPInstanceUID = sop_instance
    return reference


def _detection_group(
    number: int,
    detection: Detection,
    result: PipelineResult,
    volume: Volume,
    segmentation: hd.seg.Segmentation | None,
    identity: ResultIdentity,
    cited: set[str],
) -> Group:
    """A detected object as a planar ROI (TID 1410): its box, as a closed POLYLINE on the
    source slice through the box centre, with its score, in-plane long axis, side and its
    further measurements (the first of those INFERRED FROM its SEG segment's frames)."""
    box = detection_box(detection, volume)
    sop_class, sop_instance, frame = source_of(volume, box.slice_index)
    cited.add(sop_instance)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box.points,
        source_image=hd.sr.SourceImageForRegion(
            sop_class, sop_instance, [frame] if frame else None
        ),
    )
    frames = (
        _frames_of(segmentation, {result.segment_number(detection.segment)})
        if detection.segment
        else None
    )
    extra = [
        hd.sr.Measurement(
            name=m.concept.as_dicom(),
            value=m.value,
            unit=m.unit.as_dicom(),
            referenced_images=frames if index == 0 else None,
        )
        for index, m in enumerate(detection.measurements)
    ]
    site = detection.finding_site
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(identity, f"{detection.label.meaning} {number}"),
        referenced_region=region,
        finding_type=detection.label.as_dicom(),
        algorithm_id=_algorithm(identity),
        finding_sites=[hd.sr.FindingSite(anatomic_location=site.as_dicom())] if site else None,
        measurements=[
            hd.sr.Measurement(
                name=codes.LONG_AXIS.as_dicom(),
                value=round(box.long_axis_mm, 1),
                unit=codes.MILLIMETER.as_dicom(),
            ),
            hd.sr.Measurement(
                name=codes.PROBABILITY.as_dicom(),
                value=round(detection.score, 4),
                unit=codes.NO_UNITS.as_dicom(),
            ),
            *extra,
        ],
    )
