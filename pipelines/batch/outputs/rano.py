"""RANO: the enhancing tumor's bidimensional measurements, and the response against earlier studies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.batch.comparison import PriorComparison
from pipelines.batch.measures import VolumeMeasures
from pipelines.batch.outputs.base import CaseOutput, Output

__all__ = ["RanoOutput"]


class RanoOutput(Output):
    """The record's ``rano`` for a volume of a bundle that declares its enhancing labels (metadata
    ``rano``): per enhancing lesion the two perpendicular diameters on its axial slice, measurable or
    not, the target lesions and the sum of their products (:mod:`pipelines.metrics.rano`); with earlier
    studies of the patient that were measured so, the response category, the rule that decided it,
    the changes against the baseline and the nadir, and the new measurable lesions (those of the
    comparison's new lesions that hold a measurable enhancing lesion)."""

    provides = ("rano",)
    reads = ("measures", "comparison", "history")

    def __init__(self, enhancing: Sequence[int]) -> None:
        self.enhancing = list(enhancing)

    def write(self, out: CaseOutput) -> None:
        # pipelines.metrics imports MONAI (its BraTS metrics), and with it Ignite: see pipelines.batch.bundle
        from pipelines.metrics.rano import MEASURABLE_RULE, assess, measure_lesions, number_lesions, target_sum

        case = out.segmented
        if case.labels.ndim != 3 or case.is_picture or not isinstance(out.measures, VolumeMeasures):
            return
        numbered = number_lesions(np.isin(case.labels, self.enhancing))
        lesions = measure_lesions(None, case.affine, numbered)
        targets, total = target_sum(lesions)
        rano = {"rule": MEASURABLE_RULE, "lesions": [lesion.as_record() for lesion in lesions], "targets": targets,
                "sum_mm2": round(total, 1)}
        earlier = [float(r["rano_sum_mm2"]) for r in out.history if r.get("rano_sum_mm2") is not None]
        if earlier:
            new = self._new_measurable(out, numbered[0], lesions)
            rano["response"] = {"baseline_case": next(r["case_id"] for r in out.history if r.get("rano_sum_mm2") is not None),
                                **assess(total, earlier, new).as_record()}
        out.rano = rano

    def _new_measurable(self, out: CaseOutput, numbered: np.ndarray, lesions) -> int:
        """Measurable enhancing lesions inside lesions the comparison calls new."""
        comparison = out.comparison
        if not isinstance(comparison, PriorComparison):
            return 0
        new = {lesion.lesion for lesion in comparison.lesions if lesion.status == "new"}
        inside = [out.measures.lesion_map[numbered == lesion.lesion] for lesion in lesions if lesion.measurable]
        return sum(bool(set(np.unique(found[found > 0]).tolist()) & new) for found in inside)

    def fields(self, out: CaseOutput) -> dict:
        return {"rano": out.rano} if out.rano is not None else {}
