"""The measures of a case: volumes, lesions and regions of a volume; areas and objects of a section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipelines.batch.measures import measure_section, measure_volume
from pipelines.batch.outputs.base import CaseOutput, Output

__all__ = ["MeasuresOutput"]


class MeasuresOutput(Output):
    """Volumes per label (and region) in mL, lesions (connected components of ``lesion_labels``, default
    every foreground label) and the largest one's diameter for a volume; pixel areas, fractions and
    objects per label for a 2D section. Writes no file: later outputs use the measures."""

    provides = ("measures",)

    def __init__(self, labels: Mapping[int, str], regions: Mapping[str, Sequence[int]] | None = None,
                 lesion_labels: Sequence[int] | None = None) -> None:
        self.labels, self.regions = dict(labels), dict(regions or {})
        self.lesion_labels = None if lesion_labels is None else list(lesion_labels)

    def write(self, out: CaseOutput) -> None:
        case = out.segmented
        if case.labels.ndim == 2:
            out.measures = measure_section(case.labels, self.labels)
        else:
            out.measures = measure_volume(case.labels, case.affine, self.labels, self.lesion_labels, self.regions)

    def fields(self, out: CaseOutput) -> dict:
        return out.measures.as_record() if out.measures is not None else {}
