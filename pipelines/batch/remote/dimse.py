"""DICOM networking (DIMSE) for the batch job, as most hospital PACS speak it (pynetdicom): C-FIND to
find studies, C-STORE to store results back; C-GET to fetch their image series is
:mod:`pipelines.batch.remote.dimse_get`.

A peer is written ``dicom://AET@host:port`` (:class:`DimsePeer`). Every failure is a ``ValueError``
whose message names the peer and what went wrong: the association rejected (and by whom, why),
aborted, or a status that is not success. Those a later attempt may not meet are a
:class:`~pipelines.batch.remote.retry.TransientError` (no connection, the association aborted, rejected as
transient or not answered, an out-of-resources status, a series that arrived incomplete); the
caller retries them (:class:`~pipelines.batch.remote.retry.RetryPolicy`). Plain data in and out: the cases
are made from it by :mod:`pipelines.batch.discovery`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pipelines.batch.remote.retry import TransientError

__all__ = ["DEFAULT_CALLING_AET", "NON_IMAGE_MODALITIES", "DimsePeer", "check_ae_title", "find_studies", "store_files"]

DEFAULT_CALLING_AET = "UNETPIPELINES"
# series that hold no image volume: our own outputs (after --push), reports, presentation states...
NON_IMAGE_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC", "REG", "OT"}
_URL = re.compile(r"^dicom://(?P<aet>[^@/]+)@(?P<host>[^:/]+):(?P<port>\d+)/?$")
_PENDING = (0xFF00, 0xFF01)
_TIMEOUT_S = 60
_OUT_OF_RESOURCES = {"C-FIND": (0xA700,), "C-GET": (0xA701, 0xA702), "C-MOVE": (0xA701, 0xA702)}  # C-STORE: 0xA7xx
_WARNINGS = (0xB000, 0xB006, 0xB007)  # stored, or sub-operations done, with a warning


def _out_of_resources(service: str, code: int | None) -> bool:
    """Whether a DIMSE status says the peer is short of resources now (a later attempt may succeed)."""
    if code is None:
        return False
    if service == "C-STORE":
        return 0xA700 <= code <= 0xA7FF
    return code in _OUT_OF_RESOURCES.get(service, ())


def _failed(service: str, code: int | None, message: str) -> ValueError:
    """The error for a DIMSE status that is not success: transient when the association was aborted
    (``code`` None) or the peer is out of resources."""
    if code is None:
        return TransientError(message, f"{service}: association aborted")
    if _out_of_resources(service, code):
        return TransientError(message, f"{service}: status 0x{code:04X}")
    return ValueError(message)


def check_ae_title(title: str, what: str) -> str:
    """An AE title: 1 to 16 characters of the default repertoire, no backslash or control characters."""
    title = str(title).strip()
    if not 0 < len(title) <= 16 or "\\" in title or not title.isprintable() or not title.isascii():
        raise ValueError(f"{what} must be an AE title of 1 to 16 printable ASCII characters without backslash, got {title!r}")
    return title


@dataclass(frozen=True)
class DimsePeer:
    """A DICOM application entity: its AE title, host and port."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> DimsePeer:
        match = _URL.match(str(url))
        if not match:
            raise ValueError(f"a DICOM peer is written dicom://AET@host:port (e.g. dicom://PACS@10.0.0.5:104), got {url!r}")
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f"{url}: port must be 1 to 65535")
        return cls(check_ae_title(match["aet"], f"{url}: the called AE title"), match["host"], port)

    def __str__(self) -> str:
        return f"dicom://{self.aet}@{self.host}:{self.port}"


def _associate(peer: DimsePeer, calling_aet: str, contexts: Iterable[tuple[str, Sequence[str] | None]],
               what: str, roles: Sequence = (), handlers: Sequence = ()):
    """An established association for ``what`` (named in errors), or a ValueError saying why not."""
    ae = AE(ae_title=check_ae_title(calling_aet, "the calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_S
    for sop_class, syntaxes in contexts:
        if syntaxes:
            ae.add_requested_context(sop_class, list(syntaxes))
        else:
            ae.add_requested_context(sop_class)
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet, ext_neg=list(roles) or None,
                             evt_handlers=list(handlers) or None)
    except OSError as exc:
        raise TransientError(f"{peer}: {what}: cannot connect: {exc}", f"{what}: cannot connect") from exc
    except RuntimeError as exc:
        raise ValueError(f"{peer}: {what}: cannot connect: {exc}") from exc
    if assoc.is_established:
        return assoc
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        primitive = assoc.acceptor.primitive
        if primitive.result == 0x02:  # rejected-transient: busy, a limit reached
            raise TransientError(f"{peer}: {what}: association rejected by the peer for now (result "
                                 f"{primitive.result_str}, source {primitive.source_str}, reason {primitive.reason_str})",
                                 f"{what}: association rejected (transient)")
        raise ValueError(f"{peer}: {what}: association rejected by the peer (result {primitive.result_str}, "
                         f"source {primitive.source_str}, reason {primitive.reason_str}); check the called AE title "
                         f"{peer.aet!r} and that the peer knows the calling AE title {calling_aet!r}")
    if assoc.is_aborted:  # pynetdicom's account of a connection refused, too
        raise TransientError(f"{peer}: {what}: no association: the connection failed or the peer aborted the request",
                             f"{what}: no association")
    raise TransientError(f"{peer}: {what}: no association (the peer did not answer)", f"{what}: no answer")


def _status(status) -> int | None:
    return int(status.Status) if status is not None and "Status" in status else None


def _query(assoc, peer: DimsePeer, identifier, what: str) -> list:
    found = []
    for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        code = _status(status)
        if code in _PENDING:
            found.append(answer)
        elif code != 0x0000:
            raise _failed("C-FIND", code, f"{peer}: C-FIND of {what} failed: " + (
                "the association was aborted" if code is None else f"status 0x{code:04X}"))
    return found


def _dataset(level: str, **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def find_studies(peer: DimsePeer, calling_aet: str, study_uids: Sequence[str] = (), dates: str | None = None,
                 modalities: set[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """The studies on ``peer`` (C-FIND, study root) with ``study_uids`` or a StudyDate in ``dates``
    (``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``) that have an image series (of ``modalities``, when
    given): ``(StudyInstanceUID, hash of its series and instance counts, its image SeriesInstanceUIDs)``."""
    if not study_uids and not dates:
        raise ValueError(f"{peer}: name the studies (--study-uid) or a date range (--study-date): a PACS-wide "
                         f"query is refused by most archives")
    assoc = _associate(peer, calling_aet, [(StudyRootQueryRetrieveInformationModelFind, None)], "C-FIND")
    try:
        queries = [_dataset("STUDY", StudyInstanceUID=uid, StudyDate="") for uid in study_uids] or [
            _dataset("STUDY", StudyInstanceUID="", StudyDate=dates)]
        studies = sorted({str(answer.StudyInstanceUID) for query in queries
                          for answer in _query(assoc, peer, query, "studies") if answer.get("StudyInstanceUID")})
        found = []
        for uid in studies:
            series = _query(assoc, peer, _dataset("SERIES", StudyInstanceUID=uid, SeriesInstanceUID="", Modality="",
                                                  NumberOfSeriesRelatedInstances=""), f"study {uid}'s series")
            images = [s for s in series if str(s.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES
                      and (modalities is None or str(s.get("Modality", "")).upper() in modalities)]
            if not images:
                continue
            listing = sorted(f"{s.SeriesInstanceUID}:{s.get('NumberOfSeriesRelatedInstances', '?')}" for s in images)
            found.append((uid, hashlib.sha256("\n".join(listing).encode()).hexdigest(),
                          sorted(str(s.SeriesInstanceUID) for s in images)))
        return found
    finally:
        assoc.release()


def store_files(peer: DimsePeer, calling_aet: str, paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """Store DICOM files on ``peer`` (C-STORE), in order, on one association; returns, per file name,
    its series and SOP instance UIDs. Stops at the first failure: the message names the file, why,
    and which files were stored before it; a :class:`TransientError` when the association was
    aborted or the peer is out of resources (0xA7xx), so the caller may store them all again (the
    same UIDs: the peer keeps one copy)."""
    datasets = [pydicom.dcmread(path) for path in paths]
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    assoc = _associate(peer, calling_aet, [(c, [t]) for c, t in contexts], "C-STORE")
    stored: dict[str, dict] = {}
    try:
        for path, dataset in zip(paths, datasets):
            name = Path(path).name
            status = assoc.send_c_store(dataset)
            code = _status(status)
            if code != 0x0000 and code not in _WARNINGS:  # not stored, not even with a warning
                done = ", ".join(stored) or "none"
                reason = "the association was aborted" if code is None else f"status 0x{code:04X}"
                raise _failed("C-STORE", code, f"{peer}: C-STORE of {name} failed: {reason} (stored before it: {done})")
            stored[name] = {"series_instance_uid": str(dataset.SeriesInstanceUID),
                            "sop_instance_uid": str(dataset.SOPInstanceUID)}
    finally:
        if assoc.is_established:
            assoc.release()
    return stored
