"""What the batch job writes for a segmented case: a list of small outputs, each adding its files to
the case folder and its fields to the record. A new output (an RTSTRUCT) joins by being added to the
list :func:`default_outputs` makes.

Every file is written under a temporary name and renamed when complete; ``record.json``, written
last by :class:`pipelines.batch.records.Records`, lists the files of a complete case.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from pipelines.batch.brain import BrainExtraction
from pipelines.batch.cases import Case
from pipelines.batch.retry import RetryPolicy
from pipelines.io.writers import atomic_path, save_nifti

__all__ = [
    "BrainMaskOutput", "CaseOutput", "ComparisonOutput", "DiceOutput", "DicomSegOutput", "DicomSrOutput", "MaskOutput", "MeasuresOutput", "Output",
    "ProbabilityOutput", "PushOutput", "QcOutput", "RtstructOutput", "default_outputs",
]

logger = logging.getLogger(__name__)

OUTPUT_FILES = ("mask.nii.gz", "mask.png", "seg.dcm", "sr.dcm", "rtstruct.dcm", "prob.nii.gz", "qc.png", "qc_thumbnail.png",
                "anatomy.nii.gz", "brain_mask.nii.gz")
DICOM_OUTPUTS = ("seg.dcm", "sr.dcm", "rtstruct.dcm")  # what --push stores, in this order


@dataclass
class CaseOutput:
    """A segmented case on its way out.

    Attributes:
        case: the case.
        case_dir: its output folder.
        sources: the loaded inputs (key -> ``(C, *spatial)`` MetaTensor).
        reference_key: the input whose grid the label map is on.
        labels: the label map ``(*spatial)`` on that grid.
        probabilities: ``(C, *spatial)`` float32 there, or None.
        views: input key -> ``(*spatial)`` volume on that grid (the bundle's ``qc_inputs`` as the
            preprocessing aligned them), for the QC picture.
        brain: what the bundle's brain extraction found (its mask on that grid when it was used),
            or None.
        record: the record being made; outputs add their fields.
        files: the files written so far (names in ``case_dir``).
        lesions: the lesion map on that grid and the lesion count
            (:func:`~pipelines.batch.measures.lesion_map`), once :class:`MeasuresOutput` made it.
    """

    case: Case
    case_dir: Path
    sources: Mapping
    reference_key: str
    labels: np.ndarray
    probabilities: np.ndarray | None = None
    views: Mapping = field(default_factory=dict)
    brain: BrainExtraction | None = None
    record: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    lesions: tuple[np.ndarray, int] | None = None

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


def _kept_tracking_uids(out: CaseOutput) -> dict:
    """``{("lesion", number): UID}`` of the lesions matched to a prior study's, which keep its UID."""
    comparison = out.record.get("comparison") or {}
    return {("lesion", int(lesion["lesion"])): lesion["tracking_uid"]
            for lesion in comparison.get("lesions") or () if lesion.get("tracking_uid")}


def _uids(out: CaseOutput, name: str) -> tuple[str, str]:
    """Series and SOP instance UIDs of one DICOM output of a case, the same for the same input and
    run settings (the record's ``run_key``) and the same prior study compared with: stored again, it
    replaces its copy in an archive; written with another content (a prior found since), it is
    another instance."""
    from pydicom.uid import generate_uid

    key = [out.case.input_hash, str(out.record.get("run_key")), name]
    prior = (out.record.get("comparison") or {}).get("prior_case")
    if prior:  # the comparison is part of the content (none: the UIDs of before comparisons existed)
        key.append(f"prior {prior}")
    return generate_uid(entropy_srcs=[*key, "series"]), generate_uid(entropy_srcs=[*key, "instance"])


class Output:
    """One kind of output. ``write`` adds files to ``out.case_dir`` (and their names to ``out.files``)
    and fields to ``out.record``."""

    def write(self, out: CaseOutput) -> None:
        raise NotImplementedError

    def finished(self, case_dir: Path, record: Mapping) -> None:
        """Called once the case's ``record.json`` is written."""


class MaskOutput(Output):
    """``mask.nii.gz``: the label map on the reference input's grid; ``mask.png`` for a picture."""

    def write(self, out: CaseOutput) -> None:
        dtype = np.uint8 if out.labels.max(initial=0) <= 255 else np.uint16
        if out.is_picture:
            from PIL import Image

            with atomic_path(out.case_dir / "mask.png") as tmp:
                Image.fromarray(np.ascontiguousarray(out.labels.T.astype(dtype))).save(tmp, format="PNG")
            out.files.append("mask.png")
        else:
            save_nifti(out.labels, out.affine, out.case_dir / "mask.nii.gz", dtype=dtype)
            out.files.append("mask.nii.gz")
        out.record["grid"] = {"shape": list(out.labels.shape), "spacing_mm": [round(float(s), 4) for s in out.spacing]}


class BrainMaskOutput(Output):
    """``brain_mask.nii.gz`` (the brain on the reference grid) for a whole-head study whose bundle
    extracted the brain, and the record's ``brain_extraction`` whenever the bundle ran its step."""

    def write(self, out: CaseOutput) -> None:
        if out.brain is None:
            return
        out.record["brain_extraction"] = dict(out.brain.report)
        if out.brain.mask is not None:
            save_nifti(out.brain.mask.astype(np.uint8), out.affine, out.case_dir / "brain_mask.nii.gz", dtype=np.uint8)
            out.files.append("brain_mask.nii.gz")


class ProbabilityOutput(Output):
    """``prob.nii.gz``: the bundle's probabilities (``--probabilities``)."""

    def write(self, out: CaseOutput) -> None:
        if out.probabilities is not None:
            save_nifti(out.probabilities, out.affine, out.case_dir / "prob.nii.gz", dtype=np.float32)
            out.files.append("prob.nii.gz")


class DicomSegOutput(Output):
    """``seg.dcm``: a DICOM SEG referencing the reference input's source series (DICOM input, and a
    bundle that declares ``dicom_seg_segments``): a segment per coded label, per region of several
    labels and per listed lesion (:func:`~pipelines.io.dicom_seg.write_dicom_seg`), tracking UIDs
    from the input's hash, a lesion matched to a prior study's keeping that one's. Follows
    :class:`MeasuresOutput` and :class:`ComparisonOutput`."""

    def __init__(self, segments, algorithm: str, version: str, regions: Mapping[str, Sequence[int]] | None = None) -> None:
        self.segments, self.algorithm, self.version = segments, algorithm, version
        self.regions = {name: tuple(values) for name, values in (regions or {}).items()}

    def write(self, out: CaseOutput) -> None:
        from pipelines.io import dicom_references

        if not self.segments or not dicom_references(out.reference.meta):
            return
        from pipelines.io.dicom_seg import RegionSegment, write_dicom_seg

        regions = [RegionSegment(name, values) for name, values in self.regions.items() if len(values) > 1]
        lesions = None if out.lesions is None else (out.lesions[0], len(out.record.get("lesions") or ()))
        write_dicom_seg(out.labels[None], out.reference.meta, self.segments, out.case_dir / "seg.dcm",
                        algorithm_name=self.algorithm, algorithm_version=self.version, omit_empty_frames=True,
                        regions=regions, lesions=lesions, tracking_key=out.case.input_hash, uids=_uids(out, "seg"),
                        tracking_uids=_kept_tracking_uids(out))
        out.files.append("seg.dcm")


class DicomSrOutput(Output):
    """``sr.dcm``: the TID 1500 measurement report (:func:`~pipelines.io.dicom_sr.write_measurement_report`)
    of the record's volumes per label and region, its lesions and their count, each group referencing
    its segment in ``seg.dcm`` (written only with it). Follows :class:`DicomSegOutput`."""

    def __init__(self, segments, labels: Mapping[int, str], regions: Mapping[str, Sequence[int]] | None,
                 algorithm: str, version: str, weights_sha256: str) -> None:
        self.coded = {segment.label for segment in segments or ()}
        self.labels, self.regions = dict(labels), {name: list(values) for name, values in (regions or {}).items()}
        self.algorithm, self.version, self.weights_sha256 = algorithm, version, weights_sha256

    def write(self, out: CaseOutput) -> None:
        if "seg.dcm" not in out.files or "volumes_ml" not in out.record:
            return
        from pipelines.io.dicom_sr import Lesion, Measures, write_measurement_report

        measures = Measures(
            volumes_ml={value: out.record["volumes_ml"][name] for value, name in self.labels.items() if value in self.coded},
            regions_ml=out.record.get("regions_ml") or {}, region_labels=self.regions,
            lesions=[Lesion(lesion["volume_ml"], lesion["diameter_mm"]) for lesion in out.record.get("lesions") or ()],
            lesion_count=int(out.record.get("lesion_count") or 0),
            comparison=self._comparison(out.record.get("comparison")),
        )
        write_measurement_report(out.case_dir / "sr.dcm", out.case_dir / "seg.dcm", measures, self.algorithm,
                                 self.version, self.weights_sha256, tracking_key=out.case.input_hash,
                                 uids=_uids(out, "sr"), tracking_uids=_kept_tracking_uids(out))
        out.files.append("sr.dcm")

    def _comparison(self, comparison: Mapping | None):
        """The record's ``comparison`` as :class:`~pipelines.io.dicom_sr.Comparison`, or None."""
        if not comparison or "error" in comparison:
            return None
        from pipelines.io.dicom_sr import Change, Comparison

        def change(entry: Mapping) -> Change:
            return Change(entry["change_ml"], entry.get("change_pct"))

        volumes = comparison.get("volumes_ml") or {}
        counts = comparison.get("lesion_count") or {}
        return Comparison(
            interval_days=int(comparison["interval_days"]),
            volumes={value: change(volumes[name]) for value, name in self.labels.items() if name in volumes},
            regions={name: change(entry) for name, entry in (comparison.get("regions_ml") or {}).items()},
            lesions=[(lesion["status"], change(lesion)) for lesion in comparison.get("lesions") or ()],
            new=int(counts.get("new", 0)), gone=int(counts.get("gone", 0)),
        )


class RtstructOutput(Output):
    """``rtstruct.dcm`` (``--rtstruct``): an RT Structure Set of the bundle's coded labels on the
    reference input's source slices (:func:`~pipelines.io.rtstruct.write_rtstruct`), for DICOM input."""

    def __init__(self, segments, algorithm: str, version: str) -> None:
        self.segments, self.algorithm, self.version = segments, algorithm, version

    def write(self, out: CaseOutput) -> None:
        from pipelines.io import dicom_references

        if not self.segments or not dicom_references(out.reference.meta):
            return
        from pipelines.io.rtstruct import write_rtstruct

        write_rtstruct(out.labels, out.reference.meta, self.segments, out.case_dir / "rtstruct.dcm",
                       self.algorithm, self.version, uids=_uids(out, "rtstruct"))
        out.files.append("rtstruct.dcm")


class PushOutput(Output):
    """Stores the case's DICOM outputs (SEG, SR, RTSTRUCT) on a server (``--push``): STOW-RS to a
    DICOMweb URL, C-STORE to a DICOM peer ``dicom://AET@host:port`` (as ``calling_aet``). ``pushed``
    in the record is ``{"url", <file>: {series and SOP instance UIDs}}``, set only once every file is
    stored: a failure fails the case naming what was stored before it, and a rerun stores them all
    again; their UIDs are the same for the same input and run settings, so the archive keeps one
    copy of each, not two. A transient failure is tried again first (``retry``; counted in the
    case's ``retries["push"]``): STOW-RS the file that failed, C-STORE every file on a new association."""

    def __init__(self, push_url: str | None, calling_aet: str = "UNETPIPELINES", retry: RetryPolicy | None = None) -> None:
        self.push_url, self.calling_aet, self.retry = push_url, calling_aet, retry or RetryPolicy()

    def write(self, out: CaseOutput) -> None:
        out.record["pushed"] = None
        files = [name for name in DICOM_OUTPUTS if name in out.files]
        if not self.push_url or not files:
            return
        retried = {"step": "push", "case_id": out.case.case_id, "counts": out.case.retries}
        if self.push_url.startswith("dicom://"):
            from pipelines.batch.dimse import DimsePeer, store_files

            stored = self.retry.call(partial(store_files, DimsePeer.parse(self.push_url), self.calling_aet,
                                             [out.case_dir / n for n in files]), **retried)
        else:
            from pipelines.batch.dicomweb import push_instance

            stored = {}
            for name in files:
                try:
                    where = self.retry.call(partial(push_instance, self.push_url, out.case_dir / name), **retried)
                except ValueError as exc:
                    raise ValueError(f"{exc} (stored before it: {', '.join(stored) or 'none'})") from exc
                stored[name] = {k: v for k, v in where.items() if k != "url"}
        out.record["pushed"] = {"url": self.push_url, **stored}


class MeasuresOutput(Output):
    """Volumes per label (and region) in mL, lesions (connected components of ``lesion_labels``, default
    every foreground label) and the largest one's diameter for a volume; pixel areas, fractions and
    objects per label for a 2D section."""

    def __init__(self, labels: Mapping[int, str], regions: Mapping[str, Sequence[int]] | None = None,
                 lesion_labels: Sequence[int] | None = None) -> None:
        self.labels, self.regions = dict(labels), dict(regions or {})
        self.lesion_labels = None if lesion_labels is None else list(lesion_labels)

    def write(self, out: CaseOutput) -> None:
        from pipelines.batch.measures import lesion_map, lesion_measurements, region_volumes, section_measurements

        if out.labels.ndim == 2:
            out.record.update(section_measurements(out.labels, self.labels))
            return
        out.lesions = lesion_map(out.labels, self.lesion_labels)
        out.record.update(lesion_measurements(out.labels, out.affine, self.labels, self.lesion_labels, out.lesions))
        if self.regions:
            out.record["regions_ml"] = region_volumes(out.labels, out.affine, self.regions)


class ComparisonOutput(Output):
    """The change since the prior study (:mod:`pipelines.batch.priors`), for a volume from DICOM
    input with a PatientID and a StudyDate, or from a manifest entry with ``patient`` and
    ``study_date`` (``YYYYMMDD``): ``study`` in the record (the patient and study as keyed
    hashes, the shifted day), ``anatomy.nii.gz`` (the reference image at about 2 mm, for later
    studies), and ``comparison`` with the latest earlier study of the patient among the run's
    finished cases and the ``prior`` output folders (None when there is none; ``{prior_case,
    prior_output, error}`` when the prior's files cannot be compared: the case itself stays ok).
    Follows :class:`MeasuresOutput` (its lesions); the SR and the report show it.

    Args:
        output: the run's output folder.
        prior: output folders of earlier runs.
        lesion_labels, regions: the bundle's.
        bundle: the bundle's name: priors segmented by another bundle are not compared.
    """

    def __init__(self, output: Path, prior: Sequence[Path] = (), lesion_labels: Sequence[int] | None = None,
                 regions: Mapping[str, Sequence[int]] | None = None, bundle: str | None = None) -> None:
        from pipelines.batch.priors import PriorIndex

        self.index = PriorIndex(Path(output), [Path(p) for p in prior], bundle)
        self.lesion_labels = None if lesion_labels is None else list(lesion_labels)
        self.regions = dict(regions or {})
        self._salt: bytes | None = None

    def write(self, out: CaseOutput) -> None:
        from pipelines.batch.priors import ANATOMY_FILE, compare_with_prior, site_salt, study_identity, write_anatomy

        meta = out.reference.meta
        if out.labels.ndim != 3 or out.lesions is None or out.is_picture:
            return
        if self._salt is None:
            self._salt = site_salt()
        identifiers, study_uid = meta.get("identifiers") or {}, str(meta.get("study_instance_uid") or "")
        if not identifiers.get("patient_id"):  # an image file: what its manifest entry says, if anything
            identifiers, study_uid = out.case.identifiers, out.case.case_id
        identity = study_identity(identifiers, study_uid, self._salt)
        if identity is None:
            return
        out.record["study"] = identity
        write_anatomy(out.case_dir / ANATOMY_FILE, np.asarray(out.reference[0]), out.affine)
        out.files.append(ANATOMY_FILE)
        found = self.index.prior(identity, out.case_dir)
        if found is None:
            out.record["comparison"] = None
            return
        try:
            out.record["comparison"] = compare_with_prior(
                out.labels, out.affine, out.lesions, out.record, out.case_dir / ANATOMY_FILE, *found,
                self.lesion_labels, self.regions)
        except Exception as exc:  # noqa: BLE001 - a damaged prior must not fail this study's segmentation
            from pipelines.batch.loading import describe_error

            logger.warning("%s: no comparison with prior case %s; the reason is in its record",
                           out.case.case_id, found[1].get("case_id"))
            out.record["comparison"] = {"prior_case": found[1].get("case_id"), "prior_output": str(found[0]),
                                        "error": describe_error(exc)}

    def finished(self, case_dir: Path, record: Mapping) -> None:
        self.index.add(case_dir, record)


class QcOutput(Output):
    """``qc.png`` (axial, coronal and sagittal slices through the largest lesion, or the section; a
    row per input the bundle's ``qc_inputs`` names, e.g. FLAIR and T1c; the brain extracted from a
    whole head outlined) and ``qc_thumbnail.png`` for the run report. Follows :class:`MeasuresOutput` (it places the slices
    and writes the caption from its fields)."""

    def write(self, out: CaseOutput) -> None:
        from pipelines.batch.qc import save_qc_picture

        if "volumes_ml" in out.record:
            parts = [f"{k} {v:.1f} mL" for k, v in out.record["volumes_ml"].items()]
        else:
            parts = [f"{k} {v:.1%}" for k, v in (out.record.get("area_fractions") or {}).items()]
        largest = out.record.get("largest_lesion")
        views = {key: view for key, view in out.views.items() if np.shape(view) == out.labels.shape}
        image = views or np.asarray(out.reference[0])
        save_qc_picture(out.case_dir / "qc.png", image, out.labels, out.affine,
                        point=largest["centre_voxel"] if largest else None,
                        outline=out.brain.mask if out.brain is not None else None,
                        caption=f"{out.case.case_id}  " + "  ".join(parts), thumbnail=out.case_dir / "qc_thumbnail.png")
        out.files += ["qc.png", "qc_thumbnail.png"]


class DiceOutput(Output):
    """Scores against a reference label file (manifest input with labels): Dice per label, and for a
    bundle that declares regions, per region Dice, HD95 and the BraTS lesion-wise scores
    (:func:`pipelines.metrics.brats.brats_scores`; not for 2D pictures, which have no millimetres).

    Args:
        labels: label value -> name.
        regions: region name -> the label values it covers.
        lesion_scoring: ``dilation`` and ``min_lesion_mm3`` for the lesion-wise scores.
    """

    def __init__(self, labels: Mapping[int, str], regions: Mapping[str, Sequence[int]] | None = None,
                 lesion_scoring: Mapping | None = None) -> None:
        self.labels = dict(labels)
        self.regions = dict(regions or {})
        self.lesion_scoring = dict(lesion_scoring or {})

    def write(self, out: CaseOutput) -> None:
        if not out.case.label:
            return
        from pipelines.batch.measures import dice_scores
        from pipelines.io import load_volume
        from pipelines.io.writers import resample_labels

        reference = load_volume(out.case.label)
        on_grid = resample_labels(reference.numpy(), np.asarray(reference.affine), out.labels.shape, out.affine)
        out.record["dice"] = dice_scores(out.labels, on_grid, self.labels)
        if self.regions and not out.is_picture:
            from pipelines.metrics.brats import brats_scores

            scores = brats_scores(out.labels, on_grid, out.spacing, self.regions, **self.lesion_scoring)
            out.record["region_scores"] = {
                name: {k: round(v, 4) if isinstance(v, float) else v for k, v in score.as_dict().items()}
                for name, score in scores.items()
            }


def default_outputs(model, probabilities: bool = False, push_url: str | None = None, rtstruct: bool = False,
                    calling_aet: str = "UNETPIPELINES", output: Path | None = None,
                    prior: Sequence[Path] = (), retry: RetryPolicy | None = None) -> list[Output]:
    """The batch job's outputs for ``model`` (a :class:`~pipelines.batch.bundle.BundleModel`), in order;
    ``output`` (the run's folder) and ``prior`` (earlier runs' folders) for the comparison with prior
    studies (none without ``output``); ``retry`` for the push."""
    outputs: list[Output] = [MaskOutput(), BrainMaskOutput()]
    if probabilities:
        outputs.append(ProbabilityOutput())
    outputs += [
        MeasuresOutput(model.labels, model.regions, model.lesion_labels),
        *([ComparisonOutput(output, prior, model.lesion_labels, model.regions, model.name)] if output is not None else []),
        DicomSegOutput(model.segments, model.name, model.version, model.regions),
        DicomSrOutput(model.segments, model.labels, model.regions, model.name, model.version, model.weights_sha256),
        *([RtstructOutput(model.segments, model.name, model.version)] if rtstruct else []),
        PushOutput(push_url, calling_aet, retry),
        QcOutput(),
        DiceOutput(model.labels, model.regions, model.lesion_scoring),
    ]
    return outputs
