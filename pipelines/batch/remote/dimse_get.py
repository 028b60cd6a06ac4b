"""C-GET for the batch job: a study's image series fetched from a DICOM peer (pynetdicom), each
instance in the transfer syntax the archive stores it in where this environment decodes it. Errors
as in :mod:`pipelines.batch.remote.dimse`."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet

from pipelines.batch.remote.dimse import _PENDING, _WARNINGS, DimsePeer, _associate, _dataset, _failed, _query, _status
from pipelines.batch.remote.retry import TransientError

__all__ = ["retrieve_study"]


def _storage_contexts(classes: Sequence[str], limit: int = 127) -> list[tuple[str, list[str]]]:
    """Presentation contexts to receive instances of ``classes``: for each class, one with the
    uncompressed syntaxes, then one per compressed syntax this environment decodes (pydicom's
    decoders), as many as ``limit`` (DICOM allows 128 contexts, one is the C-GET's) leaves room for.
    An archive then sends each instance as it stores it (a JPEG 2000 file as JPEG 2000), where
    uncompressed alone would make it decompress everything, or fail on what it cannot."""
    def decodable(uid: str) -> bool:
        try:
            return get_decoder(uid).is_available
        except NotImplementedError:
            return False

    compressed = [uid for uid in _AS_STORED if decodable(uid)]
    contexts = [(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for c in classes[:limit]]
    for uid in compressed:
        for c in classes:
            if len(contexts) >= limit:
                return contexts
            contexts.append((c, [uid]))
    return contexts


# compressed transfer syntaxes offered to receive instances as stored, the most common first
_AS_STORED = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
)


def retrieve_study(peer: DimsePeer, calling_aet: str, study_uid: str, series_uids: Sequence[str],
                   folder: str | os.PathLike) -> Path:
    """Fetch the series of a study (C-GET, study root, series level) into ``folder`` (replaced), one
    file per instance. The storage contexts offered are the SOP classes the series hold (C-FIND at
    image level), so any image type comes, each in the transfer syntax the archive stores it in when
    this environment decodes it, uncompressed otherwise (:func:`_storage_contexts`).

    Each series must arrive whole, every instance the C-FIND at image level lists: one that does not
    fails the fetch, naming the series, how many instances were listed and how many arrived, and
    the sub-operation counts the C-GET reported. A failure leaves nothing in ``folder``, so a retry
    starts afresh.

    Raises:
        TransientError: no association, the association aborted, the peer out of resources, or a
            series that arrived incomplete.
        ValueError: any other failure (the message names the peer).
        OSError: ``folder`` cannot be written.
    """
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        _retrieve(peer, calling_aet, study_uid, series_uids, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _retrieve(peer: DimsePeer, calling_aet: str, study_uid: str, series_uids: Sequence[str], folder: Path) -> None:
    listed: dict[str, set[str]] = {uid: set() for uid in series_uids}
    classes: set[str] = set()
    assoc = _associate(peer, calling_aet, [(StudyRootQueryRetrieveInformationModelFind, None)], "C-FIND")
    try:
        for uid in series_uids:
            query = _dataset("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=uid, SOPInstanceUID="",
                             SOPClassUID="")
            for answer in _query(assoc, peer, query, f"series {uid}'s instances"):
                listed[uid].add(str(answer.get("SOPInstanceUID", "")))
                if answer.get("SOPClassUID"):
                    classes.add(str(answer.SOPClassUID))
    finally:
        assoc.release()
    if not classes:
        raise ValueError(f"{peer}: study {study_uid}: its series list no instances (C-FIND at image level)")
    received: dict[str, set[str]] = defaultdict(set)
    unwritten: list[OSError] = []

    def on_store(event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        try:
            dataset.save_as(folder / f"{sum(map(len, received.values())):05d}.dcm", enforce_file_format=True)
        except OSError as exc:  # raised below, after the C-GET: the disk's error, not an incomplete series
            unwritten.append(exc)
            return 0xA700  # refused: out of resources
        received[str(dataset.SeriesInstanceUID)].add(str(dataset.SOPInstanceUID))
        return 0x0000

    storage = _storage_contexts(sorted(classes))
    contexts = [(StudyRootQueryRetrieveInformationModelGet, None), *storage]
    roles = [build_role(c, scp_role=True) for c in dict.fromkeys(c for c, _ in storage)]
    assoc = _associate(peer, calling_aet, contexts, "C-GET", roles, [(evt.EVT_C_STORE, on_store)])
    try:
        for uid in series_uids:
            identifier = _dataset("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=uid)
            code, status = None, None
            for reply, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                if _status(reply) not in _PENDING:
                    code, status = _status(reply), reply
            if unwritten:
                raise unwritten[0]
            arrived = len(listed[uid] & received[uid])
            what = f"{peer}: C-GET of series {uid} of study {study_uid}"
            if code is None:
                raise _failed("C-GET", code, f"{what}: the association was aborted after {arrived} of its "
                                             f"{len(listed[uid])} instances")
            if code != 0x0000 and code not in _WARNINGS:
                failed = status.get("NumberOfFailedSuboperations", "?")
                raise _failed("C-GET", code, f"{what} ended with status 0x{code:04X} ({failed} instance(s) not sent)")
            if arrived < len(listed[uid]):
                counts = ", ".join(f"{status.get(f'NumberOf{kind.title()}Suboperations', '?')} {kind}"
                                   for kind in ("completed", "failed", "warning"))
                raise TransientError(f"{what}: the series arrived incomplete: {arrived} of the {len(listed[uid])} "
                                     f"instances C-FIND lists (status 0x{code:04X}; sub-operations: {counts})",
                                     "C-GET: series incomplete")
    finally:
        if assoc.is_established:
            assoc.release()
