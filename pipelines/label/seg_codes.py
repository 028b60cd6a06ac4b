"""Segment descriptions for the DICOM SEGs MONAI Label writes, from the bundles' SNOMED CT codes.

MONAI Label's converter (``nifti_to_dicom_seg``) gives every segment the category "Anatomical
Structure" and the type code 78961009 (SNOMED CT "Spleen") with the segment's name as its meaning,
and pairs the i-th ``label_info`` entry with the i-th label value present in the label, so a label
without tumor voxels stores edema under tumor's name. A ``label_info`` entry that carries its own
``segmentAttribute`` is used as given: :func:`segment_attributes` builds one such entry per value
present, with the codes of the bundle's ``dicom_seg_segments`` (those the batch job writes too).

Imports in any environment: nothing here needs MONAI Label or pydicom.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pipelines.segment_codes import SegmentCode, segments_from_metadata

__all__ = ["GENERIC_CODE", "bundle_segments", "segment_attributes"]

logger = logging.getLogger(__name__)

# SNOMED CT "Tissue", for values no served bundle describes (dcmqi's generic choice)
GENERIC_CODE = ("85756007", "SCT", "Tissue")

_ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")

# display colours by label value when the request gives none (3D Slicer's first generic colours)
_COLOURS = ((128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (221, 130, 101))


def bundle_segments(bundle_dirs: Iterable[str | os.PathLike]) -> list[SegmentCode]:
    """The segments (:func:`pipelines.segment_codes.segments_from_metadata`) of the bundles'
    ``configs/metadata.json``, in bundle order; a bundle without ``dicom_seg_segments`` adds none."""
    found = []
    for folder in map(Path, bundle_dirs):
        path = folder / "configs" / "metadata.json"
        try:
            metadata = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable bundle metadata ({exc})") from exc
        if metadata.get("dicom_seg_segments"):
            try:
                found += segments_from_metadata(metadata)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from exc
    return found


def _code(code: Sequence[str]) -> dict:
    value, scheme, meaning = code
    return {"CodeValue": str(value), "CodingSchemeDesignator": str(scheme), "CodeMeaning": str(meaning)}


def _describing(value: int, name: str | None, segments: Sequence[SegmentCode]) -> SegmentCode | None:
    """The segment of that name; with no name, the one segment of that value (None if several bundles differ)."""
    if name:
        return next((s for s in segments if s.name.lower() == name.lower()), None)
    matches = {s for s in segments if s.label == value}
    return matches.pop() if len(matches) == 1 else None


def segment_attributes(values: Iterable[int], label_info: Sequence[Mapping] | None, segments: Sequence[SegmentCode],
                       algorithm_type: str = "AUTOMATIC", algorithm_name: str = "unet-pipelines") -> list[dict]:
    """MONAI Label ``label_info`` for a label whose nonzero values are ``values``: one entry per value,
    in ascending order (the converter's pairing), each with a dcmqi ``segmentAttribute``.

    A client's entry describes the value of its ``idx``; when no entry has an ``idx``, the i-th entry
    describes the i-th value present (MONAI Label's own pairing). Its ``name`` picks the bundle
    segment whose codes are used; with no name, the segment of that label value, if the served
    bundles agree on it. A value nothing describes is named ``label <value>``, coded as tissue.

    Args:
        values: the label values present (0 is skipped).
        label_info: the request's ``label_info`` (entries of ``name``, ``idx``, ``color``...), or None.
        segments: :func:`bundle_segments` of the served bundles.
        algorithm_type: ``AUTOMATIC`` (a model's result) or ``SEMIAUTOMATIC`` (a corrected label).
        algorithm_name: written as the segments' algorithm name.
    """
    if algorithm_type not in _ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type must be one of {_ALGORITHM_TYPES}, got {algorithm_type!r}")
    present = sorted({int(v) for v in values} - {0})
    info = list(label_info or [])
    by_value = {int(e["idx"]): e for e in info if isinstance(e, Mapping) and e.get("idx") is not None}
    if not by_value:
        by_value = dict(zip(present, info))
    model_name = next((e["model_name"] for e in info if isinstance(e, Mapping) and e.get("model_name")), algorithm_name)
    out = []
    for value in present:
        given = by_value.get(value, {})
        segment = _describing(value, given.get("name"), segments)
        name = given.get("name") or (segment.name if segment else f"label {value}")
        if segment is None:
            logger.warning("label value %d (%s) is in no served bundle's dicom_seg_segments: coded as tissue", value, name)
        attribute = {
            "labelID": value,
            "SegmentLabel": name,
            "SegmentDescription": given.get("description") or name,
            "SegmentAlgorithmType": algorithm_type,
            "SegmentedPropertyCategoryCodeSequence": _code(segment.category if segment else GENERIC_CODE),
            "SegmentedPropertyTypeCodeSequence": _code(segment.type if segment else GENERIC_CODE),
        }
        if algorithm_type != "MANUAL":
            attribute["SegmentAlgorithmName"] = algorithm_name
        colour = given.get("color") or _COLOURS[(value - 1) % len(_COLOURS)]
        attribute["recommendedDisplayRGBValue"] = [int(c) for c in list(colour)[:3]]
        out.append({**given, "name": name, "model_name": model_name, "segmentAttribute": attribute})
    return out
