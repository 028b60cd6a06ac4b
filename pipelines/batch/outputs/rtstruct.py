"""``rtstruct.dcm``: an RT Structure Set of a case (``--rtstruct``)."""

from __future__ import annotations

from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.io import dicom_references
from pipelines.io.rtstruct import write_rtstruct

__all__ = ["RtstructOutput"]


class RtstructOutput(Output):
    """``rtstruct.dcm``: an RT Structure Set of the bundle's coded labels on the reference input's
    source slices (:func:`~pipelines.io.rtstruct.write_rtstruct`), for DICOM input."""

    provides = ("rtstruct",)
    reads = ("comparison",)

    def __init__(self, segments, algorithm: str, version: str) -> None:
        self.segments, self.algorithm, self.version = segments, algorithm, version

    def write(self, out: CaseOutput) -> None:
        case = out.segmented
        if not self.segments or not dicom_references(case.reference.meta):
            return
        write_rtstruct(case.labels, case.reference.meta, self.segments, out.case_dir / "rtstruct.dcm",
                       self.algorithm, self.version, uids=out.uids("rtstruct"))
        out.files.append("rtstruct.dcm")
