"""``seg.dcm``: the DICOM SEG of a case."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipelines.batch.measures import VolumeMeasures
from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.io import dicom_references
from pipelines.io.dicom_seg import RegionSegment, write_dicom_seg

__all__ = ["DicomSegOutput"]


class DicomSegOutput(Output):
    """``seg.dcm``: a DICOM SEG referencing the reference input's source series (DICOM input, and a
    bundle that declares ``dicom_seg_segments``): a segment per coded label, per region of several
    labels and per listed lesion (:func:`~pipelines.io.dicom_seg.write_dicom_seg`), tracking UIDs
    from the input's hash, a lesion matched to a prior study's keeping that one's. Works from the
    measures (the lesions) and the comparison (the kept tracking UIDs); sets ``out.seg``."""

    provides = ("seg",)
    reads = ("measures", "comparison")

    def __init__(self, segments, algorithm: str, version: str, regions: Mapping[str, Sequence[int]] | None = None) -> None:
        self.segments, self.algorithm, self.version = segments, algorithm, version
        self.regions = {name: tuple(values) for name, values in (regions or {}).items()}

    def write(self, out: CaseOutput) -> None:
        case = out.segmented
        if not self.segments or not dicom_references(case.reference.meta):
            return
        regions = [RegionSegment(name, values) for name, values in self.regions.items() if len(values) > 1]
        measures = out.measures if isinstance(out.measures, VolumeMeasures) else None
        lesions = None if measures is None else (measures.lesion_map, len(measures.lesions))
        out.seg = write_dicom_seg(case.labels[None], case.reference.meta, self.segments, out.case_dir / "seg.dcm",
                                  algorithm_name=self.algorithm, algorithm_version=self.version, omit_empty_frames=True,
                                  regions=regions, lesions=lesions, tracking_key=out.case.input_hash,
                                  uids=out.uids("seg"), tracking_uids=out.kept_tracking_uids())
        out.files.append("seg.dcm")
