"""Scores against a reference label file (manifest input with labels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipelines.batch.measures import dice_scores
from pipelines.batch.outputs.base import CaseOutput, Output, Scores
from pipelines.io.writers import resample_labels

__all__ = ["DiceOutput"]


class DiceOutput(Output):
    """Dice per label, and for a bundle that declares regions, per region Dice, HD95 and the BraTS
    lesion-wise scores (:func:`pipelines.metrics.brats.brats_scores`; not for 2D pictures, which have
    no millimetres).

    Args:
        labels: label value -> name.
        regions: region name -> the label values it covers.
        lesion_scoring: ``dilation`` and ``min_lesion_mm3`` for the lesion-wise scores.
    """

    provides = ("scores",)

    def __init__(self, labels: Mapping[int, str], regions: Mapping[str, Sequence[int]] | None = None,
                 lesion_scoring: Mapping | None = None) -> None:
        self.labels = dict(labels)
        self.regions = dict(regions or {})
        self.lesion_scoring = dict(lesion_scoring or {})

    def write(self, out: CaseOutput) -> None:
        case = out.segmented
        if not out.case.label:
            return
        from pipelines.io import load_volume  # both import MONAI, and with it Ignite: see pipelines.batch.bundle
        from pipelines.metrics.brats import brats_scores

        reference = load_volume(out.case.label)
        on_grid = resample_labels(reference.numpy(), np.asarray(reference.affine), case.labels.shape, case.affine)
        regions = None
        if self.regions and not case.is_picture:
            found = brats_scores(case.labels, on_grid, case.spacing, self.regions, **self.lesion_scoring)
            regions = {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in score.as_dict().items()}
                       for name, score in found.items()}
        out.scores = Scores(dice_scores(case.labels, on_grid, self.labels), regions)

    def fields(self, out: CaseOutput) -> dict:
        return out.scores.as_record() if out.scores is not None else {}
