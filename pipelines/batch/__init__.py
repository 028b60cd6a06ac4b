"""The radiologists' batch job: studies in; masks, DICOM SEG, volumes and QC pictures out.

Any bundle runs through it (the contract: docs/reference/bundle-contract.md). The stages, each handing
the next a typed object: :mod:`~pipelines.batch.plan` (what the run will do), :mod:`~pipelines.batch.discovery`
(the cases, :class:`Case`; servers in :mod:`~pipelines.batch.remote`), :mod:`~pipelines.batch.loading`
(each case loaded and preprocessed), :mod:`~pipelines.batch.runner` (through the network: :class:`Segmented`),
:mod:`~pipelines.batch.outputs` (one module per output) and :mod:`~pipelines.batch.records` (``record.json``,
last), :mod:`~pipelines.batch.report` (the run's reports).
"""

from __future__ import annotations

from .bundle import BundleModel, bundle_hash
from .cases import Case, RemoteQuery, pseudonym
from .discovery import discover_cases
from .errors import BatchAbortedError, BatchInputError, BundleContractError
from .lock import OutputLockedError, output_lock
from .measures import dice_scores, lesion_measurements, max_diameter_mm, region_volumes, section_measurements
from .outputs import CaseOutput, Output, Segmented, default_outputs
from .qc import qc_picture, save_qc_picture
from .report import read_records, write_reports
from .runner import BatchSummary, run_batch
from .signals import BatchInterrupted

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
    "Segmented",
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
