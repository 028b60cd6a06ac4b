"""RANO: the enhancing tumor's bidimensional measurements, and the response against earlier studies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.batch.comparison import PriorComparison
from pipelines.batch.measures import VolumeMeasures, lesion_map
from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.io.dicom_sr import Bidimensional, Rano

__all__ = ["RanoOutput", "RanoResult"]


@dataclass(frozen=True)
class RanoResult:
    """A case's RANO: its enhancing lesions' diameters (:class:`pipelines.metrics.rano.LesionDiameters`),
    the target lesions and the sum of their products; against earlier studies, the
    :class:`pipelines.metrics.rano.Assessment`, RANO 2.0's volumetric one
    (:class:`pipelines.metrics.rano.VolumeAssessment`) and the study they take as baseline; and the
    same measurements of the non-enhancing labels, when the bundle declares them (a RanoResult)."""

    rule: str
    lesions: list
    targets: list[int]
    sum_mm2: float
    response: object | None = None
    baseline_case: str | None = None
    volumetric: object | None = None
    non_enhancing: RanoResult | None = None

    def as_record(self) -> dict:
        out = {"rule": self.rule, "lesions": [lesion.as_record() for lesion in self.lesions], "targets": self.targets,
               "sum_mm2": round(self.sum_mm2, 1)}
        if self.response is not None:
            out["response"] = {"baseline_case": self.baseline_case, **self.response.as_record()}
            if self.volumetric is not None:
                out["response"]["volumetric"] = self.volumetric.as_record()
        if self.non_enhancing is not None:
            out["non_enhancing"] = {k: v for k, v in self.non_enhancing.as_record().items() if k != "rule"}
        return out

    def for_report(self, affine: np.ndarray) -> Rano:
        """As the SR states it: each lesion's longest diameter from end to end in RAS patient coordinates."""
        lesions = []
        for lesion in self.lesions:
            ends = lesion.voxels(0) @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
            lesions.append(Bidimensional(lesion.lesion, lesion.longest_mm, lesion.perpendicular_mm, ends.tolist(),
                                         lesion.lesion in self.targets))
        return Rano(lesions, self.sum_mm2, None if self.response is None else self.response.category)


class RanoOutput(Output):
    """The record's ``rano`` for a volume of a bundle that declares its enhancing labels (metadata
    ``rano``): per enhancing lesion the two perpendicular diameters on its axial slice, measurable or
    not, the target lesions and the sum of their products (:mod:`pipelines.metrics.rano`); with earlier
    studies of the patient that were measured so, the response category, the rule that decided it,
    the changes against the baseline and the nadir, and the new measurable lesions (those of the
    comparison's new lesions that hold a measurable enhancing lesion), and RANO 2.0's volumetric
    category of the enhancing volume. With ``non_enhancing`` labels (metadata ``rano.non_enhancing``:
    the FLAIR/T2 hyperintensity), the same diameters and sum for them and a RANO-LGG style category
    (with minor response). The SR states the enhancing measurements.

    Args:
        enhancing: the enhancing label values.
        labels: the bundle's label names by value.
        non_enhancing: the non-enhancing label values, or None.
    """

    provides = ("rano",)
    reads = ("measures", "comparison", "history")

    def __init__(self, enhancing: Sequence[int], labels: Mapping[int, str] | None = None,
                 non_enhancing: Sequence[int] | None = None) -> None:
        self.enhancing = list(enhancing)
        self.names = [str((labels or {}).get(value, value)) for value in self.enhancing]
        self.non_enhancing = list(non_enhancing) if non_enhancing else None

    def write(self, out: CaseOutput) -> None:
        # pipelines.metrics imports MONAI (its BraTS metrics), and with it Ignite: see pipelines.batch.bundle
        from pipelines.metrics.rano import MEASURABLE_RULE, assess, assess_volume

        case = out.segmented
        if case.labels.ndim != 3 or case.is_picture or not isinstance(out.measures, VolumeMeasures):
            return
        numbered, lesions, targets, total, measured = _measured(case, self.enhancing, out.history, "rano_sum_mm2")
        response = volumetric = None
        if measured:
            response = assess(total, [float(r["rano_sum_mm2"]) for r in measured],
                              self._new_measurable(out, numbered[0], lesions))
            volumetric = assess_volume(self._enhancing_ml(out.measures.volumes_ml),
                                       [self._enhancing_ml(r.get("volumes_ml") or {}) for r in measured])
        out.rano = RanoResult(MEASURABLE_RULE, lesions, targets, total, response,
                              measured[0]["case_id"] if measured else None, volumetric,
                              self._non_enhancing(case, out.history))

    def _enhancing_ml(self, volumes: Mapping[str, float]) -> float:
        return float(sum(volumes.get(name, 0.0) for name in self.names))

    def _non_enhancing(self, case, history: list[dict]) -> RanoResult | None:
        """The non-enhancing labels measured as the enhancing ones, with RANO-LGG's categories."""
        from pipelines.metrics.rano import MEASURABLE_RULE, assess

        if self.non_enhancing is None:
            return None
        _, lesions, targets, total, measured = _measured(case, self.non_enhancing, history, "rano_non_enhancing_sum_mm2")
        response = assess(total, [float(r["rano_non_enhancing_sum_mm2"]) for r in measured], minor=True) \
            if measured else None
        return RanoResult(MEASURABLE_RULE, lesions, targets, total, response,
                          measured[0]["case_id"] if measured else None)

    def _new_measurable(self, out: CaseOutput, numbered: np.ndarray, lesions) -> int:
        """Measurable enhancing lesions inside lesions the comparison calls new."""
        comparison = out.comparison
        if not isinstance(comparison, PriorComparison):
            return 0
        new = {lesion.lesion for lesion in comparison.lesions if lesion.status == "new"}
        inside = [out.measures.lesion_map[numbered == lesion.lesion] for lesion in lesions if lesion.measurable]
        return sum(bool(set(np.unique(found[found > 0]).tolist()) & new) for found in inside)

    def fields(self, out: CaseOutput) -> dict:
        return {"rano": out.rano.as_record()} if out.rano is not None else {}


def _measured(case, values: Sequence[int], history: list[dict], kept: str):
    """The lesions of the labels ``values`` numbered and measured, the targets and their sum, and the
    patient's earlier studies that were measured so (their record keeps the sum under ``kept``)."""
    from pipelines.metrics.rano import measure_lesions, target_sum  # MONAI and Ignite: see pipelines.batch.bundle

    numbered = lesion_map(case.labels, values)
    lesions = measure_lesions(numbered[0] > 0, case.affine, numbered)
    targets, total = target_sum(lesions)
    return numbered, lesions, targets, total, [r for r in history if r.get(kept) is not None]
