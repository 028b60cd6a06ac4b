"""DICOM RT Structure Set of a label map, for treatment planning systems (pydicom, scikit-image).

One ROI per label (the bundle's name, colour and SNOMED CT code), drawn as closed planar contours on
every source slice in patient coordinates: the label map is read at every source pixel centre (as
for the DICOM SEG, :func:`pipelines.io.writers.labels_on_source_slices`), and each slice's mask is
traced by marching squares at half height (:func:`skimage.measure.find_contours`), so a contour
runs between the pixels in and out of the label and every island and every hole gets its own
contour (planning systems fill nested contours even-odd: a hole stays a hole). Collinear points
are dropped. The structure set references the source series, each contour its slice, and the
series' frame of reference.

Every decimal string (``ContourData``) is written with at most 16 characters, as DICOM's DS
requires: planning systems refuse files that overflow it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from pipelines.io.dicom_seg import source_frames
from pipelines.io.writers import atomic_path
from pipelines.segment_codes import SegmentCode

__all__ = ["RT_STRUCTURE_SET_STORAGE", "contours_of_mask", "write_rtstruct"]

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # the SOP class PS3.3 C.8.8.5 names for RTReferencedStudySequence
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_DEFAULT_COLOURS = ((255, 0, 0), (0, 200, 0), (255, 215, 0), (0, 120, 255), (255, 0, 255), (0, 220, 220))
_LONG_STRING = 64


def contours_of_mask(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(N, 2)`` (row, column; pixel units) around a 2D mask's islands and holes,
    between the pixel centres in and out, collinear points dropped, the closing point not repeated."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(np.asarray(mask, bool), 1).astype(np.uint8)  # every contour closes inside the frame
    contours = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance=1e-3) - 1.0  # collinear points out; unpadded pixels
        if np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) >= 3:
            contours.append(contour)
    return contours


def _ds(values: np.ndarray) -> list[str]:
    """Decimal strings of at most 16 characters (DS), to 0.1 micrometre."""
    text = [f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) >= 5e-5 else "0" for v in np.asarray(values, float).ravel()]
    long = [t for t in text if len(t) > 16]
    if long:
        raise ValueError(f"patient coordinates too large for DICOM's 16-character decimal strings: {long[:3]}")
    return text


def write_rtstruct(
    labels,
    meta,
    segments: Sequence[SegmentCode],
    path: str | os.PathLike,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 902,
    manufacturer: str = "unet-pipelines",
    uids: tuple[str, str] | None = None,
) -> Path:
    """Write ``labels`` as an RTSTRUCT referencing the source series described by ``meta``.

    Args:
        labels: label map ``(1, X, Y, Z)`` or ``(X, Y, Z)`` on the grid of ``meta["affine"]``.
        meta: the loaded volume's metadata (``load_volume(...).meta``) of a DICOM source.
        segments: the ROIs: label value, name, codes (its type becomes the ROI's identification code)
            and colour (without one, a colour of a fixed palette).
        path: output file, written atomically.
        algorithm_name, algorithm_version: written as each ROI's generation description.
        uids: the structure set's series and SOP instance UIDs; None: new ones.

    Returns:
        ``path``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pipelines import __version__

    references, frames = source_frames(labels, meta, "an RTSTRUCT")
    geometry = references["source_geometry"]
    row_dir = np.asarray(geometry["row_direction"], float)
    col_dir = np.asarray(geometry["column_direction"], float)
    spacing_y, spacing_x = (float(v) for v in geometry["pixel_spacing"])
    positions = np.asarray(geometry["positions"], float).reshape(-1, 3)
    instances = list(references["sop_instance_uids"])
    frame_numbers = references.get("frame_numbers") or [None] * len(instances)
    first = pydicom.dcmread(references["source_files"][0], stop_before_pixels=True)
    classes = {}  # SOP class per instance (one series, possibly several files)
    for file in dict.fromkeys(references["source_files"]):
        header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        classes[str(header.SOPInstanceUID)] = str(header.SOPClassUID)
    frame_uid = str(first.FrameOfReferenceUID)

    def image_reference(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = classes.get(instances[k], str(first.SOPClassUID))
        item.ReferencedSOPInstanceUID = instances[k]
        if frame_numbers[k] is not None:
            item.ReferencedFrameNumber = int(frame_numbers[k])
        return item

    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids[1] if uids else generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids[0] if uids else generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{algorithm_name} structures"[:_LONG_STRING]
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = algorithm_name[:_LONG_STRING]
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "AUTO"
    ds.StructureSetName = algorithm_name[:_LONG_STRING]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime

    series = Dataset()
    series.SeriesInstanceUID = str(first.SeriesInstanceUID)
    series.ContourImageSequence = [image_reference(k) for k in range(len(instances))]
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_COMPONENT
    study.ReferencedSOPInstanceUID = str(first.StudyInstanceUID)
    study.RTReferencedSeriesSequence = [series]
    frame_of_reference = Dataset()
    frame_of_reference.FrameOfReferenceUID = frame_uid
    frame_of_reference.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame_of_reference]

    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, segment in enumerate(segments, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = segment.name[:_LONG_STRING]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:_LONG_STRING]
        ds.StructureSetROISequence.append(roi)

        contour_item = Dataset()
        colour = segment.color or _DEFAULT_COLOURS[(number - 1) % len(_DEFAULT_COLOURS)]
        contour_item.ROIDisplayColor = [int(c) for c in colour]
        contour_item.ReferencedROINumber = number
        contours = []
        for k in range(frames.shape[0]):
            mask = frames[k] == segment.label
            if not mask.any():
                continue
            for contour in contours_of_mask(mask):
                # pixel (row i, column j) lies at position + j * spacing_x * row direction + i * spacing_y * column direction
                points = positions[k] + contour[:, 1:2] * spacing_x * row_dir + contour[:, 0:1] * spacing_y * col_dir
                item = Dataset()
                item.ContourImageSequence = [image_reference(k)]
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourNumber = len(contours) + 1
                item.ContourData = _ds(points)
                contours.append(item)
        if contours:
            contour_item.ContourSequence = contours
        ds.ROIContourSequence.append(contour_item)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = ""  # an interpretation (GTV, organ) is the planner's to give
        observation.ROIInterpreter = ""
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = segment.type
        observation.RTROIIdentificationCodeSequence = [code]
        ds.RTROIObservationsSequence.append(observation)

    path = Path(path)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
