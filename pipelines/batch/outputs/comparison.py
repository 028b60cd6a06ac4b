"""The change since the prior study, as an output: ``study``, ``anatomy.nii.gz`` and ``comparison``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipelines.batch.comparison import ComparisonFailure, compare_with_prior
from pipelines.batch.errors import describe_error
from pipelines.batch.measures import VolumeMeasures
from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.batch.priors import ANATOMY_FILE, PriorIndex, latest_comparable, site_salt, study_identity, write_anatomy

__all__ = ["ComparisonOutput"]

logger = logging.getLogger(__name__)


class ComparisonOutput(Output):
    """The change since the prior study (:mod:`pipelines.batch.comparison`), for a volume from DICOM
    input with a PatientID and a StudyDate, or from a manifest entry with ``patient`` and
    ``study_date`` (``YYYYMMDD``): ``study`` in the record (the patient and study as keyed
    hashes, the shifted day), ``anatomy.nii.gz`` (the reference image at about 2 mm, for later
    studies), and ``comparison`` with the latest earlier study of the patient among the run's
    finished cases and the ``prior`` output folders (None when there is none; ``{prior_case,
    prior_output, error}`` when the prior's files cannot be compared: the case itself stays ok).
    Works from the measures (their lesion map).

    Args:
        output: the run's output folder.
        prior: output folders of earlier runs.
        lesion_labels: the bundle's.
        regions: the bundle's.
        bundle: the bundle's name: priors segmented by another bundle are not compared.
    """

    provides = ("study", "anatomy", "comparison", "history")
    reads = ("measures",)

    def __init__(self, output: Path, prior: Sequence[Path] = (), lesion_labels: Sequence[int] | None = None,
                 regions: Mapping[str, Sequence[int]] | None = None, bundle: str | None = None) -> None:
        self.index = PriorIndex(Path(output), [Path(p) for p in prior], bundle)
        self.lesion_labels = None if lesion_labels is None else list(lesion_labels)
        self.regions = dict(regions or {})
        self._salt: bytes | None = None

    def write(self, out: CaseOutput) -> None:
        case = out.segmented
        if case.labels.ndim != 3 or not isinstance(out.measures, VolumeMeasures) or case.is_picture:
            return
        if self._salt is None:
            self._salt = site_salt()
        meta = case.reference.meta
        identifiers, study_uid = meta.get("identifiers") or {}, str(meta.get("study_instance_uid") or "")
        if not identifiers.get("patient_id"):  # an image file: what its manifest entry says, if anything
            identifiers, study_uid = out.case.identifiers, out.case.case_id
        out.study = study_identity(identifiers, study_uid, self._salt)
        if out.study is None:
            return
        earlier = self.index.earlier(out.study, out.case_dir)
        out.history = [study.record for study in earlier]
        out.anatomy = write_anatomy(out.case_dir / ANATOMY_FILE, np.asarray(case.reference[0]), case.affine)
        out.files.append(ANATOMY_FILE)
        found = latest_comparable(earlier)
        if found is None:
            return
        prior_dir, prior_record = found
        try:
            out.comparison = compare_with_prior(case.labels, case.affine, out.measures, out.study, out.anatomy,
                                                prior_dir, prior_record, self.lesion_labels, self.regions)
        except Exception as exc:  # noqa: BLE001 - a damaged prior must not fail this study's segmentation
            logger.warning("%s: no comparison with prior case %s; the reason is in its record",
                           out.case.case_id, prior_record.get("case_id"))
            out.comparison = ComparisonFailure(prior_record.get("case_id"), str(prior_dir), describe_error(exc))

    def fields(self, out: CaseOutput) -> dict:
        if out.study is None:
            return {}
        return {"study": out.study, "comparison": out.comparison.as_record() if out.comparison is not None else None}

    def finished(self, case_dir: Path, record: Mapping) -> None:
        self.index.add(case_dir, record)
