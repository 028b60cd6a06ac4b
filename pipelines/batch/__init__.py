"""The radiologists' batch job: studies in; masks, DICOM SEG, volumes and QC pictures out.

Any bundle runs through it: what a bundle must define is in :mod:`pipelines.batch.bundle`.
"""

from __future__ import annotations

from .bundle import BundleModel, bundle_hash
from .cases import Case, RemoteQuery, discover_cases, pseudonym
from .errors import BatchAbortedError, BatchInputError, BundleContractError
from .lock import OutputLockedError, output_lock
from .measures import dice_scores, lesion_measurements, max_diameter_mm, region_volumes, section_measurements
from .outputs import CaseOutput, Output, default_outputs
from .qc import qc_picture, save_qc_picture
from .report import read_records, write_reports
from .runner import BatchInterrupted, BatchSummary, run_batch

__all__ = [
    "BatchAbortedError",
    "BatchInputError",
    "BatchInterrupted",
    "BatchSummary",
    "BundleContractError",
    "BundleModel",
    "Case",
    "CaseOutput",
    "Output",
    "OutputLockedError",
    "RemoteQuery",
    "bundle_hash",
    "default_outputs",
    "dice_scores",
    "discover_cases",
    "lesion_measurements",
    "max_diameter_mm",
    "output_lock",
    "pseudonym",
    "qc_picture",
    "read_records",
    "region_volumes",
    "run_batch",
    "save_qc_picture",
    "section_measurements",
    "write_reports",
]
