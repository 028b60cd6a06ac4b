"""Metadata that survives MONAI's batching.

MONAI's ``list_data_collate`` stacks metadata values across a batch, which fails for ``None`` and
for lists whose length differs between cases (slice counts do). So every loader returns the same
keys with plain values, and the per-slice DICOM references and the geometry corrections travel as
JSON strings; these helpers read them back from one case's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["IDENTIFIER_KEYS", "dicom_references", "geometry_corrections", "uniform_metadata"]

IDENTIFIER_KEYS = ("patient_id", "patient_name", "accession_number", "study_id", "study_date")


def uniform_metadata(meta: Mapping) -> dict:
    """``meta`` with every key ``load_volume`` promises, in collate-safe types."""
    out = dict(meta)
    for key in ("modality", "study_instance_uid", "series_instance_uid", "series_description"):
        out[key] = str(out.get(key) or "")
    number = out.get("series_number")
    out["series_number"] = -1 if number is None else int(number)
    corrections = out.get("geometry_corrections") or []
    out["geometry_corrections"] = corrections if isinstance(corrections, str) else json.dumps(corrections)
    dicom = out.get("dicom") or {}
    out["dicom"] = dicom if isinstance(dicom, str) else json.dumps(dicom)
    identifiers = out.get("identifiers") or {}
    out["identifiers"] = {key: str(identifiers.get(key, "")) for key in IDENTIFIER_KEYS}
    return out


def geometry_corrections(meta: Mapping) -> list[dict]:
    """The corrections ``load_volume`` applied (gantry tilt, uneven spacing, dropped duplicates)."""
    return json.loads(meta.get("geometry_corrections") or "[]")


def dicom_references(meta: Mapping) -> dict:
    """For a DICOM source: ``sop_instance_uids``, ``frame_numbers`` (1-based, None for single-frame
    files) and ``source_files`` in slice order, ``source_geometry``, ``transfer_syntax``,
    ``skipped_files``; ``{}`` otherwise."""
    return json.loads(meta.get("dicom") or "{}")
