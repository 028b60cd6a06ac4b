"""What every output of a segmented case works from (:class:`Segmented`), what the outputs have made of
it so far (:class:`CaseOutput`, typed), and what an output is (:class:`Output`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.batch.brain import BrainExtraction
from pipelines.batch.cases import Case
from pipelines.batch.comparison import ComparisonFailure, PriorComparison
from pipelines.batch.measures import SectionMeasures, VolumeMeasures

__all__ = ["DICOM_OUTPUTS", "OUTPUT_FILES", "CaseOutput", "Grid", "Output", "Scores", "Segmented", "check_order"]

OUTPUT_FILES = ("mask.nii.gz", "mask.png", "seg.dcm", "sr.dcm", "rtstruct.dcm", "prob.nii.gz", "qc.png", "qc_thumbnail.png",
                "anatomy.nii.gz", "brain_mask.nii.gz", "index.html")
DICOM_OUTPUTS = ("seg.dcm", "sr.dcm", "rtstruct.dcm")  # what --push stores, in this order


@dataclass
class Segmented:
    """A case through the network: what its outputs are made from.

    Attributes:
        case: the case.
        sources: the loaded inputs (key -> ``(C, *spatial)`` MetaTensor).
        reference_key: the input whose grid the label map is on.
        labels: the label map ``(*spatial)`` on that grid.
        probabilities: ``(C, *spatial)`` float32 there, or None.
        views: input key -> ``(*spatial)`` volume as the preprocessing left it (aligned with the
            reference where the bundle registers its inputs), for the QC picture and the case page.
        brain: what the bundle's brain extraction found (its mask on that grid when it was used), or None.
        registration: per input the bundle's preprocessing aligned with the reference, how
            (:class:`pipelines.transforms.RegisterToReferenced`'s ``registration``).
        timings: seconds per step so far (``load_s``, ``preprocess_s``, ``inference_s``).
        warnings: the case's warnings so far; those raised while the outputs are written join them.
    """

    case: Case
    sources: Mapping
    reference_key: str
    labels: np.ndarray
    probabilities: np.ndarray | None = None
    views: Mapping = field(default_factory=dict)
    brain: BrainExtraction | None = None
    registration: Mapping[str, dict] = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def reference(self):
        return self.sources[self.reference_key]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.reference.affine, dtype=np.float64)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each axis of the reference grid, from its affine."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)[: self.labels.ndim]

    @property
    def is_picture(self) -> bool:
        """A 2D section from a picture file: no physical size, no patient geometry."""
        return self.reference.meta.get("source_format") == "picture"


@dataclass(frozen=True)
class Grid:
    """The label map's grid: its shape and voxel size (mm)."""

    shape: list[int]
    spacing_mm: list[float]

    def as_record(self) -> dict:
        return {"shape": self.shape, "spacing_mm": self.spacing_mm}


@dataclass(frozen=True)
class Scores:
    """Scores against a reference label: Dice per label name; per region the BraTS scores, or None."""

    dice: dict[str, float | None]
    regions: dict[str, dict] | None = None

    def as_record(self) -> dict:
        return {"dice": self.dice, **({"region_scores": self.regions} if self.regions is not None else {})}


@dataclass
class CaseOutput:
    """A segmented case on its way out: what the outputs have made of it so far. Each output reads
    what earlier ones made (the SR the SEG dataset, the SEG the comparison's kept tracking UIDs) and
    sets its own; ``record.json`` is written last from these
    (:meth:`pipelines.batch.records.Records.ok`).

    Attributes:
        segmented: the case through the network.
        case_dir: its output folder.
        run_key: the hash of the model and settings (DICOM outputs derive their UIDs from it).
        files: the files written so far (names in ``case_dir``).
        grid: the label map's grid.
        measures: volumes and lesions of a volume, or areas of a 2D section.
        study: the patient and study as keyed hashes (:func:`pipelines.batch.priors.study_identity`),
            or None when the case has none.
        anatomy: the reference image at about 2 mm, as written for later studies.
        comparison: with the prior study, when one was found.
        history: what was kept of the records of the patient's earlier studies, in time order.
        rano: the RANO measurements (and, with earlier studies, the response).
        seg: the DICOM SEG written.
        pushed: where the DICOM outputs were stored (``--push``).
        scores: against the case's reference label.
    """

    segmented: Segmented
    case_dir: Path
    run_key: str
    files: list[str] = field(default_factory=list)
    grid: Grid | None = None
    measures: VolumeMeasures | SectionMeasures | None = None
    study: dict | None = None
    anatomy: object | None = None
    comparison: PriorComparison | ComparisonFailure | None = None
    history: list[dict] = field(default_factory=list)
    rano: object | None = None  # pipelines.batch.outputs.rano.RanoResult
    seg: Dataset | None = None
    pushed: dict | None = None
    scores: Scores | None = None

    @property
    def case(self) -> Case:
        return self.segmented.case

    def kept_tracking_uids(self) -> dict:
        """``{("lesion", number): UID}`` of the lesions matched to a prior study's, which keep its UID."""
        return self.comparison.kept_tracking_uids() if self.comparison is not None else {}

    def uids(self, name: str) -> tuple[str, str]:
        """Series and SOP instance UIDs of one DICOM output, the same for the same input and run
        settings and the same prior study compared with: stored again, it replaces its copy in an
        archive; written with another content (a prior found since), it is another instance."""
        key = [self.case.input_hash, self.run_key, name]
        if self.comparison is not None and self.comparison.prior_case:  # the comparison is part of the content
            key.append(f"prior {self.comparison.prior_case}")
        return generate_uid(entropy_srcs=[*key, "series"]), generate_uid(entropy_srcs=[*key, "instance"])


class Output:
    """One kind of output. ``write`` adds files to ``out.case_dir`` (and their names to ``out.files``)
    and sets its typed results on ``out``; ``fields`` gives its part of ``record.json`` from them.

    ``provides`` names what it makes (results of :class:`CaseOutput`, or a file's kind) and ``reads``
    what it uses of others: an output that provides something another reads must come before it in
    the list (:func:`check_order`)."""

    provides: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def write(self, out: CaseOutput) -> None:
        raise NotImplementedError

    def fields(self, out: CaseOutput) -> dict:
        """This output's fields of the record (none by default)."""
        return {}

    def finished(self, case_dir: Path, record: Mapping) -> None:
        """Called once the case's ``record.json`` is written."""


def check_order(outputs: Sequence[Output]) -> None:
    """Refuses a list of outputs where one reads what a later one provides.

    Raises:
        ValueError: naming both outputs and what is read too early.
    """
    for index, output in enumerate(outputs):
        for later in outputs[index + 1:]:
            early = sorted(set(output.reads) & set(later.provides))
            if early:
                raise ValueError(f"{type(output).__name__} reads {', '.join(early)}, which {type(later).__name__} "
                                 f"provides after it: put {type(later).__name__} first")
