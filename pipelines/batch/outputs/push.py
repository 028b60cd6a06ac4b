"""``--push``: a case's DICOM outputs stored on a server."""

from __future__ import annotations

from functools import partial

from pipelines.batch.outputs.base import DICOM_OUTPUTS, CaseOutput, Output
from pipelines.batch.remote.dicomweb import push_instance
from pipelines.batch.remote.dimse import store_files
from pipelines.batch.remote.endpoint import Endpoint
from pipelines.batch.remote.retry import RetryPolicy

__all__ = ["PushOutput"]


class PushOutput(Output):
    """Stores the case's DICOM outputs (SEG, SR, RTSTRUCT) on ``destination``: STOW-RS to a DICOMweb
    service, C-STORE to a DICOM peer (as ``calling_aet``). ``pushed`` in the record is ``{"url",
    <file>: {series and SOP instance UIDs}}``, set only once every file is stored: a failure fails
    the case naming what was stored before it, and a rerun stores them all again; their UIDs are the
    same for the same input and run settings, so the archive keeps one copy of each, not two. A
    transient failure is tried again first (``retry``; counted in the case's ``retries["push"]``):
    STOW-RS the file that failed, C-STORE every file on a new association."""

    provides = ("pushed",)
    reads = ("seg", "sr", "rtstruct")

    def __init__(self, destination: Endpoint | None, calling_aet: str = "UNETPIPELINES",
                 retry: RetryPolicy | None = None) -> None:
        self.destination, self.calling_aet, self.retry = destination, calling_aet, retry or RetryPolicy()

    def write(self, out: CaseOutput) -> None:
        files = [name for name in DICOM_OUTPUTS if name in out.files]
        if self.destination is None or not files:
            return
        retried = {"step": "push", "case_id": out.case.case_id, "counts": out.case.retries}
        if self.destination.kind == "dimse":
            stored = self.retry.call(partial(store_files, self.destination.peer, self.calling_aet,
                                             [out.case_dir / n for n in files]), **retried)
        else:
            stored = {}
            for name in files:
                try:
                    where = self.retry.call(partial(push_instance, self.destination.url, out.case_dir / name), **retried)
                except ValueError as exc:
                    raise ValueError(f"{exc} (stored before it: {', '.join(stored) or 'none'})") from exc
                stored[name] = {k: v for k, v in where.items() if k != "url"}
        out.pushed = {"url": self.destination.url, **stored}

    def fields(self, out: CaseOutput) -> dict:
        return {"pushed": out.pushed}
