"""DICOM SEG (BINARY) of a label map, referencing the series it was computed from (highdicom).

Frames are laid on the source slices: a label map on the loaded (possibly corrected) grid is first
read at every source pixel centre (:func:`pipelines.io.writers.labels_on_source_slices`), then each
frame is given its source slice's position explicitly, so highdicom need not match frames to source
images by list order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipelines.io.errors import InputDataError
from pipelines.io.metadata import dicom_references
from pipelines.io.writers import atomic_path, labels_on_source_slices
from pipelines.runtime.iod_memo import memoise_iod_lookups
from pipelines.segment_codes import SegmentCode, segments_from_metadata

__all__ = ["SegmentCode", "segments_from_metadata", "write_dicom_seg"]

logger = logging.getLogger(__name__)

# Type 2 patient and study attributes the SEG copies from its source; anonymised studies often lack
# them, and highdicom then fails, so missing ones are set empty on the in-memory copies.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


_LONG_STRING = 64  # characters of a DICOM LO value (AlgorithmName, ManufacturerModelName)


def write_dicom_seg(
    labels,
    meta: Mapping,
    segments: Sequence[SegmentCode],
    path: str | os.PathLike,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 900,
    manufacturer: str = "unet-pipelines",
    software_version: str | None = None,
    omit_empty_frames: bool = False,
) -> Path:
    """Write ``labels`` as a BINARY DICOM SEG referencing the source series described by ``meta``.

    Args:
        labels: label map ``(1, X, Y, Z)`` or ``(X, Y, Z)`` on the grid of ``meta["affine"]`` (a
            MetaTensor from ``load_volume``, or a prediction resampled back to its grid).
        meta: the loaded volume's metadata (``load_volume(...).meta``) of a DICOM source.
        segments: which label values to encode, with names and codes; other values are ignored.
        path: output file, written atomically.
        algorithm_name, algorithm_version: the algorithm identification (e.g. bundle name and version);
            a name longer than DICOM's 64 characters is cut there.
        omit_empty_frames: leave out frames where a segment is absent (smaller, faster to write;
            viewers place frames by their positions). By default every source slice has a frame
            per segment.

    Returns:
        ``path``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipelines import __version__

    memoise_iod_lookups()  # highdicom scans its tables for every source image otherwise
    algorithm_name = algorithm_name[:_LONG_STRING]  # a bundle's name is free text; DICOM keeps 64 characters
    references = dicom_references(meta)
    if not references:
        raise InputDataError(f"{meta.get('filename_or_obj', '?')}: DICOM SEG needs a DICOM source, got {meta.get('source_format')}")
    geometry = references["source_geometry"]
    affine = np.asarray(meta.get("affine") if "affine" in meta else meta["original_affine"], dtype=float)
    frames = labels_on_source_slices(np.asarray(labels), affine, geometry)

    label_map = np.zeros(frames.shape, dtype=np.uint8)
    for number, segment in enumerate(segments, start=1):
        label_map[frames == segment.label] = number
    sources = _source_images(references)
    plane_positions = [
        hd.PlanePositionSequence(coordinate_system=hd.CoordinateSystemNames.PATIENT, image_position=position)
        for position in geometry["positions"]
    ]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.name,
            segmented_property_category=hd.sr.CodedConcept(*segment.category),
            segmented_property_type=hd.sr.CodedConcept(*segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=segment.name,
        )
        for number, segment in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=software_version or __version__,
        device_serial_number="0",
        plane_positions=plane_positions,
        omit_empty_frames=omit_empty_frames and bool(label_map.any()),  # a SEG needs at least one frame
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


def _source_images(references: Mapping) -> list:
    """The source datasets (headers only), one per instance, in slice order."""
    import pydicom

    files = references.get("source_files")
    if not files:
        raise InputDataError("DICOM references carry no source files; load the series with load_volume")
    seen, datasets = set(), []
    for file in files:
        if file in seen:
            continue  # a multi-frame source appears once per frame
        seen.add(file)
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    return datasets
