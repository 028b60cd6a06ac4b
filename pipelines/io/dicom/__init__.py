"""DICOM series: find, group, select, sort and assemble into a volume."""

from __future__ import annotations

import os

import numpy as np

from pipelines.io.dicom.geometry import StackGeometry, plan_stack
from pipelines.io.dicom.scan import ScanResult, SliceRecord, scan_dicom
from pipelines.io.dicom.series import (
    SeriesCandidate,
    SeriesRules,
    drop_duplicate_instances,
    group_series,
    image_component,
    orientation_label,
    select_series,
)
from pipelines.io.dicom.volume import assemble_volume, source_geometry

__all__ = [
    "ScanResult",
    "SeriesCandidate",
    "SeriesRules",
    "SliceRecord",
    "StackGeometry",
    "drop_duplicate_instances",
    "find_volumes",
    "group_series",
    "image_component",
    "load_dicom",
    "load_series_records",
    "orientation_label",
    "plan_stack",
    "scan_dicom",
    "select_series",
]


def find_volumes(path: str | os.PathLike, rules: SeriesRules = SeriesRules()) -> list[SeriesCandidate]:
    """The candidate volumes under ``path`` that pass ``rules`` (all but ``volume``), in the order
    ``rules.volume`` counts them: by series, then acquisition order. For choosing a volume by hand."""
    return [c for c in group_series(scan_dicom(path).records) if rules.rejects(c) is None]


def load_dicom(path: str | os.PathLike, rules: SeriesRules, strict: bool = False,
               max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The chosen series under ``path`` as ``(volume (X, Y, Z) float32, RAS affine, metadata)``."""
    scan = scan_dicom(path)
    chosen = select_series(group_series(scan.records), rules, path)
    return load_series_records(chosen, path, strict=strict, scan=scan, max_voxels=max_voxels)


def load_series_records(
    chosen: SeriesCandidate, path: str | os.PathLike, strict: bool = False, scan: ScanResult | None = None,
    max_voxels: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Assemble an already selected series (e.g. found by a scan of a whole folder tree) like
    :func:`load_dicom`; ``path`` names the source in messages and metadata."""
    geometry = plan_stack(chosen.records, strict=strict, source=f"{path}: {chosen.describe()}")
    if chosen.dropped_duplicates:
        geometry.corrections.append({"type": "duplicate_instances_dropped", "count": chosen.dropped_duplicates})
    volume, affine = assemble_volume(geometry, max_voxels=max_voxels, source=f"{path}: {chosen.describe()}")
    first = geometry.records[0]
    meta = {
        "source_format": "dicom",
        "modality": first.modality,
        "study_instance_uid": first.study_instance_uid,
        "series_instance_uid": first.series_instance_uid,
        "series_description": first.series_description,
        "series_number": first.series_number,
        "geometry_corrections": geometry.corrections,
        "dicom": {
            "sop_instance_uids": [r.sop_instance_uid for r in geometry.records],
            "frame_numbers": [None if r.frame is None else r.frame + 1 for r in geometry.records],
            "source_files": [str(r.path) for r in geometry.records],
            "source_geometry": source_geometry(geometry),
            "transfer_syntax": first.transfer_syntax,
            "skipped_files": {
                "non_dicom": scan.skipped_non_dicom if scan else 0,
                "non_image": scan.skipped_non_image if scan else 0,
            },
        },
        "identifiers": dict(first.identifiers),
    }
    return volume, affine, meta
