"""RANO: the enhancing tumor's bidimensional measurements, and the response against earlier studies."""

from __future__ import annotations

from collections.abc import Sequence
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
    :class:`pipelines.metrics.rano.Assessment` and the study it takes as baseline."""

    rule: str
    lesions: list
    targets: list[int]
    sum_mm2: float
    response: object | None = None
    baseline_case: str | None = None

    def as_record(self) -> dict:
        out = {"rule": self.rule, "lesions": [lesion.as_record() for lesion in self.lesions], "targets": self.targets,
               "sum_mm2": round(self.sum_mm2, 1)}
        if self.response is not None:
            out["response"] = {"baseline_case": self.baseline_case, **self.response.as_record()}
        return out

    def for_report(self, affine: np.ndarray) -> Rano:
        """As the SR states it: each lesion's longest diameter from end to end in RAS patient coordinates."""
        lesions = []
        for lesion in self.lesions:
            plane = [a for a in range(3) if a != lesion.axis]
            index = np.zeros((2, 3))
            index[:, lesion.axis] = lesion.slice_index
            index[:, plane] = lesion.ends[0]
            ends = index @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
            lesions.append(Bidimensional(lesion.lesion, lesion.longest_mm, lesion.perpendicular_mm, ends.tolist(),
                                         lesion.lesion in self.targets))
        return Rano(lesions, self.sum_mm2, None if self.response is None else self.response.category)


class RanoOutput(Output):
    """The record's ``rano`` for a volume of a bundle that declares its enhancing labels (metadata
    ``rano``): per enhancing lesion the two perpendicular diameters on its axial slice, measurable or
    not, the target lesions and the sum of their products (:mod:`pipelines.metrics.rano`); with earlier
    studies of the patient that were measured so, the response category, the rule that decided it,
    the changes against the baseline and the nadir, and the new measurable lesions (those of the
    comparison's new lesions that hold a measurable enhancing lesion). The SR states it too."""

    provides = ("rano",)
    reads = ("measures", "comparison", "history")

    def __init__(self, enhancing: Sequence[int]) -> None:
        self.enhancing = list(enhancing)

    def write(self, out: CaseOutput) -> None:
        # pipelines.metrics imports MONAI (its BraTS metrics), and with it Ignite: see pipelines.batch.bundle
        from pipelines.metrics.rano import MEASURABLE_RULE, assess, measure_lesions, target_sum

        case = out.segmented
        if case.labels.ndim != 3 or case.is_picture or not isinstance(out.measures, VolumeMeasures):
            return
        numbered = lesion_map(case.labels, self.enhancing)
        lesions = measure_lesions(numbered[0] > 0, case.affine, numbered)
        targets, total = target_sum(lesions)
        measured = [r for r in out.history if r.get("rano_sum_mm2") is not None]
        response = None
        if measured:
            response = assess(total, [float(r["rano_sum_mm2"]) for r in measured],
                              self._new_measurable(out, numbered[0], lesions))
        out.rano = RanoResult(MEASURABLE_RULE, lesions, targets, total, response,
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
