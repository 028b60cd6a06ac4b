"""DICOMweb input and output for the batch job: QIDO-RS to find studies, WADO-RS to fetch their
image series, STOW-RS to store DICOM SEGs back (``dicomweb-client``). Plain data in and out: the
cases are made from it by :mod:`pipelines.batch.discovery`.

Each call makes one attempt: its errors name the server and are raised from the ``requests`` error,
so that :func:`pipelines.batch.remote.retry.is_transient` tells whether the caller should try again
(dicomweb-client's own retries are off: they neither jitter nor read ``Retry-After``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from pipelines.batch.remote.dimse import NON_IMAGE_MODALITIES as _NON_IMAGE_MODALITIES
from pipelines.batch.remote.retry import TransientError

__all__ = ["discover_studies", "download_study", "push_instance"]

_STUDY, _SERIES, _MODALITY, _COUNT = "0020000D", "0020000E", "00080060", "00201209"


def _client(url: str):
    client = DICOMwebClient(url=url.rstrip("/"))
    client.set_http_retry_params(retry=False)  # the caller retries (pipelines.batch.remote.retry): one policy, not two
    return client


def _value(entry: Mapping, tag: str, default=""):
    values = entry.get(tag, {}).get("Value") or [default]
    return values[0]


def _image_series(entries, modalities: set[str] | None) -> list[Mapping]:
    return [
        e for e in entries
        if str(_value(e, _MODALITY)).upper() not in _NON_IMAGE_MODALITIES
        and (modalities is None or str(_value(e, _MODALITY)).upper() in modalities)
    ]


def discover_studies(url: str, modalities: set[str] | None = None, study_uids=(), dates: str | None = None,
                     ) -> list[tuple[str, str, list[str]]]:
    """The studies on the server that have an image series (of ``modalities``, when given), all or
    those of ``study_uids`` or with a StudyDate in ``dates`` (``YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD``):
    ``(StudyInstanceUID, hash of its series and instance counts, its image SeriesInstanceUIDs)``.

    Raises:
        ValueError: the query failed (the message names the server and the error).
    """
    filters = [{"StudyInstanceUID": uid} for uid in study_uids] or [{"StudyDate": dates} if dates else {}]
    try:
        client = _client(url)
        entries = [entry for search in filters
                   for entry in client.search_for_series(search_filters=search, fields=["NumberOfSeriesRelatedInstances"])]
    except Exception as exc:  # requests raises connection and HTTP errors of many types
        raise ValueError(f"{url}: DICOMweb query (QIDO-RS) failed: {type(exc).__name__}: {exc}") from exc
    studies: dict[str, list[Mapping]] = defaultdict(list)
    for entry in _image_series(entries, modalities):
        studies[str(_value(entry, _STUDY))].append(entry)
    found = []
    for uid, series in studies.items():
        listing = sorted(f"{_value(e, _SERIES)}:{_value(e, _COUNT, '?')}" for e in series)
        found.append((uid, hashlib.sha256("\n".join(listing).encode()).hexdigest(),
                      sorted(str(_value(e, _SERIES)) for e in series)))
    return found


def download_study(url: str, study_uid: str, folder: str | os.PathLike, modalities=None) -> Path:
    """Fetch the study's image series (WADO-RS) into ``folder`` (replaced), one file per instance.

    Each series must arrive whole: as many instances as the server's QIDO-RS lists for it
    (NumberOfSeriesRelatedInstances, asked for at the start of the fetch), else the fetch fails
    naming the series and both counts. A failure leaves nothing in ``folder``, so a retry starts afresh.

    Raises:
        TransientError: a series arrived incomplete.
        ValueError: the study cannot be fetched (the message names the server, the study and the
            error, raised from the ``requests`` error, if any).
        OSError: ``folder`` cannot be written.
    """
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        series = _download(url, study_uid, folder, {m.upper() for m in modalities} if modalities else None)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if not series:
        raise ValueError(f"study {study_uid} has no image series on {url}")
    return folder


def _download(url: str, study_uid: str, folder: Path, modalities: set[str] | None) -> list[Mapping]:
    client = _client(url)
    try:
        series = _image_series(client.search_for_series(study_instance_uid=study_uid,
                                                        fields=["NumberOfSeriesRelatedInstances"]), modalities)
        for entry in series:
            series_uid = str(_value(entry, _SERIES))
            datasets = client.retrieve_series(study_uid, series_uid)
            listed, arrived = _value(entry, _COUNT, None), len({str(d.SOPInstanceUID) for d in datasets})
            if listed is not None and arrived < int(listed):
                raise TransientError(f"{url}: WADO-RS of series {series_uid} of study {study_uid}: the series arrived "
                                     f"incomplete: {arrived} of the {int(listed)} instances QIDO-RS lists",
                                     "WADO-RS: series incomplete")
            target = folder / hashlib.sha256(series_uid.encode()).hexdigest()[:16]
            target.mkdir(parents=True, exist_ok=True)
            for index, dataset in enumerate(datasets):
                dataset.save_as(target / f"{index:05d}.dcm", enforce_file_format=True)
    except requests.RequestException as exc:  # an OSError: not the folder's
        raise ValueError(f"{url}: WADO-RS of study {study_uid} failed: {type(exc).__name__}: {exc}") from exc
    except (OSError, TransientError):
        raise
    except Exception as exc:  # decoding errors: this study fails, the run goes on
        raise ValueError(f"{url}: study {study_uid} could not be fetched (WADO-RS): {type(exc).__name__}: {exc}") from exc
    return series


def push_instance(url: str, path: str | os.PathLike) -> dict:
    """Store one DICOM file on the server (STOW-RS); returns where and what was stored."""
    dataset = pydicom.dcmread(path)
    try:
        _client(url).store_instances([dataset])
    except Exception as exc:
        raise ValueError(f"storing {Path(path).name} on {url} (STOW-RS) failed: {type(exc).__name__}: {exc}") from exc
    return {"url": url, "series_instance_uid": str(dataset.SeriesInstanceUID),
            "sop_instance_uid": str(dataset.SOPInstanceUID)}
