"""DICOM SEG (BINARY) of a label map, referencing the series it was computed from (highdicom).

Frames are laid on the source slices: a label map on the loaded (possibly corrected) grid is first
read at every source pixel centre (:func:`pipelines.io.writers.labels_on_source_slices`), then each
frame is given its source slice's position explicitly, so highdicom need not match frames to source
images by list order.

Segments: one per label the bundle codes, then one per region made of several labels (e.g. BraTS
whole tumor and tumor core: they overlap the labels' segments) and one per lesion of a lesion map
(lesion ``i`` the ``i``-th largest), so that each measurement of the case's DICOM SR
(:mod:`pipelines.io.dicom_sr`) references the segment it measures. Each segment's tracking UID is
derived from a key (the input's hash), the same on a rerun: :func:`tracking_uid`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.io.errors import InputDataError
from pipelines.io.metadata import dicom_references
from pipelines.io.writers import atomic_path, labels_on_source_slices
from pipelines.runtime.iod_memo import memoise_iod_lookups
from pipelines.segment_codes import SegmentCode, segments_from_metadata

__all__ = ["LESION", "PRIVATE_SCHEME", "RegionSegment", "SegmentCode", "segments_from_metadata", "tracking_uid", "write_dicom_seg"]

logger = logging.getLogger(__name__)

# Type 2 patient and study attributes the SEG copies from its source; anonymised studies often lack
# them, and highdicom then fails, so missing ones are set empty on the in-memory copies.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


_LONG_STRING = 64  # characters of a DICOM LO value (AlgorithmName, ManufacturerModelName)

# a lesion's segment: Morphologically Altered Structure / Lesion (SNOMED CT)
LESION = (("49755003", "SCT", "Morphologically Altered Structure"), ("52988006", "SCT", "Lesion"))
# a region's segment type where the bundle gives no code: private scheme (DICOM PS3.16 8.2)
PRIVATE_SCHEME = "99UNETP"


@dataclass(frozen=True)
class RegionSegment:
    """A region a bundle declares (name and the label values it covers) as a segment of its own."""

    name: str
    values: tuple[int, ...]

    @property
    def codes(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        meaning = f"{self.name} region (labels {', '.join(map(str, self.values))})"
        return LESION[0], (self.name[:16], PRIVATE_SCHEME, meaning[:_LONG_STRING])


def identify_private_scheme(dataset) -> None:
    """Declare :data:`PRIVATE_SCHEME` (region codes, the SR's change codes) in ``dataset``'s Coding Scheme Identification
    Sequence, as DICOM asks of a private scheme a dataset uses (PS3.3 C.12.1.1.5)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "unet-pipelines codes"
    item.CodingSchemeResponsibleOrganization = "unet-pipelines"
    dataset.CodingSchemeIdentificationSequence = [item]


def _grid_affine(meta: Mapping) -> np.ndarray:
    return np.asarray(meta.get("affine") if "affine" in meta else meta["original_affine"], dtype=float)


def source_frames(labels, meta: Mapping, what: str) -> tuple[dict, np.ndarray]:
    """The DICOM references of the source ``meta`` describes and ``labels`` (on the grid of
    ``meta["affine"]``) read on its slices (:func:`labels_on_source_slices`), for writing ``what``."""
    references = dicom_references(meta)
    if not references:
        raise InputDataError(f"{meta.get('filename_or_obj', '?')}: {what} needs a DICOM source, got {meta.get('source_format')}")
    return references, labels_on_source_slices(np.asarray(labels), _grid_affine(meta), references["source_geometry"])


def tracking_uid(key: str, kind: str, ident) -> str:
    """The tracking UID of a finding: ``kind`` ``"label"`` (value), ``"region"`` (name) or
    ``"lesion"`` (number) of the case whose input hashes to ``key``; stable across reruns."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[key, kind, str(ident)])


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
    regions: Sequence[RegionSegment] = (),
    lesions: tuple[np.ndarray, int] | None = None,
    tracking_key: str | None = None,
    uids: tuple[str, str] | None = None,
    tracking_uids: Mapping[tuple[str, object], str] | None = None,
):
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
        regions: regions made of several labels, each a segment after the labels' (overlapping them).
        lesions: a lesion map on the grid of ``labels`` (:func:`pipelines.batch.measures.lesion_map`)
            and how many of its lesions to write as segments (``"lesion 1"`` upwards), last.
        tracking_key: makes the segments' tracking UIDs (:func:`tracking_uid`); None: random ones.
        tracking_uids: tracking UIDs that segments keep from elsewhere, by ``("lesion", number)``
            (``("label", value)``, ``("region", name)``): a lesion matched to a prior study's keeps
            that one's, so a reporting system follows it across studies.
        uids: the SEG's series and SOP instance UIDs (the same for the same input and settings, so
            that storing it again does not make a second copy in an archive); None: new ones.

    Returns:
        The SEG written (a ``highdicom.seg.Segmentation``), for what refers to it (the SR) without
        reading the file back.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipelines import __version__

    memoise_iod_lookups()  # highdicom scans its tables for every source image otherwise
    algorithm_name = algorithm_name[:_LONG_STRING]  # a bundle's name is free text; DICOM keeps 64 characters
    references, frames = source_frames(labels, meta, "DICOM SEG")
    geometry = references["source_geometry"]
    affine = _grid_affine(meta)

    colours = {segment.label: segment.color for segment in segments if segment.color}
    coded = [(segment.name, segment.category, segment.type, "label", segment.label, frames == segment.label)
             for segment in segments]
    for region in regions:
        category, kind = region.codes
        coded.append((region.name, category, kind, "region", region.name, np.isin(frames, region.values)))
    if lesions is not None and lesions[1] > 0:
        lesion_frames = labels_on_source_slices(np.asarray(lesions[0]), affine, geometry)
        coded += [(f"lesion {n}", *LESION, "lesion", n, lesion_frames == n) for n in range(1, lesions[1] + 1)]
    if regions or lesions is not None:
        pixels = np.stack([mask for *_, mask in coded], axis=-1).astype(np.uint8)  # segments may overlap
    else:  # one label map: highdicom takes segment numbers
        pixels = np.zeros(frames.shape, dtype=np.uint8)
        for number, (*_, mask) in enumerate(coded, start=1):
            pixels[mask] = number
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
            segment_label=name,
            segmented_property_category=hd.sr.CodedConcept(*category),
            segmented_property_type=hd.sr.CodedConcept(*kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=(tracking_uids or {}).get((what, ident))
            or (hd.UID() if tracking_key is None else tracking_uid(tracking_key, what, ident)),
            tracking_id=name,
            display_color=hd.color.CIELabColor.from_rgb(*colours[ident]) if what == "label" and ident in colours else None,
        )
        for number, (name, category, kind, what, ident, _) in enumerate(coded, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids[0] if uids else hd.UID(),
        series_number=series_number,
        sop_instance_uid=uids[1] if uids else hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=software_version or __version__,
        device_serial_number="0",
        plane_positions=plane_positions,
        omit_empty_frames=omit_empty_frames and bool(pixels.any()),  # a SEG needs at least one frame
    )
    if regions:
        identify_private_scheme(seg)
    with atomic_path(Path(path)) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return seg


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
