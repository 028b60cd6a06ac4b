"""The radiologists' batch job: studies in; masks, DICOM SEG, volumes and QC pictures out."""

from __future__ import annotations

from .cases import BatchInputError, Case, discover_cases, pseudonym
from .measures import dice_scores, lesion_measurements, max_diameter_mm
from .model import BundleModel, bundle_hash
from .qc import qc_picture, save_qc_picture
from .report import read_records, write_reports
from .runner import BatchAbortedError, BatchInterrupted, BatchSummary, run_batch

__all__ = [
    "BatchAbortedError",
    "BatchInputError",
    "BatchInterrupted",
    "BatchSummary",
    "BundleModel",
    "Case",
    "bundle_hash",
    "dice_scores",
    "discover_cases",
    "lesion_measurements",
    "max_diameter_mm",
    "pseudonym",
    "qc_picture",
    "read_records",
    "run_batch",
    "save_qc_picture",
    "write_reports",
]
