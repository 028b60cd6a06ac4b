"""``sr.dcm``: the TID 1500 measurement report of a case."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipelines.batch.comparison import PriorComparison
from pipelines.batch.measures import VolumeMeasures
from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.io.dicom_sr import Lesion, Measures, write_measurement_report

__all__ = ["DicomSrOutput"]


class DicomSrOutput(Output):
    """``sr.dcm``: the TID 1500 measurement report (:func:`~pipelines.io.dicom_sr.write_measurement_report`)
    of the case's volumes per label and region, its lesions and their count, and the change since the
    prior study, each group referencing its segment in the SEG written before it (none without one),
    and RANO's diameters, sum and category when the bundle measures them."""

    provides = ("sr",)
    reads = ("seg", "measures", "comparison", "rano")

    def __init__(self, segments, labels: Mapping[int, str], regions: Mapping[str, Sequence[int]] | None,
                 algorithm: str, version: str, weights_sha256: str) -> None:
        self.coded = {segment.label for segment in segments or ()}
        self.labels, self.regions = dict(labels), {name: list(values) for name, values in (regions or {}).items()}
        self.algorithm, self.version, self.weights_sha256 = algorithm, version, weights_sha256

    def write(self, out: CaseOutput) -> None:
        measures = out.measures
        if out.seg is None or not isinstance(measures, VolumeMeasures):
            return
        comparison = out.comparison if isinstance(out.comparison, PriorComparison) else None
        report = Measures(
            volumes_ml={value: measures.volumes_ml[name] for value, name in self.labels.items() if value in self.coded},
            regions_ml=measures.regions_ml or {}, region_labels=self.regions,
            lesions=[Lesion(lesion.volume_ml, lesion.diameter_mm) for lesion in measures.lesions],
            lesion_count=measures.lesion_count,
            comparison=comparison.for_report(self.labels) if comparison is not None else None,
            rano=out.rano.for_report(out.segmented.affine) if out.rano is not None else None,
        )
        write_measurement_report(out.case_dir / "sr.dcm", out.seg, report, self.algorithm, self.version,
                                 self.weights_sha256, tracking_key=out.case.input_hash, uids=out.uids("sr"),
                                 tracking_uids=out.kept_tracking_uids())
        out.files.append("sr.dcm")
