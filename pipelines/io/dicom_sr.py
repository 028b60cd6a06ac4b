"""DICOM SR measurement report (TID 1500, Comprehensive 3D SR) of a segmented case (highdicom).

A PACS shows it beside the images and a reporting system takes its numbers: a measurement group
(TID 1411) per label, per region the bundle declares (e.g. BraTS whole tumor, tumor core, enhancing
tumor) and per lesion, each with its volume in mL (a lesion also its largest diameter in mm), each
referencing its segment in the case's DICOM SEG (:func:`pipelines.io.dicom_seg.write_dicom_seg`
writes a segment per label, per region of several labels and per lesion) and the source series;
and a group (TID 1501) with the lesion count. The algorithm is identified by the bundle's name,
version and weights hash.

Each group's tracking identifier is the segment's name and its tracking UID the segment's, derived
from the input's hash (:func:`pipelines.io.dicom_seg.tracking_uid`): a rerun on the same input
gives the same UIDs, so a reporting system that follows a finding by its UID sees one finding; a
lesion matched to one of the prior study's keeps that lesion's UID, so it is one finding across studies.

With a comparison to the patient's prior study (:mod:`pipelines.batch.comparison`), each label, region
and lesion group also holds its volume change since the prior in mL and in percent, each lesion
group its status (new, or present in the prior study), and the lesion count group the interval in
days and the numbers of new and gone lesions. DICOM has no codes for these; they are coded in the
private scheme :data:`~pipelines.io.dicom_seg.PRIVATE_SCHEME` (:data:`CHANGE_CODES`), which the
report declares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from pipelines.io.dicom_seg import PRIVATE_SCHEME, identify_private_scheme, tracking_uid
from pipelines.io.writers import atomic_path

__all__ = ["CHANGE_CODES", "Bidimensional", "Change", "Comparison", "Lesion", "Measures", "Rano", "write_measurement_report"]

_LONG_STRING = 64  # characters of a DICOM LO value


@dataclass
class Lesion:
    """One lesion (number ``i``: the ``i``-th largest): its volume and largest diameter."""

    volume_ml: float
    diameter_mm: float


# private codes of the comparison with the prior study: value -> meaning
CHANGE_CODES = {
    "VOLCHG": "Volume change since prior study",
    "VOLCHGPCT": "Volume change since prior study in percent",
    "INTERVAL": "Interval since prior study",
    "NEWLES": "Number of new lesions since prior study",
    "GONELES": "Number of lesions gone since prior study",
    "LESSTATUS": "Lesion status since prior study",
    "NEW": "New since prior study",
    "PRESENT": "Present in prior study",
    "RANOROLE": "RANO lesion role",
    "TARGET": "Target lesion",
    "NONTARGET": "Non-target lesion",
    "RANOSPD": "Sum of products of perpendicular diameters (RANO)",
    "RANORESP": "Response assessment (RANO), automated and unconfirmed",
    "RANOCR": "Complete response",
    "RANOPR": "Partial response",
    "RANOSD": "Stable disease",
    "RANOPD": "Progressive disease",
}


@dataclass
class Change:
    """A volume's change since the prior study (``change_pct`` None when the prior volume was 0)."""

    change_ml: float
    change_pct: float | None = None


@dataclass
class Comparison:
    """The change since the prior study: per label value, per region name, per listed lesion
    (``(status, change)``, status ``"new"`` or ``"matched"``, in the order of ``Measures.lesions``),
    the interval in days and the numbers of new and gone lesions."""

    interval_days: int
    volumes: Mapping[int, Change] = field(default_factory=dict)
    regions: Mapping[str, Change] = field(default_factory=dict)
    lesions: Sequence[tuple[str, Change]] = ()
    new: int = 0
    gone: int = 0


@dataclass
class Bidimensional:
    """One enhancing lesion's RANO diameters (mm), where the longest runs (its two ends, RAS patient
    coordinates in mm) and whether it is a target lesion."""

    lesion: int
    longest_mm: float
    perpendicular_mm: float
    longest_ends: Sequence[Sequence[float]]
    target: bool


@dataclass
class Rano:
    """RANO's lesions, the sum of the targets' products (mm²) and, against earlier studies, the
    category (``"CR"``, ``"PR"``, ``"SD"``, ``"PD"``) or None."""

    lesions: Sequence[Bidimensional]
    sum_mm2: float
    category: str | None = None


@dataclass
class Measures:
    """What the report states, as the batch record has it: ``volumes_ml`` per label value,
    ``regions_ml`` per region name (regions of one label reference that label's segment, as
    ``region_labels`` tells), ``lesions`` (the listed ones, largest first: ``lesion 1`` upwards)
    and ``lesion_count`` (all of them)."""

    volumes_ml: Mapping[int, float]
    regions_ml: Mapping[str, float] = field(default_factory=dict)
    region_labels: Mapping[str, Sequence[int]] = field(default_factory=dict)
    lesions: Sequence[Lesion] = ()
    lesion_count: int = 0
    comparison: Comparison | None = None
    rano: Rano | None = None


def write_measurement_report(
    path: str | os.PathLike,
    seg: str | os.PathLike | Dataset,
    measures: Measures,
    algorithm_name: str,
    algorithm_version: str,
    weights_sha256: str,
    tracking_key: str,
    series_number: int = 901,
    manufacturer: str = "unet-pipelines",
    uids: tuple[str, str] | None = None,
    tracking_uids: Mapping[tuple[str, object], str] | None = None,
) -> Path:
    """Write the TID 1500 measurement report of a case whose DICOM SEG is ``seg``.

    Args:
        path: the SR file, written atomically.
        seg: the case's SEG (the dataset :func:`~pipelines.io.dicom_seg.write_dicom_seg` returned, or its
            file), written with the same ``tracking_key``: its segments are found by their tracking
            UIDs; its patient, study and source series are the report's.
        measures: the numbers.
        algorithm_name, algorithm_version, weights_sha256: what computed them.
        tracking_key: the input's hash (the SEG's ``tracking_key``).
        uids: the report's series and SOP instance UIDs; None: new ones.
        tracking_uids: the tracking UIDs the SEG's segments keep from elsewhere (the same mapping
            as :func:`~pipelines.io.dicom_seg.write_dicom_seg`'s: a lesion matched to a prior
            study's keeps its UID).

    Returns:
        ``path``.

    Raises:
        ValueError: a measured label, region or lesion has no segment in ``seg``.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from pipelines import __version__

    named = seg if not isinstance(seg, Dataset) else f"SEG {seg.SOPInstanceUID}"
    if not isinstance(seg, Dataset):
        seg = pydicom.dcmread(seg)
    by_uid = {str(s.TrackingUID): s for s in seg.SegmentSequence if "TrackingUID" in s}
    source_series = hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name[:_LONG_STRING], version=algorithm_version[:_LONG_STRING],
        parameters=[f"weights sha256 {weights_sha256}"],
    )
    milliliter = hd.sr.CodedConcept("ml", "UCUM", "milliliter")

    def private(value: str) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(value, PRIVATE_SCHEME, CHANGE_CODES[value])

    def changed(change: Change | None) -> list:
        if change is None:
            return []
        out = [hd.sr.Measurement(name=private("VOLCHG"), value=float(change.change_ml), unit=milliliter)]
        if change.change_pct is not None:
            out.append(hd.sr.Measurement(name=private("VOLCHGPCT"), value=float(change.change_pct),
                                         unit=hd.sr.CodedConcept("%", "UCUM", "percent")))
        return out

    comparison = measures.comparison

    def measured(kind: str, ident, measurements: list, region: str | None = None, evaluations: list | None = None):
        """The group measuring segment ``kind`` ``ident``; tracked as ``region`` when given (a region
        of one label: that label's segment, a finding of its own)."""
        uid = (tracking_uids or {}).get((kind, ident)) or tracking_uid(tracking_key, kind, ident)
        if uid not in by_uid:
            raise ValueError(f"{named}: no segment for {kind} {ident!r} (tracking UID {uid}); "
                             f"the SEG must be written with the same tracking key")
        segment = by_uid[uid]
        tracking = (uid, segment.SegmentLabel) if region is None else (tracking_uid(tracking_key, "region", region), region)
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(*tracking),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=int(segment.SegmentNumber), source_series=source_series),
            finding_type=_coded(segment.SegmentedPropertyTypeCodeSequence[0]),
            finding_category=_coded(segment.SegmentedPropertyCategoryCodeSequence[0]),
            algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations or None,
        )

    def volume(value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=codes.SCT.Volume, value=float(value), unit=milliliter)

    label_changes = comparison.volumes if comparison else {}
    region_changes = comparison.regions if comparison else {}
    groups = [measured("label", label, [volume(value), *changed(label_changes.get(label))])
              for label, value in sorted(measures.volumes_ml.items())]
    for name, value in measures.regions_ml.items():
        labels = list(measures.region_labels.get(name, ()))
        numbers = [volume(value), *changed(region_changes.get(name))]
        if len(labels) == 1:
            groups.append(measured("label", labels[0], numbers, region=name))
        else:
            groups.append(measured("region", name, numbers))
    for number, lesion in enumerate(measures.lesions, start=1):
        status = comparison.lesions[number - 1] if comparison and number <= len(comparison.lesions) else None
        evaluations = None if status is None else [hd.sr.QualitativeEvaluation(
            private("LESSTATUS"), private("NEW" if status[0] == "new" else "PRESENT"))]
        groups.append(measured("lesion", number, [
            volume(lesion.volume_ml),
            hd.sr.Measurement(name=codes.SCT.Diameter, value=float(lesion.diameter_mm), unit=codes.UCUM.Millimeter,
                              derivation=codes.SCT.Maximum),
            *(changed(status[1]) if status and status[0] != "new" else []),
        ], evaluations=evaluations))
    counts = [hd.sr.Measurement(name=codes.SCT.NumberOfLesions, value=float(measures.lesion_count),
                                unit=codes.UCUM.NoUnits)]
    if comparison:
        counts += [
            hd.sr.Measurement(name=private("INTERVAL"), value=float(comparison.interval_days),
                              unit=hd.sr.CodedConcept("d", "UCUM", "day")),
            hd.sr.Measurement(name=private("NEWLES"), value=float(comparison.new), unit=codes.UCUM.NoUnits),
            hd.sr.Measurement(name=private("GONELES"), value=float(comparison.gone), unit=codes.UCUM.NoUnits),
        ]
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(tracking_uid(tracking_key, "lesions", "count"), "lesions"),
        finding_type=codes.SCT.Lesion, algorithm_id=algorithm, measurements=counts,
    ))
    evidence = [seg]
    if measures.rano is not None:
        rano_groups, images = _rano_groups(measures.rano, private, algorithm, tracking_key, seg)
        groups += rano_groups
        evidence += [_evidence(seg, sop_class, sop_instance) for sop_class, sop_instance in images]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=tracking_uid(weights_sha256, "device", algorithm_version), name=algorithm_name[:_LONG_STRING],
            manufacturer_name=manufacturer, model_name=algorithm_name[:_LONG_STRING]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=uids[0] if uids else hd.UID(), series_number=series_number,
        sop_instance_uid=uids[1] if uids else hd.UID(), instance_number=1, manufacturer=manufacturer, is_complete=True,
        series_description=f"{algorithm_name} measurements"[:_LONG_STRING], software_versions=__version__,
    )
    if comparison or measures.rano is not None or any(
            len(measures.region_labels.get(name, ())) != 1 for name in measures.regions_ml):
        identify_private_scheme(sr)  # region findings and changes coded in it
    path = Path(path)
    with atomic_path(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return path


def _source_slices(seg: Dataset) -> list[tuple[np.ndarray, str, str]]:
    """The source images the SEG's frames were derived from: each one's ImagePositionPatient (LPS, mm),
    SOP class and SOP instance UIDs (every frame of a SEG on the source grid names its image)."""
    found = {}
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        try:
            source = frame.DerivationImageSequence[0].SourceImageSequence[0]
            position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        except (AttributeError, IndexError):
            continue
        found[str(source.ReferencedSOPInstanceUID)] = (position, str(source.ReferencedSOPClassUID))
    return [(position, klass, uid) for uid, (position, klass) in found.items()]


def _on_source_slice(ends_lps: np.ndarray, seg: Dataset, sources: list) -> tuple[np.ndarray, str, str] | None:
    """A diameter's two ends as (column, row) image coordinates of the source image whose plane holds
    them (within a quarter of the slice spacing: RANO measures on the grid's slices), with that image's SOP class and instance UIDs; None when no source
    image does (an input without DICOM images, or ends off the image planes)."""
    try:
        shared = seg.SharedFunctionalGroupsSequence[0]
        orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
        row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
        thickness = float(shared.PixelMeasuresSequence[0].get("SpacingBetweenSlices")
                          or shared.PixelMeasuresSequence[0].SliceThickness)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    along_row, along_column = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_column)
    middle = ends_lps.mean(axis=0)
    best = min(sources, key=lambda item: abs(float(np.dot(middle - item[0], normal))), default=None)
    if best is None or np.abs((ends_lps - best[0]) @ normal).max() > thickness / 4:
        return None
    offsets = ends_lps - best[0]
    # SCOORD: (column, row), the top left corner of the first pixel at (0, 0), its centre at (0.5, 0.5)
    image = np.stack([offsets @ along_row / column_spacing, offsets @ along_column / row_spacing], axis=1) + 0.5
    return image, best[1], best[2]


def _evidence(seg: Dataset, sop_class: str, sop_instance: str) -> Dataset:
    """A source image as the SR's evidence lists it: its study and series are the SEG's source series'."""
    image = Dataset()
    image.StudyInstanceUID = seg.StudyInstanceUID
    image.SeriesInstanceUID = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    image.SOPClassUID, image.SOPInstanceUID = sop_class, sop_instance
    return image


def _rano_groups(rano: Rano, private, algorithm, tracking_key: str, seg: Dataset) -> tuple[list, list]:
    """TID 1410 groups of RANO's lesions (the two diameters as linear measurements, the longest drawn
    as a polyline on the source image it was measured on, in that image's coordinates; in patient
    coordinates on the frame of reference where no source image holds it) and a TID 1501 group of the
    sum and the category; and the source images referenced (SOP class, SOP instance UIDs)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    millimetre = codes.UCUM.Millimeter
    long_axis = hd.sr.CodedConcept("103339001", "SCT", "Long Axis")
    short_axis = hd.sr.CodedConcept("103340004", "SCT", "Short Axis")
    sources = _source_slices(seg)
    groups, images = [], []
    for lesion in rano.lesions:
        ends = np.asarray(lesion.longest_ends, dtype=float) * np.array([-1.0, -1.0, 1.0])  # RAS to DICOM's LPS
        on_slice = _on_source_slice(ends, seg, sources)
        if on_slice is not None:
            image, sop_class, sop_instance = on_slice
            images.append((sop_class, sop_instance))
            region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=image,
                                       source_image=hd.sr.SourceImageForRegion(sop_class, sop_instance))
        else:
            region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE, graphic_data=ends,
                                         frame_of_reference_uid=seg.FrameOfReferenceUID)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(tracking_uid(tracking_key, "rano", lesion.lesion),
                                                         f"RANO lesion {lesion.lesion}"),
            referenced_region=region,
            finding_type=codes.SCT.Lesion, algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=long_axis, value=float(lesion.longest_mm), unit=millimetre),
                          hd.sr.Measurement(name=short_axis, value=float(lesion.perpendicular_mm), unit=millimetre)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                private("RANOROLE"), private("TARGET" if lesion.target else "NONTARGET"))],
        ))
    evaluations = None if rano.category is None else [
        hd.sr.QualitativeEvaluation(private("RANORESP"), private(f"RANO{rano.category}"))]
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(tracking_uid(tracking_key, "rano", "sum"), "RANO"),
        finding_type=codes.SCT.Lesion, algorithm_id=algorithm, qualitative_evaluations=evaluations,
        measurements=[hd.sr.Measurement(name=private("RANOSPD"), value=float(rano.sum_mm2),
                                        unit=hd.sr.CodedConcept("mm2", "UCUM", "square millimeter"))],
    ))
    return groups, list(dict.fromkeys(images))


def _coded(item):
    import highdicom as hd

    return hd.sr.CodedConcept(item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)
