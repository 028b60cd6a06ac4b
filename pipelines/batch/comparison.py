"""The change since the prior study (found by :mod:`pipelines.batch.priors`), as typed results.

The prior's anatomy is registered rigidly to the case's
(:func:`pipelines.transforms.registration.register_rigid`: the patient lies differently in the
scanner on another day), the prior's lesions (:func:`pipelines.batch.measures.lesion_map` of its
mask) are carried onto the case's grid through that registration (nearest voxel), and each lesion
of the case that overlaps lesions of the prior is matched to them; the others are "new", and the
prior's lesions that no lesion of the case overlaps are "gone". Volumes (per label, per region,
per lesion) are each measured on its own study's grid; the change is in mL and in percent of the
prior volume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.batch.measures import VolumeMeasures, lesion_map, voxel_ml
from pipelines.batch.priors import ANATOMY_FILE
from pipelines.io.dicom_seg import tracking_uid
from pipelines.io.dicom_sr import Change, Comparison

__all__ = ["ComparisonFailure", "LesionChange", "PriorComparison", "PriorImages", "VolumeChange", "carry",
           "compare_with_prior"]


@dataclass(frozen=True)
class VolumeChange:
    """A volume before and now (mL), its change in mL and in percent of the prior (None from 0)."""

    prior_ml: float
    now_ml: float
    change_ml: float
    change_pct: float | None

    @classmethod
    def between(cls, prior: float, now: float) -> VolumeChange:
        return cls(round(prior, 3), round(now, 3), round(now - prior, 3),
                   round(100.0 * (now - prior) / prior, 1) if prior > 0 else None)

    def as_record(self) -> dict:
        return {"prior_ml": self.prior_ml, "now_ml": self.now_ml, "change_ml": self.change_ml,
                "change_pct": self.change_pct}

    def for_report(self) -> Change:
        return Change(self.change_ml, self.change_pct)


@dataclass(frozen=True)
class LesionChange:
    """A listed lesion of the case: ``new``, or ``matched`` to the prior lesions it overlaps (their
    numbers in the prior), with the volume change; ``tracking_uid`` the prior lesion's when it became
    this one alone (the same finding)."""

    lesion: int
    status: str
    prior_lesions: list[int]
    change: VolumeChange
    tracking_uid: str | None = None

    def as_record(self) -> dict:
        out = {"lesion": self.lesion, "status": self.status, "prior_lesions": self.prior_lesions,
               **self.change.as_record()}
        return {**out, "tracking_uid": self.tracking_uid} if self.tracking_uid else out


@dataclass(frozen=True)
class PriorImages:
    """The prior's anatomy and label map as the comparison read them, each with its RAS affine, and
    ``matrix`` (RAS: a point of the case's study to the prior's point), for the case page."""

    anatomy: np.ndarray
    anatomy_affine: np.ndarray
    labels: np.ndarray
    labels_affine: np.ndarray
    matrix: np.ndarray

    def on_grid(self, shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The anatomy and the label map on the case's grid ``(shape, affine)`` (:func:`carry`)."""
        return (carry(self.anatomy, self.anatomy_affine, shape, affine, self.matrix),
                carry(self.labels.astype(np.uint8), self.labels_affine, shape, affine, self.matrix))


@dataclass(frozen=True)
class PriorComparison:
    """A case compared with its prior (:func:`compare_with_prior`); ``as_record`` is the record's
    ``comparison``.

    Attributes:
        prior_case, prior_output: the prior's case id and output folder.
        interval_days: days since the prior study.
        registration: the prior's anatomy onto the case's (matrix, translation, rotation, mutual
            information, kept).
        volumes_ml, regions_ml: per label and per region name.
        lesion_count: ``{prior, now, new, gone}``.
        lesions: per listed lesion of the case.
        gone: the prior's lesions that no lesion of the case overlaps, with their volumes.
        images: the prior's images as read (not in the record).
    """

    prior_case: str | None
    prior_output: str
    interval_days: int
    registration: dict
    volumes_ml: dict[str, VolumeChange]
    regions_ml: dict[str, VolumeChange]
    lesion_count: dict[str, int]
    lesions: list[LesionChange]
    gone: list[dict]
    images: PriorImages | None = field(default=None, repr=False, compare=False)

    def as_record(self) -> dict:
        return {
            "prior_case": self.prior_case,
            "prior_output": self.prior_output,
            "interval_days": self.interval_days,
            "registration": self.registration,
            "volumes_ml": {name: change.as_record() for name, change in self.volumes_ml.items()},
            "regions_ml": {name: change.as_record() for name, change in self.regions_ml.items()},
            "lesion_count": self.lesion_count,
            "lesions": [lesion.as_record() for lesion in self.lesions],
            "gone": self.gone,
        }

    def kept_tracking_uids(self) -> dict:
        """``{("lesion", number): UID}`` of the lesions that keep their prior's tracking UID."""
        return {("lesion", lesion.lesion): lesion.tracking_uid for lesion in self.lesions if lesion.tracking_uid}

    def for_report(self, labels: Mapping[int, str]) -> Comparison:
        """As the SR states it (:class:`pipelines.io.dicom_sr.Comparison`), label values by ``labels``."""
        return Comparison(
            interval_days=self.interval_days,
            volumes={value: self.volumes_ml[name].for_report() for value, name in labels.items()
                     if name in self.volumes_ml},
            regions={name: change.for_report() for name, change in self.regions_ml.items()},
            lesions=[(lesion.status, lesion.change.for_report()) for lesion in self.lesions],
            new=int(self.lesion_count.get("new", 0)), gone=int(self.lesion_count.get("gone", 0)),
        )


@dataclass(frozen=True)
class ComparisonFailure:
    """A prior that was found but could not be compared (a damaged ``anatomy.nii.gz``, a removed
    mask): the case itself stays ok, and its record says why."""

    prior_case: str | None
    prior_output: str
    error: str

    def as_record(self) -> dict:
        return {"prior_case": self.prior_case, "prior_output": self.prior_output, "error": self.error}

    def kept_tracking_uids(self) -> dict:
        return {}


def _lesion_uid(record: Mapping, number: int) -> str | None:
    """The tracking UID of lesion ``number`` of a study's record: the one it kept from its own prior
    study, else its own (:func:`pipelines.io.dicom_seg.tracking_uid` of its input hash); None for a
    record without an input hash."""
    kept = (record.get("lesion_uids") or {}).get(number)
    if kept:
        return kept
    return tracking_uid(record["input_hash"], "lesion", number) if record.get("input_hash") else None


def carry(prior_map: np.ndarray, prior_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray,
           matrix: np.ndarray) -> np.ndarray:
    """``prior_map`` (any image) on the grid ``(shape, affine)``, nearest voxel, through ``matrix`` (RAS: a point
    of this grid's study to the prior's point); 0 outside the prior's grid."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    to_prior = np.linalg.inv(prior_affine) @ np.asarray(matrix, np.float64) @ np.asarray(affine, np.float64)
    voxels = np.rint(to_prior[:3, :3] @ index + to_prior[:3, 3:4]).astype(np.int64)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(prior_map.shape)[:, None]), axis=0)
    out = np.zeros(index.shape[1], prior_map.dtype)
    out[inside] = prior_map[tuple(voxels[:, inside])]
    return out.reshape(shape)


def compare_with_prior(
    labels: np.ndarray,
    affine: np.ndarray,
    measures: VolumeMeasures,
    study: Mapping,
    anatomy,
    prior_dir: Path,
    prior_record: Mapping,
    lesion_labels: Sequence[int] | None,
    regions: Mapping[str, Sequence[int]] | None = None,
) -> PriorComparison:
    """A case compared with its prior (see the module docstring).

    Args:
        labels: the case's label map ``(X, Y, Z)``; ``affine`` its RAS affine.
        measures: its measures (volumes, lesions and their map).
        study: its ``study`` identity (:func:`pipelines.batch.priors.study_identity`).
        anatomy: its anatomy as :func:`pipelines.batch.priors.write_anatomy` returned it.
        prior_dir, prior_record: the prior's output folder and what :class:`~pipelines.batch.priors.PriorIndex`
            kept of its record.
        lesion_labels, regions: the bundle's.

    Returns:
        The comparison. A lesion that merged several of the prior's is compared with their sum, and
        a prior lesion that split counts for each part.
    """
    from pipelines.io import load_volume  # both import MONAI, and with it Ignite: see pipelines.batch.bundle
    from pipelines.transforms.registration import register_rigid

    prior_anatomy = load_volume(prior_dir / ANATOMY_FILE)
    registration = register_rigid(anatomy, prior_anatomy)
    prior_mask = load_volume(prior_dir / "mask.nii.gz")
    prior_labels = np.asarray(prior_mask[0]).astype(np.int64)
    prior_affine = np.asarray(prior_mask.affine, np.float64)
    prior_map, prior_count = lesion_map(prior_labels, lesion_labels)
    prior_sizes = np.bincount(prior_map.ravel(), minlength=prior_count + 1) * voxel_ml(prior_affine)
    carried = carry(prior_map, prior_affine, labels.shape, affine, registration.matrix)
    now_map, now_count = measures.lesion_map, measures.lesion_count
    pairs = np.unique(np.stack([now_map.ravel(), carried.ravel()]), axis=1)
    pairs = pairs[:, (pairs[0] > 0) & (pairs[1] > 0)]
    matched_prior = {int(j) for j in pairs[1]}
    now_sizes = np.bincount(now_map.ravel(), minlength=now_count + 1) * voxel_ml(affine)
    listed = []
    for number in range(1, len(measures.lesions) + 1):
        before = sorted(int(j) for j in pairs[1][pairs[0] == number])
        uid = None
        heirs = np.unique(pairs[0][pairs[1] == before[0]]) if len(before) == 1 else ()
        if len(heirs) == 1:  # one prior lesion, become this one alone: the same finding, its tracking UID
            uid = _lesion_uid(prior_record, before[0])
        listed.append(LesionChange(number, "matched" if before else "new", before,
                                   VolumeChange.between(float(prior_sizes[before].sum()), float(now_sizes[number])),
                                   uid or None))
    new = now_count - len(np.unique(pairs[0]))  # lesions of the case that overlap none of the prior's
    gone = [{"prior_lesion": j, "prior_ml": round(float(prior_sizes[j]), 3)}
            for j in range(1, prior_count + 1) if j not in matched_prior]
    prior_volumes = prior_record.get("volumes_ml") or {}
    prior_regions = prior_record.get("regions_ml") or {}
    return PriorComparison(
        prior_case=prior_record.get("case_id"),
        prior_output=str(prior_dir),
        interval_days=int(study["day"]) - int(prior_record["study"]["day"]),
        registration={k: v for k, v in registration.as_meta("anatomy").items() if k not in ("reference", "registered")},
        volumes_ml={name: VolumeChange.between(float(prior_volumes.get(name, 0.0)), float(value))
                    for name, value in measures.volumes_ml.items()},
        regions_ml={name: VolumeChange.between(float(prior_regions.get(name, 0.0)), float(value))
                    for name, value in (measures.regions_ml or {}).items() if name in (regions or {})},
        lesion_count={"prior": int(prior_count), "now": int(now_count), "new": int(new), "gone": len(gone)},
        lesions=listed,
        gone=gone,
        images=PriorImages(np.asarray(prior_anatomy[0]), np.asarray(prior_anatomy.affine, np.float64), prior_labels,
                           prior_affine, np.asarray(registration.matrix, np.float64)),
    )
